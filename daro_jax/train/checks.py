"""Config checks of a training run: every error a config can cause before any model or data
is loaded, each naming its field and what would fix it (`check_config`)."""

from __future__ import annotations

from jax.sharding import Mesh

from daro_jax import evaluation, sharding
from daro_jax.algo import presets
from daro_jax.errors import UserError


def check_config(config, mesh: Mesh, processes: int) -> None:
    """Raises ValueError naming the field when `config` cannot run on `mesh` with
    `processes` processes. Batch sizes must split evenly over processes, shards, minibatches
    and prompt blocks; with several processes each supplies only its own rows of the global
    arrays, which must therefore be sharded, not replicated, over the data shards. The
    algorithm's settings are checked by resolving its preset, the periodic evaluation's by
    `evaluation.check_options`."""
    t = config.train
    rows = t.batch_prompts * config.algo.k
    shards = sharding.batch_shards(mesh)
    if t.batch_prompts % processes:
        raise UserError(
            f"train.batch_prompts={t.batch_prompts} must be divisible by the number of "
            f"processes ({processes})."
        )
    if rows % shards:
        raise UserError(
            f"train.batch_prompts × algo.k = {rows} rollouts must be divisible by the "
            f"{shards} data shards of mesh.shape={tuple(config.mesh.shape)} (data × fsdp)."
        )
    if t.minibatches < 1 or t.batch_prompts % t.minibatches:
        raise UserError(
            f"train.minibatches={t.minibatches} must divide train.batch_prompts="
            f"{t.batch_prompts} (minibatches hold whole prompts)."
        )
    per_mb = t.batch_prompts // t.minibatches
    if t.prompt_blocks < 0 or t.block_rows < 1:
        raise UserError(
            f"train.prompt_blocks={t.prompt_blocks} must be ≥ 0 (0: one per data shard) and "
            f"train.block_rows={t.block_rows} ≥ 1."
        )
    blocks = sharding.prompt_blocks(per_mb, t.prompt_blocks, mesh)
    if per_mb % blocks or blocks % processes:
        raise UserError(
            f"train.prompt_blocks={blocks} must divide the {per_mb} prompts of a minibatch "
            f"and be a multiple of the {processes} processes."
        )
    if processes > 1 and (per_mb % shards or blocks % shards):
        raise UserError(
            f"with {processes} processes, the {per_mb} prompts of a minibatch (train."
            f"batch_prompts / train.minibatches) and train.prompt_blocks={blocks} must be "
            f"multiples of the {shards} data shards (data × fsdp of mesh.shape="
            f"{tuple(config.mesh.shape)}): each process holds only its own rows."
        )
    if t.ppo_epochs < 1 or t.steps < 1:
        raise UserError("train.ppo_epochs and train.steps must be ≥ 1.")
    if config.sampler.temperature <= 0:
        raise UserError(
            f"sampler.temperature={config.sampler.temperature}: RL training samples, so it "
            "must be > 0 (greedy decoding is for evaluation)."
        )
    presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    if config.eval.every_steps:
        evaluation.check_options(config.eval.k, config.eval.temperature, config.eval.batch_size)
