"""Evaluate a policy on a config's benchmarks: mean@k per benchmark (daro_jax.evaluation).

    python -m daro_jax.evaluate --config=configs/smollm2_135m.py --checkpoint=runs/x \\
        [--config.eval.k=4 --config.eval.temperature=0.6] [--output_dir=DIR] [--step=N]

--checkpoint is one of:
- a training workdir (it holds checkpoints/): the model params of its latest checkpoint
  (or of --step) are restored onto the model described by the config saved with that
  checkpoint (model.path, model.param_dtype, model.arch_overrides; the compute dtype is
  --config's). Only the params are read, nothing else of the training state, and nothing is
  written under checkpoints/, so a run can be evaluated while it trains;
- an HF checkpoint directory, a .gguf file, "smollm2-gguf" or a hub id: loaded as is;
- omitted: the config's model.path (the policy before training).

Benchmarks, k, temperature, … come from --config's `eval` section, the prompt format from
its `data` section (see `evaluation.eval_options`). The Markdown table is printed and saved
with the JSON as <output_dir>/eval_<label>.md and .json, where label is step<N> for a
workdir, else the checkpoint's file or folder name; output_dir defaults to the workdir for
a workdir and to the current directory otherwise. Local paths (--checkpoint, --output_dir and
the config's model.path, eval.benchmarks_dir) are made absolute first (`cli.resolve_path`).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from daro_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/smollm2_135m.py", "Recipe file with get_config().", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "A training workdir, an HF checkpoint directory, a .gguf file, 'smollm2-gguf' or a hub "
    "id; default: the config's model.path.",
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where eval_<label>.md/.json go (default: the workdir, else '.')."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    from daro_jax import eval_results, evaluation
    from daro_jax.models.model import SMOLLM2_ALIAS

    checkpoint = cli.resolve_path(_CHECKPOINT.value, keep=(SMOLLM2_ALIAS,))
    results, md_path = evaluation.run_evaluation(
        cli.with_local_paths(_CONFIG.value),
        checkpoint,
        cli.resolve_path(_OUTPUT_DIR.value, local=True),
        _STEP.value,
    )
    if jax.process_index() == 0:
        print(eval_results.markdown_table(results))
        print(f"wrote {md_path} and its .json")


if __name__ == "__main__":
    cli.run(main)
