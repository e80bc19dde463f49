"""Helpers shared by test modules (importable from worker subprocesses too: no side
effects on import, unlike conftest.py)."""

import importlib.util
from pathlib import Path

import numpy as np


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


def tiny_config(**changes):
    """configs/tiny.py on a (1, -1, 1) mesh with one verifier worker, then `changes`."""
    return load_config_file(
        "configs/tiny.py",
        **{"mesh.shape": (1, -1, 1), "reward.num_workers": 1, **changes},
    )


class PatternPool:
    """Stand-in for RewardPool: prompt i of a batch gets (i mod (K+1)) correct answers."""

    def __init__(self, k: int):
        self.k = k

    def score(self, completions, golds):
        n = len(completions) // self.k
        correct = np.arange(self.k)[None, :] < (np.arange(n) % (self.k + 1))[:, None]
        return correct.astype(np.float32).reshape(-1)

    def pop_stats(self):
        return {"items": 0}
