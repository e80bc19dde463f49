"""The plan's depth scaling checked against a whole compile: `report.scaled_plan` (2 and 4
layers, extrapolated) vs `report.make_plan` of all the layers, for one recipe cut to
`--layers` layers (so that the whole compile fits this machine's memory).

    nice -n 5 python -m bench.plan_scaling [--config configs/qwen2_5_math_1_5b.py] [--layers 8]

Prints, for the step's phases, the peak per chip, the update's MFU and the decode's share of
its HBM roofline, the whole compile's figure, the scaled one and their ratio. Compiler
estimates, not measurements (libtpu for the recipe's TPU, no TPU needed).

Last line: `plan scaled from 2 and 4 layers vs whole, L layers: step X.XXx, peak Y.YYx`.
"""

from __future__ import annotations

import argparse
import importlib.util


def load_config(path: str, layers: int):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.arch_overrides.num_hidden_layers = layers
    return config


def figures(p) -> dict[str, float]:
    """The figures compared: seconds by phase and of the step, peak GiB, MFU, roofline share."""
    phases = p.step_seconds()
    return {
        **{f"{name} (s)": seconds for name, seconds in phases.items() if name != "host"},
        "step (s)": sum(phases.values()),
        "peak per chip (GiB)": p.peak_program.peak / 2**30,
        "update MFU": p.update_mfu(),
        "decode vs HBM roofline": p.decode_roofline_share(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/qwen2_5_math_1_5b.py")
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    from daro_jax import plan

    config = load_config(args.config, args.layers)
    plan.compile_only(config.tpu.accelerator)
    whole = figures(plan.make_plan(config))
    scaled = figures(plan.scaled_plan(config))
    print(f"{args.config} at {args.layers} layers, {config.tpu.accelerator} (compiler estimates)")
    print(f"{'figure':<24} {'whole':>10} {'scaled':>10} {'scaled/whole':>13}")
    for name, value in whole.items():
        ratio = scaled[name] / value if value else float("nan")
        print(f"{name:<24} {value:>10.4g} {scaled[name]:>10.4g} {ratio:>12.3f}x")
    step = scaled["step (s)"] / whole["step (s)"]
    peak = scaled["peak per chip (GiB)"] / whole["peak per chip (GiB)"]
    print(
        f"plan scaled from 2 and 4 layers vs whole, {args.layers} layers: "
        f"step {step:.2f}x, peak {peak:.2f}x"
    )


if __name__ == "__main__":
    main()
