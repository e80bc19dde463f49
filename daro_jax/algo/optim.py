"""The trained params and their optimizer: AdamW for the model, Adam for the DARO weights.

The trained params are one pytree  {"model": params, "daro": weights [K-1]}  (see
daro_jax/algo/presets.py for the DARO parameterisation; the train state of
`daro_jax.train.state` is {"params": these, "opt": the optimizer state}). One
`optax.multi_transform` updates them:

    model (not frozen)  clip_by_global_norm(grad_clip) -> AdamW(lr_t, b1, b2, weight_decay),
                        weight decay on every leaf, or (decay_biases_and_norms=False, TRL's
                        default) not on biases and norm scales (`decays`); with
                        skip_zero_grad_updates, a minibatch whose trainable model gradient
                        is exactly zero (DARO with every mu in {0, 1}, dynamic-sampling
                        padding) moves nothing: no Adam step, no momentum, no weight decay,
                        the Adam state (count included) unchanged (`skip_zero_gradients`)
    model (frozen)      set_to_zero: no update and no optimizer state; frozen = the
                        slash-joined path inside params["model"], a decoder params tree (e.g.
                        "embed/embedding", "layers/attn/q/kernel"; `models.decoder`), fully
                        matches a regex of optim.frozen
    daro                lazy Adam(weight_lr_multiplier * lr_t, b1, b2), then projection of the
                        parameters onto daro.param_bounds(spec)

lr_t: linear warmup lr * (t + 1) / warmup_steps for t < warmup_steps, then constant lr, or
cosine lr * (1 + cos(pi (t - warmup) / (total_steps - warmup))) / 2. The global norm of the
gradient clipping is taken over the trainable model gradients only; the DARO gradients are
not clipped and get no weight decay.

"Lazy" Adam: a DARO weight whose gradient is exactly zero -- the pass-rate group is absent
from the minibatch, so its loss coefficient is exactly zero -- gets no update, and its
moments and bias-correction count stay as they are (plain Adam would still move it by
momentum). A present group has gradient L_g - 1/w_g (times w_g for "log"), exactly zero
only at its optimum, where skipping the step is harmless.

Trainer-facing API:

    params = init_params(model_params, spec)
    tx = make_optimizer(config.optim, params, total_steps, spec)   # total optimizer updates
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from daro_jax.algo import daro, presets
from daro_jax.errors import UserError

SCHEDULES = ("constant", "cosine")
ADAM_EPS = 1e-8


def init_params(model_params, spec: presets.AlgoSpec) -> dict:
    """{"model": model_params, "daro": daro.init_weights(spec)}."""
    return {"model": model_params, "daro": daro.init_weights(spec)}


def _check(cond: bool, field: str, value, need: str) -> None:
    if not cond:
        raise UserError(f"config.optim.{field}={value!r} is invalid: {need}.")


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """The model's lr_t (module docstring) for `total_steps` optimizer updates."""
    lr, warmup, kind = optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.schedule
    _check(isinstance(lr, float | int) and lr > 0, "lr", lr, "need lr > 0")
    _check(isinstance(warmup, int) and warmup >= 0, "warmup_steps", warmup, "need an int >= 0")
    _check(kind in SCHEDULES, "schedule", kind, f"choose one of {SCHEDULES}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: need a positive number of updates.")
    _check(
        kind == "constant" or warmup < total_steps,
        "warmup_steps",
        warmup,
        f"a cosine schedule needs warmup_steps < total_steps={total_steps}",
    )
    lr = float(lr)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        if kind == "constant":
            return lr * warm
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        return lr * jnp.where(step < warmup, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


NO_DECAY = re.compile(r"(.*/)?(bias|[^/]*norm/scale)")  # biases and RMSNorm scales


def decays(state) -> dict:
    """True on the leaves of `state` weight decay applies to under
    decay_biases_and_norms=False: every leaf but biases and norm scales (slash-joined path
    `NO_DECAY`, e.g. "layers/attn/q/bias", "layers/attn_norm/scale", "final_norm/scale")."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NO_DECAY.fullmatch(_path_name(path)) is None, state
    )


def skip_zero_gradients(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, except that gradients all exactly zero give zero updates and leave its state
    unchanged (the same state structure, so checkpoints are interchangeable)."""

    def update(grads, state, params=None):
        leaves = jax.tree.leaves(grads)
        zero = jnp.all(jnp.stack([jnp.all(g == 0) for g in leaves])) if leaves else True
        updates, new_state = inner.update(grads, state, params)
        updates = jax.tree.map(lambda u: jnp.where(zero, jnp.zeros_like(u), u), updates)
        new_state = jax.tree.map(lambda n, o: jnp.where(zero, o, n), new_state, state)
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def trained_norm(grads: dict, frozen: tuple[str, ...]) -> jax.Array:
    """Global norm of the model gradients `grads["model"]` over the trained leaves only (not
    matched by a `frozen` regex): the norm `clip_by_global_norm` clips."""
    labels = jax.tree.leaves(param_labels(grads, frozen)["model"])
    leaves = jax.tree.leaves(grads["model"])
    return optax.tree.norm([g for g, label in zip(leaves, labels, strict=True) if label == "model"])


def param_labels(params: dict, frozen: tuple[str, ...]) -> dict:
    """Label of every leaf of the trained params: "daro", "frozen" (the slash-joined path
    inside params["model"] fully matches one of the `frozen` regexes) or "model". A regex
    that is invalid or matches nothing is an error (a typo would silently train
    everything)."""
    patterns = []
    for pattern in frozen:
        try:
            patterns.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"config.optim.frozen: bad regex {pattern!r}: {err}.") from err
    used = set()

    def label(path, _):
        name = _path_name(path)
        for p in patterns:
            if p.fullmatch(name):
                used.add(p.pattern)
                return "frozen"
        return "model"

    labels = {
        "model": jax.tree_util.tree_map_with_path(label, params["model"]),
        "daro": jax.tree.map(lambda _: "daro", params["daro"]),
    }
    unused = [p.pattern for p in patterns if p.pattern not in used]
    if unused:
        names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params["model"])[0]]
        raise ValueError(
            f"config.optim.frozen: {unused} match no parameter path; paths look like {names[:5]}."
        )
    return labels


class LazyAdamState(NamedTuple):
    step: jax.Array  # updates seen (drives the schedule)
    count: optax.Updates  # per-entry number of nonzero gradients (bias correction)
    mu: optax.Updates
    nu: optax.Updates


def _one_minus_pow(b: float, count: jax.Array) -> jax.Array:
    """1 - b**count, accurate in float32 for b near 1 (Adam's bias correction)."""
    return -jnp.expm1(count * (math.log(b) if b > 0 else -math.inf))


def lazy_adam_projected(
    learning_rate: optax.Schedule, b1: float, b2: float, bounds: tuple[float, float]
) -> optax.GradientTransformation:
    """Adam that skips entries whose gradient is exactly zero (module docstring), followed by
    the projection p + u -> clip(p + u, *bounds). Works leaf-wise on any pytree."""
    lo, hi = bounds

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        count = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.int32), params)
        return LazyAdamState(jnp.zeros((), jnp.int32), count, zeros, zeros)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("the DARO optimizer projects onto bounds: pass params to update.")
        lr = learning_rate(state.step)
        present = jax.tree.map(lambda g: g != 0, grads)
        count = jax.tree.map(lambda c, on: c + on.astype(jnp.int32), state.count, present)
        mu = jax.tree.map(
            lambda m, g, on: jnp.where(on, b1 * m + (1.0 - b1) * g, m), state.mu, grads, present
        )
        nu = jax.tree.map(
            lambda v, g, on: jnp.where(on, b2 * v + (1.0 - b2) * g * g, v), state.nu, grads, present
        )

        def project(p, m, v, c, on):
            c = jnp.maximum(c, 1).astype(m.dtype)
            step = (
                -lr * (m / _one_minus_pow(b1, c)) / (jnp.sqrt(v / _one_minus_pow(b2, c)) + ADAM_EPS)
            )
            return jnp.clip(p + jnp.where(on, step, 0.0), lo, hi) - p

        updates = jax.tree.map(project, params, mu, nu, count, present)
        return updates, LazyAdamState(state.step + 1, count, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    optim_cfg, params: dict, total_steps: int, spec: presets.AlgoSpec
) -> optax.GradientTransformation:
    """The multi_transform of the module docstring for the trained params `params` (their
    structure and paths decide the labels; values are not read)."""
    b1, b2, wd = optim_cfg.b1, optim_cfg.b2, optim_cfg.weight_decay
    clip, mult = optim_cfg.grad_clip, optim_cfg.weight_lr_multiplier
    _check(0.0 <= b1 < 1.0, "b1", b1, "need 0 <= b1 < 1")
    _check(0.0 <= b2 < 1.0, "b2", b2, "need 0 <= b2 < 1")
    _check(wd >= 0.0, "weight_decay", wd, "need >= 0")
    _check(clip >= 0.0, "grad_clip", clip, "need >= 0 (0 turns clipping off)")
    _check(mult > 0.0, "weight_lr_multiplier", mult, "need > 0")
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    mask = None if optim_cfg.decay_biases_and_norms else decays
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=ADAM_EPS, weight_decay=wd, mask=mask)
    model_tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    if optim_cfg.skip_zero_grad_updates:
        model_tx = skip_zero_gradients(model_tx)
    daro_tx = lazy_adam_projected(
        lambda step: mult * schedule(step), b1, b2, daro.param_bounds(spec)
    )
    labels = param_labels(params, tuple(optim_cfg.frozen))
    transforms = {"model": model_tx, "frozen": optax.set_to_zero(), "daro": daro_tx}
    return optax.multi_transform(transforms, labels)


def mirror_shardings(tree, params, param_shardings, replicated):
    """Shardings of an optimizer-state pytree: a leaf whose key path ends with the path of
    a leaf of `params` (and has its shape) takes that leaf's sharding; others `replicated`."""
    by_path = {
        tuple(path): (leaf.shape, s)
        for (path, leaf), s in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def pick(path, leaf):
        for start in range(len(path)):
            shape, s = by_path.get(tuple(path[start:]), (None, None))
            if shape == leaf.shape:
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)
