"""Orbax save / resume of the whole training state, read-only access to a workdir's
checkpoints (`has_checkpoints`, `read_meta`, `restore_part`: evaluation restores the model
params alone), and preemption (SIGTERM) handling.

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
checkpoints are deleted only after a newer one is complete, so the last good one stays.

Multi-host: every process must make the same calls (`save`, `restore`, `any_process_preempted`)
in the same order; orbax coordinates the writes.

Typical loop:

    install_sigterm_handler()
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, every=config.train.ckpt_every)
    if (meta := ckpt.restore_meta()) is not None:
        check_compatible(meta["config"], config.to_dict())
        state, meta = ckpt.restore(abstract_state)
    for step in range(start, steps):
        state = train_step(state, ...)
        stop = any_process_preempted()
        ckpt.save(step + 1, state, {"data_position": ..., "config": ...}, force=stop)
        if stop:
            break
    ckpt.save(final_step, state, meta, force=True)
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# Config fields that must not change when a run resumes from its checkpoint.
# algo.daro_parameterization: the stored DARO parameters are w or ln w.
COMPAT_KEYS = (
    "model.path",
    "model.lora.rank",
    "model.lora.alpha",
    "model.lora.targets",
    "algo.name",
    "algo.k",
    "algo.daro_parameterization",
    "train.batch_prompts",
    "data.source",
)

_ABSENT = "<absent>"
# The value of a compat field absent from a checkpoint's config (written before it existed):
# its default in configs/base.py.
COMPAT_DEFAULTS = {
    "model.lora.rank": 0,
    "model.lora.alpha": 16.0,
    "model.lora.targets": "q,k,v,o,gate,up,down",
}


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written by a run whose config differs in a field that matters."""


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
        """The `meta` dict of `step` (default: latest), or None when there is no checkpoint."""
        step = self._resolve_step(step)
        if step is None:
            return None
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restores `(state, meta)` of `step` (default: latest), or None without a checkpoint.

        `target_state` is the abstract state of this run: a pytree of `jax.ShapeDtypeStruct`
        with `.sharding` (e.g. `jax.eval_shape` of the jitted init with out_shardings). Each
        array is read straight onto its target sharding (any mesh, any layout); structure,
        shapes and dtypes must match the checkpoint exactly.
        """
        step = self._resolve_step(step)
        if step is None:
            return None
        self._check_target(step, target_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state), meta=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.meta

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
            raise FileNotFoundError(
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
            raise ValueError(
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


def _as_dict(config: Mapping[str, Any] | str) -> dict:
    """A config as plain JSON data (tuples become lists), from a dict, ConfigDict or JSON str."""
    if isinstance(config, str):
        return json.loads(config)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def check_compatible(
    saved_config: Mapping[str, Any] | str,
    current_config: Mapping[str, Any] | str,
    keys: Sequence[str] = COMPAT_KEYS,
) -> None:
    """Raises IncompatibleCheckpointError naming each dotted key whose value differs.

    Configs are nested dicts, ConfigDicts or their JSON strings; keys are dotted paths
    ("algo.k"). Other fields (learning rate, steps, logging) may change on resume.
    """
    saved, current = _as_dict(saved_config), _as_dict(current_config)

    def value(config, key):
        found = _lookup(config, key)
        return COMPAT_DEFAULTS.get(key, found) if found == _ABSENT else found

    diffs = [
        f"{key}: checkpoint {value(saved, key)!r}, this run {value(current, key)!r}"
        for key in keys
        if value(saved, key) != value(current, key)
    ]
    if diffs:
        raise IncompatibleCheckpointError(
            "The checkpoint in --workdir was written by a run with a different config:\n  "
            + "\n  ".join(diffs)
            + "\nSet these fields back to the checkpoint's values to resume, "
            "or pass a fresh --workdir to start a new run."
        )


def check_base(meta: Mapping[str, Any], base: Mapping[str, str]) -> None:
    """Raises IncompatibleCheckpointError when a LoRA checkpoint's adapters were trained on
    another base than this run's: meta["base"] and `base` are {"path", "digest"} (the base's
    model.path and `models.lora.base_digest`)."""
    saved = meta.get("base")
    if saved is None or saved["digest"] == base["digest"]:
        return
    raise IncompatibleCheckpointError(
        f"The checkpoint's LoRA adapters were trained on the base {saved['path']} (digest "
        f"{saved['digest'][:12]}), but this run's base {base['path']} has different weights "
        f"(digest {base['digest'][:12]}); load the base the adapters were trained on, or pass "
        "a fresh --workdir."
    )


# Read-only access (evaluation): it never cleans up, so a save in flight of a running
# training is left alone, unlike opening a `Checkpointer`.


def has_checkpoints(workdir: str | epath.PathLike) -> bool:
    """Whether `workdir` is a training workdir (it has a checkpoints/ folder)."""
    return (epath.Path(workdir) / "checkpoints").is_dir()


def read_meta(workdir: str | epath.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the workdir's checkpoint `step` (default: the latest complete one)."""
    root = epath.Path(workdir) / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(root))
    if not steps:
        raise FileNotFoundError(f"{root} holds no complete checkpoint.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {root}; steps: {steps}.")
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(root / str(step) / "meta")
    return step, meta


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


_PREEMPTED = threading.Event()


def install_sigterm_handler():
    """On SIGTERM, set the preemption flag instead of dying.

    TPU VMs get SIGTERM before preemption; the loop polls `any_process_preempted()`, finishes
    its step, saves and exits. Must be called from the main thread. Returns the previous
    handler (for `signal.signal(signal.SIGTERM, previous)`).
    """

    def handler(signum, frame):
        _PREEMPTED.set()

    return signal.signal(signal.SIGTERM, handler)


def preemption_requested() -> bool:
    """True once this process has received SIGTERM (after `install_sigterm_handler`)."""
    return _PREEMPTED.is_set()


def clear_preemption() -> None:
    """Resets the preemption flag."""
    _PREEMPTED.clear()


def any_process_preempted() -> bool:
    """True on every process when any process has received SIGTERM.

    Collective when there are several processes (an all-gather of one flag each): call it at
    the same point of the loop everywhere, so that all processes stop at the same step.
    """
    local = preemption_requested()
    if jax.process_count() == 1:
        return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.asarray(flags).any())
