"""Read-only access to a workdir's checkpoints (evaluation restores the model params
alone): it never cleans up, so a save in flight of a running training is left alone, unlike
opening a `Checkpointer`."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from daro_jax.errors import PathError


def has_checkpoints(workdir: str | epath.PathLike) -> bool:
    """Whether `workdir` is a training workdir (it has a checkpoints/ folder)."""
    return (epath.Path(workdir) / "checkpoints").is_dir()


def read_meta(workdir: str | epath.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the workdir's checkpoint `step` (default: the latest complete one)."""
    root = epath.Path(workdir) / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(root))
    if not steps:
        raise PathError(f"{root} holds no complete checkpoint.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PathError(f"no checkpoint of step {step} in {root}; steps: {steps}.")
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
