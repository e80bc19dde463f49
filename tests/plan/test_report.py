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


def test_scaled_plan_extrapolates_every_count_linearly(tiny, monkeypatch):
    """`scaled_plan` of a 10-layer model from plans at 2 and 4 layers, where the 4-layer
    plan counts twice the 2-layer one's (FLOPs, bytes, memory, parameters, decode floor;
    the same loop trips): x(10) = x(2) + (x(4) − x(2)) · 4 = 5 · x(2) for every count, so
    the step's time, a roofline of the counts, is 5× too and the MFU and the decode's share
    of its roofline are the 2-layer plan's."""
    import dataclasses

    from daro_jax.plan import report

    config, low = tiny
    config = copy_with_layers(config, 10)
    double = lambda n: 2 * n  # noqa: E731

    def doubled(c):
        parts = tuple(dataclasses.replace(p, per_trip=p.per_trip * 2) for p in c.parts)
        memory = {k: double(v) for k, v in c.memory.items()}
        return dataclasses.replace(
            c, memory=memory, resident_elsewhere=double(c.resident_elsewhere), parts=parts
        )

    high = dataclasses.replace(
        low,
        resident={k: double(v) for k, v in low.resident.items()},
        programs=tuple(doubled(c) for c in low.programs),
        n_params=double(low.n_params),
        frozen_params=double(low.frozen_params),
        decode_floor=double(low.decode_floor),
    )
    depths = []

    def make_plan(config, topology_name=None, title="", layers=0):
        depths.append(layers)
        return {2: low, 4: high}[layers]

    monkeypatch.setattr(report, "make_plan", make_plan)
    scaled = report.scaled_plan(config)
    assert depths == [2, 4] and scaled.title.endswith("(scaled from 2 and 4 layers to 10)")
    assert scaled.n_params == 5 * low.n_params and scaled.decode_floor == 5 * low.decode_floor
    assert scaled.resident == {k: 5 * v for k, v in low.resident.items()}
    for got, want in zip(scaled.programs, low.programs, strict=True):
        assert got.memory == {k: 5 * v for k, v in want.memory.items()}
        assert [p.trips for p in got.parts] == [p.trips for p in want.parts]
        for p, q in zip(got.parts, want.parts, strict=True):
            assert p.per_trip.bytes == pytest.approx(5 * q.per_trip.bytes)
            assert p.per_trip.flops == pytest.approx(5 * q.per_trip.flops)
    for name, seconds in low.step_seconds().items():
        expected = seconds if name == "host" else 5 * seconds  # the host's is measured
        assert scaled.step_seconds()[name] == pytest.approx(expected)
    assert scaled.update_mfu() == pytest.approx(low.update_mfu())
    assert scaled.decode_roofline_share() == pytest.approx(low.decode_roofline_share())


def copy_with_layers(config, layers: int):
    """A copy of `config` whose model has `layers` layers."""
    import copy

    out = copy.deepcopy(config)
    out.model.arch_overrides.num_hidden_layers = layers
    return out


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
