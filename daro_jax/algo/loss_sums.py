"""The metric sums of the loss (`losses.microbatch_loss` returns them per micro-batch): their
neutral element, their sum over micro-batches, minibatches and hosts, and the means and
per-group figures they give once divided."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from daro_jax.algo import daro, losses
from daro_jax.algo.presets import AlgoSpec

# Token means that finalize_metrics reports when their sums are present.
OPTIONAL_METRICS = {
    "kl_sum": "kl",
    "entropy_sum": "entropy",
    "clip_dual": "clip_frac_dual",
    "sampler_gap_sum": "sampler_logp_gap",
    "mismatch_kl_sum": "sampler_mismatch_kl",
    "truncation_sum": "sampler_truncation",
    "tis_weight_sum": "tis_weight_mean",
    "tis_capped": "tis_capped_frac",
}


def empty(spec: AlgoSpec, batch: losses.TokenBatch, *, entropy: bool) -> dict[str, jax.Array]:
    """Neutral element of `accumulate` for the sums `losses.microbatch_loss` returns on
    micro-batches of `batch` (a lax.scan carry over micro-batches)."""
    zero = jnp.zeros((), jnp.float32)
    groups = jnp.zeros((spec.num_groups,), jnp.float32)
    names = ["loss", "tokens", "clip_low", "clip_high", "ratio_sum"]
    if batch.ref_logp is not None:
        names.append("kl_sum")
    if batch.sampler_logp is not None:
        names += ["sampler_gap_sum", "mismatch_kl_sum"]
        if batch.sampler_logp_full is not None:
            names.append("truncation_sum")
        if spec.sampler_is_cap is not None:
            names += ["tis_weight_sum", "tis_capped"]
    if spec.dual_clip is not None:
        names.append("clip_dual")
    if entropy:
        names.append("entropy_sum")
    sums = dict.fromkeys(names, zero)
    sums.update(ratio_min=jnp.full((), jnp.inf), ratio_max=jnp.full((), -jnp.inf))
    sums.update(dict.fromkeys(("group_seqs", "group_tokens", "group_loss_sum"), groups))
    return sums


def accumulate(acc: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict:
    """Combine metric sums of two micro-batches, minibatches or hosts: min / max for
    ratio_min / ratio_max, + for everything else."""
    combine = {"ratio_min": jnp.minimum, "ratio_max": jnp.maximum}
    return {key: combine.get(key, jnp.add)(acc[key], new[key]) for key in acc}


def finalize(
    sums: dict[str, jax.Array], daro_params: jax.Array, spec: AlgoSpec
) -> dict[str, jax.Array]:
    """Divide the accumulated sums once (the loss itself is sums["loss"]). Per group
    g = 0..K ([K+1] arrays): prompts, tokens, loss (the token mean of l inside g: DARO's
    L_g on a token-mean base), weight and weighted_loss = weight_g loss_g. The weight is
    DARO's w_g (0 for g in {0, K}) under the DARO weights, and otherwise the share of the
    loss the aggregation gives the group, from counts over everything the sums cover (n_g
    sequences and T_g tokens of n and T):

        seq_mean  n_g / n,   token_sum_const  T_g / (n L_max),   token_mean  T_g / T

    so that loss = sum_g weight_g L_g for the token-level aggregations of one minibatch."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    seqs = sums["group_seqs"]
    group_tokens = sums["group_tokens"]
    group_loss = sums["group_loss_sum"] / jnp.maximum(group_tokens, 1.0)
    if spec.uses_daro_weights:
        w = daro.weights_and_logs(jnp.asarray(daro_params), spec)[0]
        weight = w.at[0].set(0.0).at[-1].set(0.0)
    elif spec.aggregation == "seq_mean":
        weight = seqs / jnp.maximum(seqs.sum(), 1.0)
    elif spec.aggregation == "token_sum_const":
        weight = group_tokens / (jnp.maximum(seqs.sum(), 1.0) * spec.max_response_len)
    else:
        weight = group_tokens / tokens
    out = {
        "tokens": sums["tokens"],
        "clip_frac_low": sums["clip_low"] / tokens,
        "clip_frac_high": sums["clip_high"] / tokens,
        "ratio_mean": sums["ratio_sum"] / tokens,
        "ratio_min": sums["ratio_min"],
        "ratio_max": sums["ratio_max"],
        "group_prompts": seqs / spec.k,
        "group_tokens": group_tokens,
        "group_loss": group_loss,
        "group_weight": weight,
        "group_weighted_loss": weight * group_loss,
    }
    for key, name in OPTIONAL_METRICS.items():
        if key in sums:
            out[name] = sums[key] / tokens
    return out
