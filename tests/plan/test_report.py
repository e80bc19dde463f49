"""The plan's report (daro_jax/plan/report.py): configs/tiny.py's whole RL step compiled for
a v5e 2×2 (libtpu, which requirements-test.txt installs), its verdict, step time and MFU;
the CLI's verdict on a step that does not fit, and daro_jax.main refusing to start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

OVERSIZED = "--config.train.block_rows=65536"  # the update's logits: ~100 GiB a chip


def test_tiny_step_compiles_for_the_topology(tiny):
    config, p = tiny
    assert p.topology == "v5e:2x2" and p.chips == 4 and p.chip.hbm_gib == 16
    assert p.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    assert [c.name for c in p.programs] == ["sampler", "update"]
    assert p.fits and p.verdict().startswith("plan: fits (peak ")
    assert p.verdict().endswith(" of 16 GiB per device)")
    assert p.format().splitlines()[-1] == p.verdict()


def test_step_time_and_mfu_are_roofline_estimates(tiny):
    _, p = tiny
    phases = p.step_seconds()
    assert list(phases) == ["prefill", "decode", "logprob pass", "update", "host"]
    assert phases["logprob pass"] == 0.0 and min(phases["prefill"], phases["decode"]) > 0
    update = p.program("update")
    assert phases["update"] == pytest.approx(update.runs * update.seconds(p.chip))
    assert 0 < p.update_mfu() < 1 and 0 < p.decode_share() < 1
    assert 0 < p.decode_roofline_share() <= 1
    assert "compiler estimates, not measurements" in p.format().splitlines()[0]


def run_cli(module: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    return subprocess.run(
        [sys.executable, "-m", module, "--config=configs/tiny.py", *args],
        capture_output=True,
        text=True,
        env=env | {"JAX_PLATFORMS": "cpu"},
        cwd=os.getcwd(),
        timeout=600,
    )


def test_oversized_step_does_not_fit(tmp_path):
    """A micro-batch of 4 × 65536 packed rows: the CLI prints the plan, ends with "does not
    fit" naming the knob, exits 1, writes the JSON, and shows none of libtpu's start-up
    warnings."""
    out = run_cli(
        "daro_jax.plan",
        "--config.tpu.accelerator=v5e-4",
        OVERSIZED,
        f"--json={tmp_path / 'plan.json'}",
        tmp_path=tmp_path,
    )
    assert out.returncode == 1, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("plan: does not fit (peak ") and "in the update" in last
    assert last.endswith("change train.block_rows=32768")
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "E0000" not in out.stderr
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["fits"] is False and saved["verdict"] == last
    assert saved["peak"] > saved["usable"]


def test_main_refuses_to_start_when_the_step_does_not_fit(tmp_path):
    """daro_jax.main with plan.check on: the oversized step exits before any weight or
    checkpoint is written."""
    workdir = tmp_path / "run"
    out = run_cli(
        "daro_jax.main",
        "--config.tpu.accelerator=v5e-4",
        "--config.plan.check=true",
        OVERSIZED,
        f"--workdir={workdir}",
        tmp_path=tmp_path,
    )
    assert out.returncode == 1
    assert "plan: does not fit" in out.stderr
    assert not workdir.exists() or not any(workdir.iterdir())
