"""The train state {"params": {"model", "daro"}, "opt"}: its optimizer, its abstract form
with every leaf's sharding, its jitted init and its restore from a checkpoint.

The abstract state is what the update compiles for (its out_shardings), what a checkpoint
is restored onto, and what the TPU plan compiles on (`daro_jax.plan.programs`): the model
params by the decoder's logical axes (`models.param_shardings`), the DARO weights
replicated, each optimizer-state leaf like the param it mirrors (`optim.mirror_shardings`).
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import checkpoint, models
from daro_jax.algo import losses, optim, presets
from daro_jax.models import decoder
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
    params = {
        "model": jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0))),
        "daro": jax.eval_shape(lambda: losses.init_daro_weights(spec)),
    }
    shardings = {"model": models.param_shardings(cfg, mesh), "daro": replicated}
    opt_state = jax.eval_shape(optimizer(config, params, spec).init, params)
    shardings = {
        "params": shardings,
        "opt": optim.mirror_shardings(opt_state, params, shardings, replicated),
    }
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"params": params, "opt": opt_state},
        shardings,
    )


def shardings(abstract: dict) -> dict:
    """The sharding of every leaf of an abstract state."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_state(model_params, spec: presets.AlgoSpec, tx, abstract: dict) -> dict:
    """The state around loaded `model_params` (donated: its buffers become the state's), with
    initial DARO weights and optimizer state, jitted with `abstract`'s shardings."""

    def init(model_params):
        params = optim.init_train_state(model_params, spec)
        return {"params": params, "opt": tx.init(params)}

    return jax.jit(init, donate_argnums=0, out_shardings=shardings(abstract))(model_params)


def restore(ckpt: checkpoint.Checkpointer, like: dict, config: dict) -> tuple[dict, dict] | None:
    """(state, meta) of the latest checkpoint of `ckpt`, each array read onto the sharding of
    its counterpart in `like` (this run's state), after `checkpoint.check_compatible` of the
    checkpoint's config with `config`; None without a checkpoint."""
    meta = ckpt.restore_meta()
    if meta is None:
        return None
    checkpoint.check_compatible(meta["config"], config)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    return ckpt.restore(target)
