"""Checkpoints of a training run: `Checkpointer` (orbax save / resume of the whole train
state, skipping a checkpoint that cannot be read; `manager`), whether a run may resume from
one (`compat`), read-only access for evaluation (`readonly`), and preemption (SIGTERM;
`preemption`).

Typical loop (in `handling_sigterm()`):

    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, every=config.train.ckpt_every)
    restored = ckpt.restore(abstract_state, check_meta=lambda m: check_compatible(m["config"], c))
    for step in range(start, steps):
        state = train_step(state, ...)
        stop = any_process_preempted()
        ckpt.save(step + 1, state, {"data_position": ..., "config": ...}, force=stop)
        if stop:
            break
    ckpt.save(final_step, state, meta, force=True)
    ckpt.close()
"""

from daro_jax.checkpoint.compat import (
    COMPAT_DEFAULTS,
    COMPAT_KEYS,
    IncompatibleCheckpointError,
    check_base,
    check_compatible,
)
from daro_jax.checkpoint.manager import Checkpointer, CheckpointSaveError
from daro_jax.checkpoint.preemption import (
    any_process_preempted,
    clear_preemption,
    handling_sigterm,
    install_sigterm_handler,
    preemption_requested,
)
from daro_jax.checkpoint.readonly import (
    has_checkpoints,
    meta_at,
    read_meta,
    read_newest,
    restore_part,
)

__all__ = [
    "COMPAT_DEFAULTS",
    "COMPAT_KEYS",
    "CheckpointSaveError",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "any_process_preempted",
    "check_base",
    "check_compatible",
    "clear_preemption",
    "handling_sigterm",
    "has_checkpoints",
    "install_sigterm_handler",
    "meta_at",
    "preemption_requested",
    "read_meta",
    "read_newest",
    "restore_part",
]
