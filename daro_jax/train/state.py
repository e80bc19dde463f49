"""The train state {"params": {"model", "daro"}, "opt"}: its optimizer, its abstract form
with every leaf's sharding, its jitted init and its restore from a checkpoint.

"model" is what trains: the decoder params, or with LoRA (cfg.lora_rank > 0) the adapters
alone (`lora.split`); the frozen base is then held apart, in the compute dtype, never in the
state, the optimizer or the checkpoints (`abstract_base`; `lora.combine` makes the policy).

The abstract state is what the update compiles for (its out_shardings), what a checkpoint
is restored onto, and what the TPU plan compiles on (`daro_jax.plan.programs`): the model
params `models.abstract_params` (by the decoder's logical axes), the DARO weights
replicated, each optimizer-state leaf like the param it mirrors (`optim.mirror_shardings`).
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import checkpoint, models
from daro_jax.algo import daro, optim, presets
from daro_jax.models import lora
from daro_jax.models.config import ModelConfig


def updates_per_step(train) -> int:
    """Optimizer updates of one RL step: ppo_epochs passes over `minibatches` minibatches."""
    return train.ppo_epochs * train.minibatches


def optimizer(config, params, spec: presets.AlgoSpec) -> optax.GradientTransformation:
    """`optim.make_optimizer` for the params {"model", "daro"} (its schedule spans every
    update of the run)."""
    total = config.train.steps * updates_per_step(config.train)
    return optim.make_optimizer(config.optim, params, total, spec)


def abstract_state(config, cfg: ModelConfig, spec: presets.AlgoSpec, mesh: Mesh) -> dict:
    """The state as ShapeDtypeStructs carrying their shardings on `mesh` (module docstring);
    nothing is allocated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    weights = jax.eval_shape(lambda: daro.init_weights(spec))
    params = {
        "model": trained(cfg, models.abstract_params(cfg, mesh)),
        "daro": jax.ShapeDtypeStruct(weights.shape, weights.dtype, sharding=replicated),
    }
    opt_state = jax.eval_shape(optimizer(config, params, spec).init, params)
    opt_shardings = optim.mirror_shardings(opt_state, params, shardings(params), replicated)
    opt_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, opt_shardings
    )
    return {"params": params, "opt": opt_state}


def trained(cfg: ModelConfig, tree: dict) -> dict:
    """The part of a decoder params tree (or a tree of the same structure) that trains: the
    adapters with LoRA, all of it without."""
    return lora.split(tree)[1] if cfg.lora_rank else tree


def frozen(cfg: ModelConfig, tree: dict) -> dict | None:
    """The frozen base of a decoder params tree with LoRA; None without."""
    return lora.split(tree)[0] if cfg.lora_rank else None


def abstract_base(cfg: ModelConfig, mesh: Mesh) -> dict | None:
    """The frozen base as ShapeDtypeStructs with their shardings (None without LoRA)."""
    return frozen(cfg, models.abstract_params(cfg, mesh))


def shardings(abstract: dict) -> dict:
    """The sharding of every leaf of an abstract state."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_state(model_params, spec: presets.AlgoSpec, tx, abstract: dict) -> dict:
    """The state around loaded `model_params` (donated: its buffers become the state's), with
    initial DARO weights and optimizer state, jitted with `abstract`'s shardings."""

    def init(model_params):
        params = optim.init_params(model_params, spec)
        return {"params": params, "opt": tx.init(params)}

    return jax.jit(init, donate_argnums=0, out_shardings=shardings(abstract))(model_params)


def restore(
    ckpt: checkpoint.Checkpointer, like: dict, config: dict, base: dict | None = None
) -> tuple[dict, dict] | None:
    """(state, meta) of the newest readable checkpoint of `ckpt`, each array read onto the
    sharding of its counterpart in `like` (this run's state), after
    `checkpoint.check_compatible` of the checkpoint's config with `config` and, with LoRA,
    `checkpoint.check_base` of the base it was trained on (its meta's "base") against this
    run's `base` (`lora.base_meta`); None without a checkpoint."""

    def check(meta):
        checkpoint.check_compatible(meta["config"], config)
        if base is not None:
            checkpoint.check_base(meta, base)

    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    return ckpt.restore(target, check_meta=check)
