"""The jitted programs of one RL step, built in one place for training and for the plan.

`build` makes, from a recipe and its model's config, what one RL step runs: the abstract
train state (`state.abstract_state`) and its optimizer, the update's static settings, the
prompt blocks, the logprob passes the step makes before its updates, the sampler, the
jitted update (state donated), the jitted logprob pass and the jitted row selection of a
minibatch. Training (`train.loop.build`)
runs these programs on its arrays; the TPU plan (`daro_jax.plan`) compiles the same
programs on `longest_inputs`, their abstract arguments (ShapeDtypeStructs with their
shardings) at the step's longest shapes, so that the plan is worth what training runs.
With LoRA the state trains the adapters and the programs also take the frozen base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import hosts, sharding
from daro_jax.algo import presets
from daro_jax.models import known, lora, packed
from daro_jax.models.config import ModelConfig
from daro_jax.sampling import completions, sampler
from daro_jax.train import packing, rollout, state, update

OLD, REF = "old_logp", "ref_logp"  # the logprob passes: old policy, reference
PER_TOKEN = ("loss_mask", "sampler_logp", "sampler_logp_full")  # `update.step_inputs`' [B·K, N]


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    """The programs of one RL step and what they are built with (`build`)."""

    cfg: ModelConfig  # the model's config with the recipe's remat
    abstract: dict  # the train state's ShapeDtypeStructs with their shardings
    base: dict | None  # LoRA: the frozen base's ShapeDtypeStructs (`state.abstract_base`)
    tx: optax.GradientTransformation
    settings: update.UpdateSettings
    blocks: int  # prompt blocks of a minibatch (`sharding.prompt_blocks`)
    block_rows: int  # packed rows of each block per micro-batch (train.block_rows)
    passes: tuple[str, ...]  # the logprob passes before the updates: OLD, REF
    sample: sampler.Sampler
    update: Callable  # jitted `update.update_step`, the state donated
    logprobs: Callable  # jitted `update.batch_logprobs`
    take_rows: Callable  # jitted `update.take_rows`: a minibatch's per-row arrays


def build(
    config, model_cfg: ModelConfig, spec: presets.AlgoSpec, mesh: Mesh, prompt_len: int, stop_ids
) -> StepPrograms:
    """The step's programs for `config` on `mesh` (module docstring): `model_cfg` is the
    model's architecture (`models.load`/`models.architecture`), `prompt_len` the sampler's
    prompt width and `stop_ids` its stop tokens (`stop_token_ids`). One update per step is
    on-policy (`update.UpdateSettings.on_policy`: no old-policy pass unless the KL is in
    the reward); kl_beta > 0 adds the reference pass."""
    t, s = config.train, config.sampler
    cfg = model_cfg.replace(remat=bool(config.model.remat))
    abstract = state.abstract_state(config, cfg, spec, mesh)
    updates = state.updates_per_step(t)
    # The old policy's pass: several updates a step, or the KL in the reward (under π_old).
    passes = (OLD,) * (updates > 1 or spec.kl_in_reward) + (REF,) * (spec.kl_beta > 0)
    per_rows = (t.batch_prompts // t.minibatches) * spec.k
    rows = row_inputs(passes, per_rows, s.max_new_tokens, mesh)
    return StepPrograms(
        cfg=cfg,
        abstract=abstract,
        base=state.abstract_base(cfg, mesh),
        tx=state.optimizer(config, abstract["params"], spec),
        settings=update.UpdateSettings(
            cfg,
            spec,
            float(s.temperature),
            on_policy=updates == 1,
            frozen=tuple(config.optim.frozen),
        ),
        blocks=sharding.prompt_blocks(t.batch_prompts // t.minibatches, t.prompt_blocks, mesh),
        block_rows=t.block_rows,
        passes=passes,
        sample=rollout.make_sampler(s, cfg, spec.k, prompt_len, stop_ids, mesh),
        update=update.jit_update(mesh, state.shardings(abstract)),
        logprobs=update.jit_logprobs(mesh),
        take_rows=jax.jit(update.take_rows, out_shardings={n: x.sharding for n, x in rows.items()}),
    )


def stop_token_ids(path: str, cfg: ModelConfig, tokenizer) -> tuple[int, ...]:
    """The sampler's stop tokens: `completions.default_stop_token_ids` of the tokenizer, or the
    recorded ones of a paper model planned without its files (`models.known`)."""
    if tokenizer is None:
        return known.STOP_TOKEN_IDS[path]
    return completions.default_stop_token_ids(tokenizer, cfg)


def longest_inputs(p: StepPrograms, config, mesh: Mesh) -> dict[str, tuple[tuple, dict]]:
    """Each program's (arguments, keyword arguments) as training passes them, the arrays as
    ShapeDtypeStructs with the shardings training gives them, for the longest step of
    `config`: prompts p.sample.prompt_len wide, every completion max_new_tokens long, so
    every packed chunk slot is filled. Keys "sampler" (policy params, prompt_tokens,
    prompt_mask, key), "logprob pass" (policy params, packed batch; settings) and "update"
    (state, minibatch; optimizer, settings, LoRA base). The policy's params are the trained
    ones, with LoRA the base and the adapters together (`lora.combine`)."""
    t, k, n = config.train, p.settings.spec.k, config.sampler.max_new_tokens
    b, per, width = t.batch_prompts, t.batch_prompts // t.minibatches, p.sample.prompt_len
    params = lora.combine(p.base, p.abstract["params"]["model"])
    replicated = NamedSharding(mesh, PartitionSpec())
    prompts = _rows((b, width), jnp.int32, mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    batch = _packed(p, per, width, n, mesh) | row_inputs(p.passes, per * k, n, mesh)
    settings = p.settings
    return {
        "sampler": ((params, prompts, prompts, key), {}),
        "logprob pass": ((params, _packed(p, b, width, n, mesh)), {"s": settings}),
        "update": ((p.abstract, batch), {"tx": p.tx, "s": settings, "base": p.base}),
    }


def row_inputs(passes: tuple[str, ...], rows: int, n: int, mesh: Mesh) -> dict:
    """The per-row arrays of an update over `rows` rollouts of up to n tokens, abstract:
    PER_TOKEN and the logprob passes' outputs (old_logp only where its pass runs) [rows, n]
    float32 (each row a completion's tokens), advantages [rows] float32 and group_ids [rows]
    int32, with their rows over the batch shards (`update.step_inputs`, `update.take_rows`)."""
    names = dict.fromkeys((*PER_TOKEN, *passes))
    out = {name: _rows((rows, n), jnp.float32, mesh) for name in names}
    out["advantages"] = _rows((rows,), jnp.float32, mesh)
    out["group_ids"] = _rows((rows,), jnp.int32, mesh)
    return out


def _rows(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    """An abstract array with its rows over the mesh's batch shards (`hosts.to_global`)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=hosts.batch_sharding(mesh, shape))


def _packed(p: StepPrograms, b: int, width: int, n: int, mesh) -> dict:
    """The packed arrays of b prompts (`update.packed_batch`) with every chunk slot filled:
    prompt tokens and mask [b, P], chunk arrays [G, S, R, N], n_chunks."""
    k, rows = p.settings.spec.k, p.block_rows
    slots = packing.chunk_slots(b // p.blocks, k, rows)
    out = {name: _rows((b, width), jnp.int32, mesh) for name in ("prompt_tokens", "prompt_mask")}
    shape = (p.blocks, slots, rows, n)
    out |= {name: _rows(shape, jnp.int32, mesh) for name in packed.CHUNK_INPUTS}
    replicated = NamedSharding(mesh, PartitionSpec())
    out["n_chunks"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return out
