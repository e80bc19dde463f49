"""Helpers shared by test modules (importable from worker subprocesses too: no side
effects on import, unlike conftest.py)."""

import importlib.util
from pathlib import Path

import numpy as np


def softmax(x):
    """softmax over the last axis, in float64."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def truncate_half(path: Path) -> None:
    """Cut a file to half its bytes (what a half-finished copy from a bucket leaves)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def largest_array_file(checkpoints: Path, step: int) -> Path:
    """The largest file of the arrays of checkpoint `step` in `checkpoints` (OCDBT data)."""
    files = [p for p in (checkpoints / str(step) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def plan_tiny_config(**changes):
    """configs/tiny.py as the plan tests compile it: for a v5e 2×2 (4 chips), one verifier
    worker, then `changes`."""
    return load_config_file(
        "configs/tiny.py", **{"tpu.accelerator": "v5e-4", "reward.num_workers": 1, **changes}
    )


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


def run_processes(script, num_processes: int, devices_each: int, *args, timeout=600) -> list:
    """Run `python script <process_id> <num_processes> <port> *args` as `num_processes`
    CPU processes of `devices_each` devices each (a free localhost port for
    jax.distributed, the repository and tests/ importable); asserts that each exits 0 and
    returns the JSON of each one's last stdout line."""
    import json
    import os
    import re
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "XLA_FLAGS": re.sub(  # conftest's flags, with this count of devices
            r"--xla_force_host_platform_device_count=\d+",
            f"--xla_force_host_platform_device_count={devices_each}",
            os.environ.get("XLA_FLAGS", ""),
        ),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
    }
    argv = [str(a) for a in args]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(num_processes), str(port), *argv],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def lora_model(model, rank: int = 4, targets: str = ".*", std: float = 0.05, seed: int = 0):
    """`model` with LoRA adapters (`from_config.with_adapters`, alpha = 2·rank) whose
    B is random N(0, std²) instead of zero, so that the adapters change the model."""
    import jax
    from ml_collections import ConfigDict

    from daro_jax.models import lora
    from daro_jax.models.from_config import with_adapters

    section = ConfigDict({"lora": {"rank": rank, "alpha": 2.0 * rank, "targets": targets}})
    section.lora.dtype = "float32"
    adapted = with_adapters(model, section, seed)
    base, adapters = lora.split(adapted.params)
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [
        std * jax.random.normal(key, x.shape, x.dtype) if path[-1].key == "lora_b" else x
        for (path, x), key in zip(leaves, keys, strict=True)
    ]
    params = lora.combine(base, jax.tree_util.tree_unflatten(tree, new))
    return type(model)(adapted.config, params, adapted.tokenizer, adapted.mesh)


def torch_logits(model, ids, mask):
    """transformers' logits with position ids cumsum(mask) − 1 (as its generate does)."""
    import torch

    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
        )
    return out.logits.float().numpy()


def max_err_on_tokens(a, b, mask):
    """max |a − b| over the positions where mask is set."""
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())
