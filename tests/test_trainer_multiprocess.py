"""Multi-host: 2 CPU processes × 4 devices give the same RL step as 1 process × 8 devices.

Each process loads and scores its own half of the prompts; the global arrays are assembled
over the mesh. Rewards come from a verifier stand-in that marks k = answer mod (K+1) of a
problem's K responses correct, so the groups (and the loss) do not depend on which process
scores which prompt.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "grad_norm", "entropy", "reward", "group/L/1of4", "group/prompts/2of4")


class AnswerPool:
    """k = int(gold) mod (K + 1) correct answers for each prompt, whoever scores it."""

    def __init__(self, k: int):
        self.k = k

    def score(self, completions, golds):
        golds = np.asarray(golds).reshape(-1, self.k)[:, 0]
        counts = np.array([int(g) % (self.k + 1) for g in golds])
        return (np.arange(self.k)[None, :] < counts[:, None]).astype(np.float32).reshape(-1)

    def pop_stats(self):
        return {}


def _worker(process_id: int, num_processes: int, port: str) -> None:
    import jax

    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{port}", num_processes=num_processes, process_id=process_id
        )
    from daro_jax import trainer
    from tests.test_trainer import tiny_config

    config = tiny_config(**{"train.batch_prompts": 8, "algo.name": "daro"})
    t = trainer.Trainer(config)
    out = t.step(0, AnswerPool(config.algo.k))
    print(json.dumps({key: out[key] for key in KEYS}))


def _launch(num_processes: int, devices_each: int) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), str(num_processes), str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_processes_match_one_process():
    single = _launch(1, 8)[0]
    double = _launch(2, 4)
    assert double[0] == double[1]  # every process sees the same global metrics
    assert single["grad_norm"] > 0.0
    for key in KEYS:
        assert double[0][key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
