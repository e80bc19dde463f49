"""`python -m daro_jax.main` as a user runs it: a run in a relative workdir that saves,
resumes and then has nothing to do, with a quiet console (what the commands share,
daro_jax/cli.py: test_cli.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from daro_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ABSL_INFO = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO line prefix (month, day)


def _main(cwd, *args):
    """`python -m daro_jax.main` on configs/tiny.py in `cwd`, the repository on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        "-m",
        "daro_jax.main",
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        "--config.reward.num_workers=1",
        *args,
    ]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_relative_workdir_saves_resumes_and_then_has_nothing_to_do(tmp_path):
    """Three runs of the command in the relative workdir runs/tiny (cwd tmp_path): one step,
    then two (resumes from step 1; with --verbosity=0, so orbax's INFO lines show), then two
    again (nothing to do, exit 0). By default the console holds our lines and no INFO log."""
    workdir = tmp_path / "runs" / "tiny"
    first = _main(tmp_path, "--workdir=runs/tiny", "--config.train.steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for line in ("model ", "devices ", "mesh ", "recipe ", "data "):
        assert re.search(rf"^{line}", out, re.MULTILINE), line
    assert f"checkpoints  {workdir}/checkpoints" in out
    assert f"TensorBoard  tensorboard --logdir {workdir}" in out
    assert re.search(r"^step 1 \| reward ", out, re.MULTILINE)
    assert re.search(rf"^done: step 1 of 1 \| .*tensorboard --logdir {workdir}$", out, re.M)
    assert not ABSL_INFO.search(first.stderr), first.stderr[-3000:]
    assert "resumed" not in out

    second = _main(tmp_path, "--workdir=runs/tiny", "--config.train.steps=2", "--verbosity=0")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from the checkpoint of step 1 in {workdir}/checkpoints" in second.stdout
    assert re.search(r"^step 2 \| ", second.stdout, re.MULTILINE)
    assert not re.search(r"^step 1 \| ", second.stdout, re.MULTILINE)
    assert re.search(r"^I\d{4} .*checkpoint_manager\.py", second.stderr, re.MULTILINE)

    third = _main(tmp_path, "--workdir=runs/tiny", "--config.train.steps=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout == f"{workdir}: already at step 2 of 2; nothing to do\n"

    with checkpoint.Checkpointer(str(workdir), keep=3, every=2) as ckpt:
        assert ckpt.all_steps() == [1, 2] and ckpt.restore_meta()["step"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir))
    events.Reload()
    assert [e.step for e in events.Scalars("reward")] == [1, 2]
