"""bench/device_check.py end to end on the CPU at configs/tiny.py's shape (--chip h100 gives
it a chip's figures to compare with: the estimate is the H100's, the time the CPU's, so
only the plumbing is checked, not the ratio)."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_device_check_runs_every_program_and_prints_the_estimates():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    # one device, as a user's machine has (conftest's other flags kept)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env["XLA_FLAGS"])
    out = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--config", "tiny", "--chip", "h100"]
        + ["--steps", "2", "--set", "train.batch_prompts=4", "reward.num_workers=1"],
        capture_output=True,
        text=True,
        env=env | {"JAX_PLATFORMS": "cpu"},
        timeout=1800,  # about a minute on an idle 2-core machine; far more under load
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    found = {}
    for line in lines:
        match = re.match(
            r"(sampler|logprob pass|update): measured ([\d.e+-]+) s, plan estimate "
            r"([\d.e+-]+) s",
            line,
        )
        if match:
            found[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    # two minibatches (the check's default): an old-policy pass and two updates a step
    assert list(found) == ["sampler", "logprob pass", "update"]
    assert all(measured > 0 and estimate > 0 for measured, estimate in found.values())
    assert lines[-1].startswith("measured / plan estimate: sampler ")
    assert any(
        line.startswith("chip figures: h100 (989 TFLOP/s bf16, 3.35 TB/s HBM)") for line in lines
    )
