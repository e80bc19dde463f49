"""`python -m daro_jax.plan --config=configs/X.py [--config.a.b=v] [--topology=NAME]
[--json=FILE] [--search] [--scaled] [--verbose]`: the TPU plan of a recipe, compiled ahead of
time (`daro_jax.plan.report`), or with --search its mesh search (`daro_jax.plan.search`)."""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from daro_jax import cli
from daro_jax.plan import report


def main() -> None:
    """Print the plan (exit status 1 when it does not fit; with --verbose, first each
    program's HBM bytes by op), or the mesh search's table (exit status 1 when no candidate
    fits). A local model.path is made absolute first (`cli`); the process only plans
    (`report.compile_only`)."""
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Recipe file with get_config().", lock_config=True
    )
    topology_flag = flags.DEFINE_string(
        "topology", None, "libtpu topology, e.g. v5p:2x4x4 (default: config.tpu.accelerator's)."
    )
    json_flag = flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
    verbose_flag = flags.DEFINE_bool(
        "verbose", False, "Also print each program's largest HBM byte counts by op."
    )
    search_flag = flags.DEFINE_bool(
        "search", False, "Compile the candidate meshes and print them ranked (plan/search.py)."
    )
    scaled_flag = flags.DEFINE_bool(
        "scaled",
        False,
        "Compile {} and {} layers and extrapolate to the model's depth (less memory and time "
        "than a whole compile).".format(*report.SCALE_LAYERS),
    )
    flagged = (config_flag, topology_flag, json_flag, search_flag, scaled_flag, verbose_flag)
    for flag in flagged:  # --help lists the main module's flags
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag.name])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if config_flag.value is None:
            raise app.UsageError("--config=configs/<recipe>.py is required.")
        config = cli.with_local_paths(config_flag.value)
        report.compile_only(config.tpu.accelerator)
        title = flags.FLAGS["config"].config_filename
        if search_flag.value:
            from daro_jax.plan import search

            try:
                ranked = search.search(config, topology_flag.value)
            except ValueError as e:
                print(e)
                return 1
            print(search.format_table(ranked, report.topology(config, topology_flag.value)))
            return 0
        make = report.scaled_plan if scaled_flag.value else report.make_plan
        result = make(config, topology_flag.value, title=title)
        if verbose_flag.value:
            print(result.breakdown())
        print(result.format())
        if json_flag.value:
            with open(json_flag.value, "w") as f:
                json.dump(result.to_json(), f, indent=1)
        return 0 if result.fits else 1

    cli.run(run)


if __name__ == "__main__":
    main()
