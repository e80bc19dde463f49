"""`python -m daro_jax.plan --config=configs/X.py [--config.a.b=v] [--topology=NAME]
[--json=FILE] [--search]`: the TPU plan of a recipe, compiled ahead of time (`report.main`)."""

from daro_jax.plan import report

if __name__ == "__main__":
    report.main()
