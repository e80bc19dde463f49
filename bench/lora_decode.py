"""The LoRA sampler's decode step compiled for a TPU: adapters on the fly vs merged weights.

    nice -n 5 python -m bench.lora_decode [--config configs/llama8b_lora_v5e8.py]
        [--layers 4] [--accelerator v5e-8]

The sampler decodes the adapted policy. Two ways: the low-rank path in every decode step,
x·Wᵀ + s·(x·Aᵀ)·Bᵀ (what daro_jax runs: `layers.Linear` on the decode copy of base and
adapters), or W + s·B·A merged once per rollout into the decode copy the sampler already
makes (`lora.merged`, then a decoder without adapters). This compiles the recipe's sampler
both ways with libtpu for `--accelerator` (no TPU needed; `--layers` decoder layers, to keep
the compile short: per-layer costs scale) and prints, for each, the compiler's peak bytes
per chip and the roofline estimate of one decode step and of the code outside the decode
loop (prefill, decode copy, merge). Compiler estimates, not measurements.

Last line: `LoRA decode step, merged vs on the fly: X.XXx` (on-the-fly step time ÷ merged).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os


def load_config(path: str, layers: int, accelerator: str):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.arch_overrides.num_hidden_layers = layers
    config.tpu.accelerator = accelerator
    return config


@contextlib.contextmanager
def merged_decode():
    """Within: the sampler's decode copy is W + s·B·A (`lora.merged`) run without adapters."""
    from daro_jax.models import kv_cache, lora

    start, step = kv_cache.start, kv_cache.step

    def plain(cfg):
        return cfg.replace(lora_rank=0, lora_targets=())

    def merged_start(params, cfg, *args):
        return start(lora.merged(params, cfg), plain(cfg), *args)

    def plain_step(dparams, cfg, *args):
        return step(dparams, plain(cfg), *args)

    kv_cache.start, kv_cache.step = merged_start, plain_step
    try:
        yield
    finally:
        kv_cache.start, kv_cache.step = start, step


def sampler_costs(config, merged: bool) -> dict:
    """Compile the recipe's sampler (`plan.programs.step_programs`) and read its costs."""
    from daro_jax import sharding
    from daro_jax.algo import presets
    from daro_jax.plan import chips, programs
    from daro_jax.sampling import sampler

    name = chips.topology(config.tpu.accelerator)
    mesh = sharding.make_mesh(config.mesh.shape, chips.tpu_devices(name))
    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    sampler.make_sampler.cache_clear()
    with merged_decode() if merged else contextlib.nullcontext():
        built = programs.build(config, mesh, spec)
        program = programs.step_programs(config, built, mesh)[0]
        resident = programs.device_bytes(built.abstract) + programs.device_bytes(built.base)
        compiled = programs.compile_program(program, resident)
    chip = chips.chip(name)
    loops = [part for part in compiled.parts if part.dynamic]
    outside = [part for part in compiled.parts if not part.dynamic]
    return {
        "peak": compiled.peak,
        "step_s": chips.roofline(loops[0].per_trip, chip),
        "step_gib": loops[0].per_trip.bytes / 2**30,
        "outside_s": sum(p.trips * chips.roofline(p.per_trip, chip) for p in outside),
        "compile_s": compiled.compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/llama8b_lora_v5e8.py")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--accelerator", default="v5e-8")
    args = parser.parse_args()
    from daro_jax.plan import report

    report.compile_only(args.accelerator)
    config = load_config(os.path.abspath(args.config), args.layers, args.accelerator)
    print(f"{args.config} at {args.layers} layers on {args.accelerator} (compiler estimates)")
    out = {}
    for merged in (False, True):
        out[merged] = c = sampler_costs(config, merged)
        print(
            f"{'merged   ' if merged else 'on the fly'}: decode step {c['step_s'] * 1e3:.2f} ms "
            f"({c['step_gib']:.2f} GiB HBM), outside the decode loop {c['outside_s']:.3f} s, "
            f"peak {c['peak'] / 2**30:.2f} GiB per chip, compiled in {c['compile_s']:.0f} s",
            flush=True,
        )
    ratio = out[False]["step_s"] / out[True]["step_s"]
    print(f"LoRA decode step, merged vs on the fly: {ratio:.2f}x")


if __name__ == "__main__":
    main()
