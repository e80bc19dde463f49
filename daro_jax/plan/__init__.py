"""The TPU plan (`python -m daro_jax.plan`): `report` (the plan of a recipe, its table and
verdict), `programs` (the step's programs compiled ahead of time), `costs` (FLOPs and bytes
from the compiled HLO), `chips` (TPU chips and topologies)."""

from daro_jax.plan.report import Plan, check, compile_only, make_plan, scaled_plan

__all__ = ["Plan", "check", "compile_only", "make_plan", "scaled_plan"]
