"""What the commands share (daro_jax/cli.py): local paths resolved once (URLs, hub ids and
aliases kept), one line for a misspelt config field, and `--help` of every README command."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import load_config_file

from daro_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_path_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").write_text("")
    (tmp_path / "Org").mkdir()
    (tmp_path / "Org" / "model").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    here = str(tmp_path)
    assert cli.resolve_path("runs/x", local=True) == f"{here}/runs/x"  # need not exist
    assert cli.resolve_path("data/train.parquet") == f"{here}/data/train.parquet"  # exists
    assert cli.resolve_path("missing/train.jsonl") == f"{here}/missing/train.jsonl"  # suffix
    assert cli.resolve_path("./w") == f"{here}/w"
    assert cli.resolve_path("../w") == f"{tmp_path.parent}/w"
    assert cli.resolve_path("~/m.gguf") == f"{here}/home/m.gguf"
    assert cli.resolve_path("Org/model") == f"{here}/Org/model"  # a local folder wins
    assert cli.resolve_path("/a/../b") == "/b"


def test_resolve_path_keeps_urls_hub_ids_and_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "generated").mkdir()
    for url in ("gs://bucket/run", "s3://b/k", "https://host/x.jsonl"):
        assert cli.resolve_path(url) == url
        assert cli.resolve_path(url, local=True) == url
    assert cli.resolve_path("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B"
    assert cli.resolve_path("open-r1/OpenR1-Math-220k") == "open-r1/OpenR1-Math-220k"
    assert cli.resolve_path("smollm2-gguf", keep=("smollm2-gguf",)) == "smollm2-gguf"
    assert cli.resolve_path("generated", keep=("generated",)) == "generated"  # folder exists
    assert cli.resolve_path("", local=True) == "" and cli.resolve_path(None) is None


def test_with_local_paths_resolves_the_config_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_text("")
    config = load_config_file(
        ROOT / "configs" / "tiny.py",
        **{
            "model.path": "m.gguf",
            "data.source": "d/train.jsonl",
            "eval.benchmarks_dir": "bench",
        },
    )
    resolved = cli.with_local_paths(config)
    assert resolved.model.path == f"{tmp_path}/m.gguf"
    assert resolved.data.source == f"{tmp_path}/d/train.jsonl"
    assert resolved.eval.benchmarks_dir == f"{tmp_path}/bench"
    assert config.model.path == "m.gguf"  # a copy: the flag's value is unchanged
    defaults = cli.with_local_paths(load_config_file(ROOT / "configs" / "tiny.py"))
    assert (defaults.model.path, defaults.data.source) == ("smollm2-gguf", "generated")
    assert defaults.eval.benchmarks_dir == ""


def test_misspelt_config_field_is_one_line():
    for module, extra in (("daro_jax.main", ["--workdir=/tmp/never"]), ("daro_jax.plan", [])):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--config=configs/tiny.py", "--config.train.stepz=3"]
            + extra,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr == (
            "FATAL Flags parsing error: flag --config.train.stepz=3: config.train has no field "
            '\'stepz\'. Did you mean "steps" instead of "stepz"?\n'
        )


def readme_commands() -> dict[str, str]:
    """{what: command} of the README's "Commands" table (the first `code` of each row)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|]+?) \| `([^`]+)`", table, re.MULTILINE)
    return dict(rows)


def help_argv(command: str) -> list[str]:
    """The program of a README command line with --help: `python -m X` with this
    interpreter, other programs from this interpreter's bin folder or the repository."""
    words = shlex.split(command)
    if words[0] == "python":
        assert words[1] == "-m", command
        return [sys.executable, "-m", words[2], "--help"]
    beside = Path(sys.executable).parent / words[0]
    return [str(beside) if beside.exists() else words[0], "--help"]


def test_every_readme_command_answers_help():
    """Each command of the table answers --help with exit status 0, and its help names the
    first option the README gives it (e.g. --config, --logdir)."""
    commands = readme_commands()
    assert {"train / resume", "watch", "TPU pod", "TPU plan", "evaluate", "tests"} <= set(
        commands
    ), commands
    for what, command in commands.items():
        proc = subprocess.run(
            help_argv(command), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (what, command, proc.stderr[-2000:])
        option = next(w for w in shlex.split(command) if w.startswith("-") and w != "-m")
        assert option.split("=")[0] in proc.stdout, (what, proc.stdout[-2000:])
