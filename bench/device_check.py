"""The first check of the plan's cost model against a real chip: one GPU runs the 1.5B-shaped
recipe's RL step, program by program, beside the plan's estimate of the same executable.

    python -m bench.device_check [--config qwen2_5_math_1_5b] [--steps 3]
        [--chip h100|h200] [--set train.batch_prompts=16 ...]

(--config: a recipe in configs/, by name.)

On one device (an H100 or H200; the chip is read from the device's name, or --chip), with
random weights of the recipe's architecture (`models.architecture`: the paper models need
no files) and random prompts of sampler.max_prompt_tokens tokens, it runs `--steps` RL steps
of the recipe's own programs (`train.jitted.build`, which training and the plan call):
the sampler, the logprob passes (when the step has them) and the updates (`train.loop.learn`,
training's own code from rollouts to updates), with rewards drawn at random (no verifier:
the device's work does not depend on them). Each program's calls are timed to the
device's completion (`jax.block_until_ready`); the first step (compilation) is not counted.

The estimate of each program is the plan's roofline (`plan.costs.program_parts` of the
executable that ran, read back from the persistent compilation cache, costed by the
device's own XLA cost analysis; `plan.chips.GPUS`' peak FLOP/s and HBM bandwidth), with the
loop trip counts the step actually ran (the update's packed chunks; the decode's steps).
The last line prints measured / estimated seconds per program. The default overrides cut the
batch to 16 prompts so that the whole check, compiles included, stays within 8 minutes on
an H100 (an estimate: it has not been run on a GPU yet).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import tpu_plan

DEFAULTS = {"train.batch_prompts": 16, "train.minibatches": 2, "train.steps": 3}


class Timed:
    """A jitted program whose calls are timed to completion; keeps each call's abstract
    arguments and its loop trip count (`trips(args, out)`) for the estimate."""

    def __init__(self, fn, trips):
        self.fn, self.trips, self.calls = fn, trips, []

    def __call__(self, *args, **kwargs):
        abstract = jax.tree.map(_abstract, (args, kwargs))
        start = time.perf_counter()
        out = jax.block_until_ready(self.fn(*args, **kwargs))
        seconds = time.perf_counter() - start
        self.calls.append((abstract, self.trips(args, out), seconds))
        return out

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def decode_trips(sample, args, out) -> tuple[int, ...]:
    """The decode stages' steps of one sampler call: the first stage runs until its last
    row stops, N − 1 steps when none stops early (random weights rarely stop)."""
    longest = int(np.max(np.asarray(out["lengths"])))
    stages = sample.stage_sizes(int(args[1].shape[0]) * sample.k)
    return (max(longest - 1, 0),) + (0,) * (len(stages) - 1)


def chunk_trips(args, out) -> tuple[int, ...]:
    return (int(args[1]["n_chunks"]),)


def device_chip(name: str | None):
    from daro_jax.plan import chips

    kind = jax.devices()[0].device_kind
    key = name or next((k for k in chips.GPUS if k in kind.lower()), None)
    if key not in chips.GPUS:
        raise SystemExit(
            f"bench/device_check: the device {kind!r} is not one of {sorted(chips.GPUS)}; "
            "pass --chip=h100 or --chip=h200 to compare with that chip's figures."
        )
    return key, chips.GPUS[key]


def build_run(config):
    """A `train.loop.Run` of `config` on this process's devices with random weights, no
    data and no tokenizer (the device check draws its prompts)."""
    from daro_jax import models, sharding
    from daro_jax.algo import losses, presets
    from daro_jax.models import decoder, lora
    from daro_jax.train import jitted, loop, rollout, state

    mesh = sharding.make_mesh(config.mesh.shape)
    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    m = config.model
    cfg, tokenizer = models.architecture(m)
    stop_ids = jitted.stop_token_ids(m.path, cfg, tokenizer)
    p = jitted.build(config, cfg, spec, mesh, config.sampler.max_prompt_tokens, stop_ids)
    shardings = models.param_shardings(p.cfg, mesh)
    init = jax.jit(decoder.init_params, static_argnums=0, out_shardings=shardings)
    params = init(p.cfg, jax.random.key(config.seed))
    base, trained = state.frozen(p.cfg, params), state.trained(p.cfg, params)
    ref_params = None
    if spec.kl_beta > 0:
        ref_params = lora.combine(base, jax.tree.map(jnp.copy, trained))
    return loop.Run(
        config=config,
        mesh=mesh,
        spec=spec,
        model=models.Model(p.cfg, None, tokenizer, mesh),
        base=base,
        base_meta=None,
        examples=[],
        iterator=None,
        state=state.init_state(trained, spec, p.tx, p.abstract),
        ref_params=ref_params,
        programs=p,
        advantages=jax.jit(functools.partial(rollout.flat_advantages, spec=spec)),
        kl_penalty=jax.jit(functools.partial(losses.kl_reward_penalty, spec=spec)),
        rollout_key=rollout.jit_rollout_key(config.seed, mesh),
        n_params=sum(x.size for x in jax.tree.leaves(params)),
    )


def run_check(config, steps: int, chip_name: str | None) -> dict[str, tuple[float, float]]:
    """{program: (measured seconds per call, estimated seconds per call)} over steps 2…"""
    from daro_jax import hosts
    from daro_jax.plan import costs
    from daro_jax.plan.chips import roofline
    from daro_jax.train import loop, rollout

    chip_key, chip = device_chip(chip_name)
    run = build_run(config)
    p = run.programs
    timed = {
        "sampler": Timed(p.sample.jitted, functools.partial(decode_trips, p.sample)),
        "logprob pass": Timed(p.logprobs, chunk_trips),
        "update": Timed(p.update, chunk_trips),
    }
    p.sample.jitted = timed["sampler"]
    run.programs = dataclasses.replace(p, logprobs=timed["logprob pass"], update=timed["update"])
    b, k, width = config.train.batch_prompts, run.spec.k, config.sampler.max_prompt_tokens
    rng = np.random.default_rng(config.seed)
    for step in range(steps):
        prompts = rng.integers(0, run.model.config.vocab_size, (b, width), dtype=np.int32)
        mask = np.ones((b, width), np.int32)
        out = p.sample(
            loop.policy(run),
            hosts.to_global(prompts, run.mesh),
            hosts.to_global(mask, run.mesh),
            run.rollout_key(step, 0),
        )
        out = {n: hosts.local_rows(x) for n, x in out.items()}
        drawn = {n: out[n].reshape(b, k, *out[n].shape[1:]) for n in rollout.SAMPLED}
        drawn["prompt_tokens"], drawn["prompt_mask"] = prompts, mask
        scores = rng.integers(0, 2, (b, k)).astype(np.float32)
        loop.learn(run, step, scores, drawn)
        print(
            f"step {step}: "
            + ", ".join(f"{n} {t.calls[-1][2]:.2f} s" for n, t in timed.items() if t.calls),
            flush=True,
        )
    results = {}
    for name, t in timed.items():
        if not t.calls:
            continue
        (args, kwargs), trips, _ = t.calls[-1]
        compiled = t.lower(*args, **kwargs).compile()
        platform = jax.devices()[0].platform
        parts = costs.program_parts(compiled.as_text(), trips, platform)
        estimate = sum(part.trips * roofline(part.per_trip, chip) for part in parts)
        per_step = len(t.calls) // steps
        measured = statistics.median(c[2] for c in t.calls[per_step:])
        results[name] = (measured, estimate)
    print(
        f"chip figures: {chip_key} ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{chip.hbm_bandwidth / 1e12:.2f} TB/s HBM); device: {jax.devices()[0].device_kind}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="qwen2_5_math_1_5b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chip", default=None, help="h100 or h200 (default: the device's)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides a.b=v")
    args = parser.parse_args()
    start = time.perf_counter()
    overrides = dict(DEFAULTS)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    if args.steps < 2:
        raise SystemExit("bench/device_check: --steps must be ≥ 2 (the first step compiles).")
    config = tpu_plan.load_recipe(args.config, overrides)
    with tempfile.TemporaryDirectory() as cache:
        # The estimate reads back the executables that ran (same compile, from this cache).
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        results = run_check(config, args.steps, args.chip)
    for name, (measured, estimate) in results.items():
        print(
            f"{name}: measured {measured:.4g} s, plan estimate {estimate:.4g} s "
            f"(measured / estimate {measured / estimate:.2f})"
        )
    print(f"device check done in {time.perf_counter() - start:.0f} s")
    ratios = ", ".join(f"{n} {m / e:.2f}x" for n, (m, e) in results.items())
    print(f"measured / plan estimate: {ratios}")


if __name__ == "__main__":
    main()
