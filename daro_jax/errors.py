"""The one kind of error for a user's mistake: a config, data, mesh, path or checkpoint that
cannot work, as opposed to a bug of ours.

Every entry point (`python -m daro_jax.main`, `daro_jax.evaluate`, `daro_jax.plan`; see
`cli.run`) prints a `UserError` as one line, `error: <message>`, and exits with status 1;
any other exception is a bug and keeps its traceback, as a `UserError` does with
`--verbosity`. The message names the bad field, file or value and what would fix it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A user's mistake (config, data, mesh, paths, checkpoint compatibility)."""


class PathError(UserError, FileNotFoundError):
    """A path the user gave that names nothing usable (a missing file, a file where a
    folder is needed, a checkpoint that cannot be read)."""
