"""Helpers shared by test modules (importable from worker subprocesses too: no side
effects on import, unlike conftest.py)."""

import importlib.util
from pathlib import Path


def load_config_file(path, **changes):
    """get_config() of the config file `path` with dotted-name `changes` applied."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config
