"""A user's mistakes end every entry point with one line `error: …` and exit status 1
(`daro_jax.errors.UserError`, printed by `cli.run`); a traceback only with --verbosity.

The cases a new user meets on the tiny recipe: an empty data file, a mesh that needs more
devices than exist, a workdir that is a file, and a latest (only) checkpoint whose
meta/metadata is truncated; for evaluate a mesh that is too big, for the plan a TPU type
it does not know. The commands run at once, as subprocesses (each fails before any model
loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp

from daro_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT / 'configs' / 'tiny.py'}"


def _start(module: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", module, TINY, *args]
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _truncated_only_checkpoint(workdir: Path) -> Path:
    """A workdir whose one checkpoint has a truncated meta/metadata (a half-copied run)."""
    with checkpoint.Checkpointer(workdir, keep=1, every=1, async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.zeros(3)}, {"step": 1})
    meta = workdir / "checkpoints" / "1" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:5])
    return workdir / "checkpoints"


def test_user_mistakes_are_one_line_with_exit_status_1(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("not a folder")
    checkpoints = _truncated_only_checkpoint(tmp_path / "half_copied")
    main = ("daro_jax.main", "--config.reward.num_workers=1")
    cases = {
        "empty data": (
            *main,
            f"--config.data.source={tmp_path / 'empty.jsonl'}",
            f"--workdir={tmp_path / 'w1'}",
        ),
        "mesh": (*main, "--config.mesh.shape=(16,1,1)", f"--workdir={tmp_path / 'w2'}"),
        "workdir is a file": (*main, f"--workdir={tmp_path / 'a_file'}"),
        "truncated checkpoint": (*main, f"--workdir={tmp_path / 'half_copied'}"),
        "evaluate mesh": ("daro_jax.evaluate", "--config.mesh.shape=(16,1,1)"),
        "plan topology": ("daro_jax.plan", "--config.tpu.accelerator=v9-8"),
        "with --verbosity": (
            *main,
            "--config.mesh.shape=(16,1,1)",
            f"--workdir={tmp_path / 'w3'}",
            "--verbosity=0",
        ),
    }
    expected = {
        "empty data": f"error: data source '{tmp_path / 'empty.jsonl'}' has no usable problem "
        "(it holds no rows)",
        "mesh": "error: mesh.shape=(16, 1, 1) needs 16 devices but 8 are available",
        "workdir is a file": f"error: workdir {tmp_path / 'a_file'} is a file",
        "truncated checkpoint": f"error: no checkpoint in {checkpoints} can be read: step 1 "
        "(JSONDecodeError:",
        "evaluate mesh": "error: mesh.shape=(16, 1, 1) needs 16 devices",
        "plan topology": "error: config.tpu.accelerator='v9-8' is not a TPU type the plan knows",
    }
    started = {name: _start(*argv) for name, argv in cases.items()}
    done = {name: (*p.communicate(timeout=600), p.returncode) for name, p in started.items()}
    for name, line in expected.items():
        out, err, status = done[name]
        assert status == 1, (name, err[-2000:])
        assert err.startswith(line), (name, err[-2000:])
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err[-2000:])
    out, err, status = done["with --verbosity"]
    assert status == 1 and "Traceback" in err and "UserError: mesh.shape=(16, 1, 1)" in err
