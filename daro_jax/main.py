"""Entry point: `python -m daro_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v]`.

Wires flags, multi-host initialisation and the RL loop; everything else lives in
daro_jax/train/loop.py. A workdir that already holds a checkpoint resumes from it; one
whose checkpoint is already at train.steps says so and exits 0. Local paths (workdir,
model.path, data.source, eval.benchmarks_dir) are made absolute here (`cli.resolve_path`);
`gs://` URLs stay as they are. The console shows the run's own lines; `--verbosity=0` adds
the libraries' INFO logs.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from daro_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/smollm2_135m.py", "Recipe file with get_config().", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: logs and checkpoints.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' does it on multi-host TPU or when "
    "JAX_COORDINATOR_ADDRESS is set (then JAX_NUM_PROCESSES and JAX_PROCESS_ID too).",
)


def init_distributed(mode: str) -> None:
    """Start jax.distributed for multi-process runs (TPU pods or CPU processes with gloo)."""
    import jax

    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    on_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if mode == "off" or (mode == "auto" and not coordinator and not on_pod):
        return
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (a directory for logs and checkpoints).")
    init_distributed(_DISTRIBUTED.value)
    if _CONFIG.value.plan.check:  # before any weight is read
        from daro_jax import plan

        plan.check(cli.with_local_paths(_CONFIG.value))
    from daro_jax.train import loop

    workdir = cli.resolve_path(_WORKDIR.value, local=True)
    loop.train(cli.with_local_paths(_CONFIG.value), workdir)


if __name__ == "__main__":
    cli.run(main)
