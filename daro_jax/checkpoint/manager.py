"""Orbax save / resume of the whole training state: `Checkpointer`.

A checkpoint of step s lives in `<workdir>/checkpoints/<s>/` and holds two items:

- `state`: any pytree of jax arrays (params, optimizer state, DARO weights, step, PRNG key as
  `jax.random.key_data` or a typed key), saved sharded by every process together;
- `meta`: a small JSON dict (data iterator position, the config as a dict, …).

Orbax writes a step into `<s>.orbax-checkpoint-tmp` and renames it when complete (on GCS it
writes `commit_success.txt` last), so a crash mid-save leaves a directory that `latest_step`
ignores and the next `Checkpointer` deletes. Saves are asynchronous: `save` returns once the
arrays are copied to host memory (so the state may be donated to the next step right away) and
the files are written in the background; `wait`/`close` block until they are on disk.

A save that fails (in the background or not) raises `CheckpointSaveError`, naming its step and
the cause, at the first `save`, `check`, `wait` or `close` after the failure: `save` calls
`check` every step, so a loop that calls it every step stops at the step after. Old
checkpoints are deleted only after a newer one is complete, so the last good one stays. A
checkpoint whose files cannot be read (a half-finished copy) is skipped on restore, with a
warning naming it and the cause.

Multi-host: every process must make the same calls (`save`, `restore`,
`preemption.any_process_preempted`) in the same order; orbax coordinates the writes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from daro_jax.checkpoint import readonly
from daro_jax.errors import PathError, UserError

_META_ONLY = ocp.args.Composite(meta=ocp.args.JsonRestore())


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the run must stop (earlier checkpoints are intact)."""


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run in `<workdir>/checkpoints`.

    `every` is the save interval in steps (`should_save(step)` ⇔ every > 0 and step % every
    == 0); `save(..., force=True)` saves at any step (end of run, preemption).
    `workdir` is a local path or a `gs://` URL. `async_save=False` makes `save` block until
    the checkpoint is on disk.
    """

    def __init__(
        self, workdir: str | epath.PathLike, keep: int, every: int, async_save: bool = True
    ):
        if keep < 1:
            raise ValueError(
                f"keep={keep}: must keep at least 1 checkpoint (train.keep_checkpoints)."
            )
        if every < 0:
            raise ValueError(
                f"every={every}: must be ≥ 0 steps (train.ckpt_every; 0 = only forced)."
            )
        if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
            raise PathError(
                f"workdir {workdir} is a file; give a folder (created when missing) for the "
                "run's checkpoints and logs."
            )
        self.every = every
        self.directory = epath.Path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._saving: int | None = None  # the step of the last save not yet checked
        self._unreadable: set[int] = set()  # steps whose files could not be read (warned)

    def should_save(self, step: int) -> bool:
        """True when `step` falls on the save interval."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
        """Saves `state` and `meta` as step `step` if it is due (or `force`) and not saved yet.

        Returns whether a save was started. First raises CheckpointSaveError if an earlier
        save has failed (`check`). Collective: call it on every process.
        """
        self.check()
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        _check_json(meta)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
        )
        self.wait()  # orbax waits for the previous save here anyway; name its failure
        with self._failure(step):
            started = self._manager.save(step, args=args, force=True)
        self._saving = step if started else None
        return started

    def check(self) -> None:
        """Raises CheckpointSaveError if the last save has failed; does not wait for a save
        still in flight."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk and of a save in flight, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest of `all_steps()`, or None when the run has no checkpoint.

        On opening, only complete checkpoints count (a crash mid-save leaves none).
        """
        return self._manager.latest_step()

    def restore_meta(self, step: int | None = None) -> dict | None:
        """The `meta` dict of `step` (default: the newest readable checkpoint, `_newest`), or
        None when there is no checkpoint."""
        found = self._newest(step, lambda s: self._manager.restore(s, args=_META_ONLY).meta)
        return None if found is None else found[1]

    def restore(
        self,
        target_state: Any,
        step: int | None = None,
        check_meta: Callable[[dict], None] | None = None,
    ) -> tuple[Any, dict] | None:
        """Restores `(state, meta)` of `step` (default: the newest readable checkpoint,
        `_newest`), or None without a checkpoint. `check_meta(meta)` runs before the state
        is read (e.g. `check_compatible` of its config): its UserError is raised.

        `target_state` is the abstract state of this run: a pytree of `jax.ShapeDtypeStruct`
        with `.sharding` (e.g. `jax.eval_shape` of the jitted init with out_shardings). Each
        array is read straight onto its target sharding (any mesh, any layout); structure,
        shapes and dtypes must match the checkpoint exactly.
        """

        def read(step):
            if check_meta is not None:
                check_meta(self._manager.restore(step, args=_META_ONLY).meta)
            self._check_target(step, target_state)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(target_state), meta=ocp.args.JsonRestore()
            )
            restored = self._manager.restore(step, args=args)
            return restored.state, restored.meta

        found = self._newest(step, read)
        return None if found is None else found[1]

    def _newest(self, step: int | None, read: Callable[[int], Any]) -> tuple[int, Any] | None:
        """(step, read(step)) of `step`, or by default of the newest checkpoint `read` can
        read (`readonly.newest_readable`: an unreadable one skipped with a warning, once)."""
        if step is not None:
            return self._resolve_step(step), read(self._resolve_step(step))
        return readonly.newest_readable(self.directory, self.all_steps(), read, self._unreadable)

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is on disk; raises CheckpointSaveError
        if it failed."""
        step, self._saving = self._saving, None
        with self._failure(step):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight, releases orbax's resources, then raises
        CheckpointSaveError if the save failed."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextlib.contextmanager
    def _failure(self, step: int | None):
        """Turns an exception of orbax saving `step` into CheckpointSaveError."""
        try:
            yield
        except Exception as e:
            self._manager.reload()  # the steps on disk (orbax drops old ones from its list early)
            kept = [s for s in self.all_steps() if s != step]
            last = (
                f"the last complete checkpoint, step {kept[-1]}, is intact: fix the cause and "
                "run the same command again to resume from it"
                if kept
                else "there is no earlier checkpoint"
            )
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} in {self.directory} failed "
                f"({type(e).__name__}: {e}); the run stops here; {last}."
            ) from e

    def _resolve_step(self, step: int | None) -> int | None:
        if step is None:
            return self.latest_step()
        if step not in self.all_steps():
            raise PathError(
                f"No checkpoint of step {step} in {self.directory}; "
                f"available steps: {self.all_steps()}."
            )
        return step

    def _check_target(self, step: int, target_state: Any) -> None:
        """Raises ValueError naming every leaf whose path, shape or dtype differs on disk."""
        saved = ocp.tree.to_flat_dict(self._manager.item_metadata(step).state.tree)
        wanted = ocp.tree.to_flat_dict(target_state)
        problems = [
            f"{_path(p)}: in this run, not in the checkpoint" for p in wanted.keys() - saved.keys()
        ]
        problems += [
            f"{_path(p)}: in the checkpoint, not in this run" for p in saved.keys() - wanted.keys()
        ]
        for p in sorted(wanted.keys() & saved.keys()):
            shape, dtype = _stored_shape_dtype(wanted[p])
            if (tuple(saved[p].shape), np.dtype(saved[p].dtype)) != (shape, dtype):
                problems.append(
                    f"{_path(p)}: checkpoint {np.dtype(saved[p].dtype)}{list(saved[p].shape)}, "
                    f"this run {dtype}{list(shape)}"
                )
        if problems:
            raise UserError(
                f"The checkpoint of step {step} in {self.directory} does not match this run's "
                "state (different model or optimizer config?):\n  "
                + "\n  ".join(sorted(problems))
                + "\nResume with the config that wrote it, or use a fresh --workdir."
            )


def _path(keys: Sequence[str]) -> str:
    return "/".join(str(k) for k in keys)


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype as stored on disk: a typed PRNG key is stored as its key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _check_json(meta: Mapping[str, Any]) -> None:
    for key, value in meta.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"checkpoint meta[{key!r}] is not JSON-serialisable ({e}); store plain "
                "dicts/lists/str/numbers there (e.g. config.to_dict(), int(position))."
            ) from e
