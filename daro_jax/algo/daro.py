"""DARO's learnable group weights (`daro_jax.algo.losses` uses them): one stored parameter per
pass-rate group mu = 1/K ... (K-1)/K, either w itself (`daro_parameterization` "direct", the
paper's) or ln w ("log"), projected by the optimizer onto `param_bounds` so that w stays finite
and positive. The loss over groups is sum_mu (w_mu L_mu - ln w_mu)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from daro_jax.algo.presets import AlgoSpec


def init_weights(spec: AlgoSpec) -> jax.Array:
    """Initial DARO parameters, [K-1] (group k at index k-1): all weights w = 1."""
    fill = 0.0 if spec.daro_parameterization == "log" else 1.0
    return jnp.full((spec.k - 1,), fill, jnp.float32)


def param_bounds(spec: AlgoSpec) -> tuple[float, float]:
    """Bounds of the stored DARO parameters that the optimizer projects onto."""
    lo, hi = spec.daro_log_weight_bounds
    if spec.daro_parameterization == "log":
        return lo, hi
    return float(np.exp(lo)), float(np.exp(hi))


def weights_and_logs(params: jax.Array, spec: AlgoSpec) -> tuple[jax.Array, jax.Array]:
    """(w, ln w) over group ids 0..K, with w = 1 (ln w = 0) for the unused mu in {0, 1}, and
    for every group when the weights are frozen (`daro_learn_weights=False`)."""
    if not spec.daro_learn_weights:
        w = jnp.ones((spec.k - 1,), params.dtype)
        log_w = jnp.zeros((spec.k - 1,), params.dtype)
    elif spec.daro_parameterization == "log":
        log_w = params
        w = jnp.exp(params)
    else:
        w = params
        log_w = jnp.log(params)
    one, zero = jnp.ones((1,), params.dtype), jnp.zeros((1,), params.dtype)
    return jnp.concatenate([one, w, one]), jnp.concatenate([zero, log_w, zero])


def weights(params: jax.Array, spec: AlgoSpec) -> jax.Array:
    """w_mu for mu = 1/K ... (K-1)/K from the stored parameters, [K-1]."""
    return weights_and_logs(params, spec)[0][1:-1]
