"""What the three commands (daro_jax.main, daro_jax.evaluate, daro_jax.plan) share.

- `run(main)`: absl's `app.run` with flag parsing that answers `--help` with exit status 0
  and a misspelt `--config.x` override with one line (ml_collections' "Did you mean" hint
  included) instead of a traceback; and quiet library logging: absl, orbax and jax INFO lines
  and transformers' advice lines are hidden unless `--verbosity` is given (0: INFO, 1:
  debug). Warnings and errors show. A user's mistake (`errors.UserError`: config, data,
  mesh, paths, checkpoints) is one line `error: <message>` with exit status 1; a traceback
  only for our bugs, or with `--verbosity`.
- `resolve_path` / `with_local_paths`: every local path a user gives becomes absolute once,
  at the entry point, so a relative path works everywhere (orbax refuses relative ones);
  URLs (`gs://bucket/run`), hub ids (`Qwen/Qwen2.5-Math-1.5B`) and aliases (`smollm2-gguf`,
  `generated`) stay as they are.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import sys
from collections.abc import Callable, Collection, Sequence

from absl import app, flags, logging

from daro_jax.errors import UserError

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Endings of the local files a path-or-hub-id field may name (models and data sets).
PATH_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet")
HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")


def resolve_path(value: str | None, *, local: bool = False, keep: Collection[str] = ()):
    """`value` as an absolute local path when it names one, else `value` unchanged.

    Unchanged: None or "", a URL (`scheme://…`), a name in `keep` (aliases), and, unless
    `local`, a name that neither exists nor looks like a path (a hub id). Made absolute (after
    expanding `~`): everything else when `local` (a workdir); otherwise an existing file or
    folder, or a name that starts with `/`, `./`, `../` or `~` or ends in a PATH_SUFFIXES.
    """
    if not value or value in keep or URL.match(value):
        return value
    expanded = os.path.expanduser(value)
    looks_local = value.startswith(("/", "./", "../", "~")) or value.endswith(PATH_SUFFIXES)
    if local or looks_local or value in (".", "..") or os.path.exists(expanded):
        return os.path.abspath(expanded)
    return value


def with_local_paths(config):
    """A copy of a run config whose model.path, data.source and eval.benchmarks_dir are
    absolute where they are local (`resolve_path`; "smollm2-gguf" and "generated" kept)."""
    from daro_jax.models.model import SMOLLM2_ALIAS

    config = copy.deepcopy(config)
    config.model.path = resolve_path(config.model.path, keep=(SMOLLM2_ALIAS,))
    config.data.source = resolve_path(config.data.source, keep=("generated",))
    config.eval.benchmarks_dir = resolve_path(config.eval.benchmarks_dir, local=True)
    return config


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with `parse_flags` (see the module docstring); a user's mistake
    (`errors.UserError`) raised by `main` is one line (`user_errors`)."""
    app.run(user_errors(main), flags_parser=parse_flags)


def user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main` with a `UserError` printed as `error: <message>` on stderr and exit status 1,
    without a traceback unless `--verbosity` is given; other exceptions (our bugs) keep
    theirs."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            if flags.FLAGS["verbosity"].present:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Not sys.exit: libraries' background threads (orbax's) can print tracebacks
            # while the interpreter shuts down; nothing is left to save on this path.
            os._exit(1)

    return wrapped


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, then library logging set to WARNING unless --verbosity is given.

    `--help` (any of HELP_FLAGS) prints the usage and exits 0 (absl exits 1). An override of
    a config field that does not exist exits 1 with one line naming the flag and the field.
    """
    try:
        args = app.parse_flags_with_usage(argv)
    except SystemExit as e:
        if e.code == 1 and _asks_for_help(argv):
            sys.exit(0)
        raise
    except (KeyError, AttributeError) as e:
        message = unknown_field_message(e, argv)
        if message is None:
            raise
        sys.exit(f"FATAL Flags parsing error: {message}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        # transformers' advice lines (e.g. "PyTorch was not found", on a runtime without torch).
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return args


def _flag_words(argv: Sequence[str]) -> list[str]:
    """The flag names in argv[1:] before `--`, without dashes and values."""
    words = []
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("-"):
            words.append(arg.lstrip("-").partition("=")[0])
    return words


def _asks_for_help(argv: Sequence[str]) -> bool:
    return any(word in HELP_FLAGS for word in _flag_words(argv))


def unknown_field_message(error: Exception, argv: Sequence[str]) -> str | None:
    """One line for ml_collections' error on an override of a field that does not exist, or
    None when `error` is not one.

    ml_collections raises KeyError("'<field>'\\nDid you mean …?"), or an AttributeError
    around it; the override is the `--<flag>.<path>` argument whose path holds that field.
    """
    text = error.args[0] if error.args else ""
    if isinstance(text, KeyError):
        text = text.args[0] if text.args else ""
    first, _, hint = str(text).partition("\n")
    try:
        field = ast.literal_eval(first)
    except (ValueError, SyntaxError):
        return None
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.lstrip("-").partition("=")[0]
        flag, _, path = name.partition(".")
        parts = path.split(".")
        if arg.startswith("-") and path and flag in flags.FLAGS and field in parts:
            parent = ".".join([flag, *parts[: parts.index(field)]])
            line = f"flag {arg}: {parent} has no field {field!r}."
            return f"{line} {hint.strip()}" if hint.strip() else line
    return None
