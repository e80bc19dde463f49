"""Read-only access to a workdir's checkpoints (evaluation restores the model params
alone): it never cleans up, so a save in flight of a running training is left alone, unlike
opening a `Checkpointer`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from daro_jax.errors import PathError, UserError


def has_checkpoints(workdir: str | epath.PathLike) -> bool:
    """Whether `workdir` is a training workdir (it has a checkpoints/ folder)."""
    return (epath.Path(workdir) / "checkpoints").is_dir()


def newest_readable(
    directory: epath.Path, steps: Iterable[int], read: Callable[[int], Any], warned: set[int]
) -> tuple[int, Any] | None:
    """(step, read(step)) of the newest of `steps` that `read` can read: one whose files
    cannot be read (e.g. a half-finished copy from a bucket: a truncated metadata or array
    file) is skipped with a warning naming it and the cause (once: its step joins
    `warned`). None without steps; a PathError in one line naming each when none can be
    read. A `UserError` (e.g. a checkpoint of another model) is not a read failure: it is
    raised."""
    failures = {}
    for candidate in sorted(steps, reverse=True):
        try:
            found = candidate, read(candidate)
        except UserError:
            raise
        except Exception as e:  # any failure of orbax reading the files
            failures[candidate] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        for skipped, cause in failures.items():
            if skipped not in warned:
                warned.add(skipped)
                logging.warning(
                    "the checkpoint %s cannot be read (%s); skipped",
                    directory / str(skipped),
                    cause,
                )
        return found
    if failures:
        named = "; ".join(f"step {s} ({cause})" for s, cause in failures.items())
        raise PathError(
            f"no checkpoint in {directory} can be read: {named}. Copy them again, or move them "
            "away to start the run afresh."
        )
    return None


def _first_line(error: Exception, limit: int = 160) -> str:
    """The first non-empty line of an error's message (orbax's run over many lines), cut
    to `limit` characters."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_newest(
    workdir: str | epath.PathLike, read: Callable[[int], Any], step: int | None = None
) -> tuple[int, Any]:
    """(step, read(step)) of the workdir's checkpoint `step`, by default of the newest
    complete one that `read` can read (`newest_readable`)."""
    root = epath.Path(workdir) / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(root))
    if not steps:
        raise PathError(f"{root} holds no complete checkpoint.")
    if step is not None and step not in steps:
        raise PathError(f"no checkpoint of step {step} in {root}; steps: {steps}.")
    return (step, read(step)) if step is not None else newest_readable(root, steps, read, set())


def read_meta(workdir: str | epath.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the workdir's checkpoint `step` (default: the newest whose meta can be
    read, `read_newest`)."""
    return read_newest(workdir, lambda step: meta_at(workdir, step), step)


def meta_at(workdir: str | epath.PathLike, step: int) -> dict:
    """The meta of the workdir's checkpoint `step`, a step `read_newest` found (no listing)."""
    path = epath.Path(workdir) / "checkpoints" / str(step) / "meta"
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def restore_part(workdir: str | epath.PathLike, step: int, part: Any) -> Any:
    """The subtree `part` of the saved state of checkpoint `step` (orbax partial restore),
    read onto its target shardings; nothing else of the state is read.

    `part` is a nested dict along the state's keys ending in abstract arrays
    (jax.ShapeDtypeStruct with .sharding), e.g. {"params": {"model": abstract_params}}.
    """
    args = ocp.args.PyTreeRestore(
        item=part,
        restore_args=ocp.checkpoint_utils.construct_restore_args(part),
        partial_restore=True,
    )
    path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(path, args=args)
