"""Multi-host: 2 CPU processes × 4 devices give the same RL step as 1 process × 8 devices.

Each process loads and scores its own half of the prompts; the global arrays are assembled
over the mesh. Rewards come from a verifier stand-in that marks k = answer mod (K+1) of a
problem's K responses correct, so the groups (and the loss) do not depend on which process
scores which prompt. One run covers what differs across processes: DAPO's dynamic sampling
(every process must keep the same prompts, over several sampling rounds), two minibatches
(the group metrics cover both) and DARO's learned weights on top (their gradient and group
weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_processes

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("loss", "grad_norm", "entropy", "reward", "group/L/1of4", "group/prompts/2of4")
DYNAMIC = ("dynamic/tries", "dynamic/kept_prompts", "dynamic/sampled_prompts")
DYNAMIC += ("dynamic/sampled_accuracy", "dynamic/batch_full")
CHANGES = {"algo.daro_weights": True, "train.batch_prompts": 16, "train.minibatches": 2}
COMPARED = KEYS + DYNAMIC + ("grad_norm_daro", "group/w/2of4", "group/prompts/0of4")
COMPARED += ("group/prompts/4of4", "group/L/3of4")


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
    from helpers import tiny_config
    from jax.experimental import multihost_utils

    from daro_jax.train import loop

    collected = []
    collect = loop.collect

    def recording(*args):
        """`loop.collect`, keeping what it hands the step: this process's rows of the
        kept prompts."""
        collected.append(collect(*args))
        return collected[-1]

    loop.collect = recording
    config = tiny_config(**{"algo.name": "dapo", **CHANGES})
    out = loop.run_step(loop.build(config), 0, AnswerPool(config.algo.k))
    rollout = collected[-1][1]
    rows = {"prompt_tokens": rollout["prompt_tokens"], "lengths": rollout["lengths"]}
    if num_processes > 1:
        rows = multihost_utils.process_allgather(rows, tiled=True)
    batch = [
        np.asarray(tokens).tolist() if np.asarray(lengths).any() else "padding"
        for tokens, lengths in zip(rows["prompt_tokens"], rows["lengths"], strict=True)
    ]
    print(json.dumps({"metrics": {key: out[key] for key in COMPARED}, "batch": batch}))


def _launch(num_processes: int, devices_each: int) -> list[dict]:
    return run_processes(__file__, num_processes, devices_each)


def test_two_processes_match_one_process():
    """Same batch (the same kept prompts) and the same metrics."""
    single = _launch(1, 8)[0]
    double = _launch(2, 4)
    assert double[0] == double[1]  # every process sees the same global metrics and batch
    one, two = single["metrics"], double[0]["metrics"]
    assert one["grad_norm"] > 0.0 and one["grad_norm_daro"] > 0.0
    assert double[0]["batch"] == single["batch"]
    for key in COMPARED:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert one["dynamic/tries"] >= 2  # the batch needed several sampling rounds
    assert one["dynamic/batch_full"] == 1.0 and one["dynamic/kept_prompts"] == 16
    assert "padding" not in single["batch"]
    assert one["group/prompts/0of4"] == one["group/prompts/4of4"] == 0  # only mixed prompts


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
