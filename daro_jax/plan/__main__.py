"""`python -m daro_jax.plan`: `report.main`."""

from daro_jax.plan import report

if __name__ == "__main__":
    report.main()
