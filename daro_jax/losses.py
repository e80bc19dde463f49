"""Advantages, pass-rate groups, the clipped policy-gradient losses and their presets.

One formulation covers GRPO, Dr. GRPO, LIPO, DAPO and DARO (see DESIGN.md, "The losses").
For prompt q with K responses, verifier rewards r_i in {0, 1}:

    correct_i = r_i >= 0.5,   k = sum_i correct_i,   pass rate mu = k / K,   group id g = k
    rho_{i,t} = exp(clip(logp - old_logp, -M, M))                    (M = max_log_ratio)
    pg_{i,t}  = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)
              (dual clip c > 1, A_i < 0:  pg_{i,t} = min(pg_{i,t}, -c A_i))
    l_{i,t}   = pg_{i,t} + beta * kl_{i,t},   kl = exp(d) - d - 1,  d = clip(ref_logp - logp)  (k3)

Every aggregation is a weighted token sum  loss = sum_{i,t} m_{i,t} c_i lt_{i,t}  with one
coefficient c_i per sequence, computed from the whole minibatch (n_seq = sequences with at
least one token, T = tokens of the minibatch, T_g = tokens of group g, L_max = max response
length):

    seq_mean          c_i = 1 / (len_i n_seq)                      (GRPO)
    token_sum_const   c_i = 1 / (n_seq L_max)                      (Dr. GRPO)
    token_mean        c_i = 1 / T                                  (LIPO, DAPO)
    group_token_mean  c_i = 1 / T_{g_i} if 0 < g_i < K else 0      (DARO)

and lt = l except for DARO, where lt_{i,t} = w_{g_i} l_{i,t} - ln w_{g_i}: the sum over the
tokens of group g is then  w_g L_g - ln w_g  with L_g the token mean of l inside g, so

    L_DARO = sum_{g present, 0 < g < K} (w_g L_g - ln w_g),    dL/dw_g = L_g - 1 / w_g.

The -ln w_g term is apportioned over the group's tokens, so it appears exactly once in the
sum over micro-batches and hosts, and a group absent from the minibatch gets exactly zero
gradient. A KL term (kl_beta > 0) is part of l, hence of L_g: under DARO the groups
mu in {0, 1} carry none.

Advantages (population std, ddof = 0, over the K rewards of a prompt, or over all rewards
of the batch's valid prompts for batch_std; eps = std_eps):

    group_std   A_i = (r_i - mean_q) / (std_q + eps)     (GRPO, DAPO, DARO)
    group_mean  A_i = r_i - mean_q                        (Dr. GRPO)
    batch_std   A_i = (r_i - mean_q) / (std_batch + eps)  (LIPO)

With DAPO's overlong shaping, `group_advantages` adds the soft length penalty
(daro_jax.rewards.overlong_penalty, L_max = max_response_len, L_cache = overlong_cache) to
the rewards the advantages use; groups are always formed from the verifier's correctness, so
pass the unshaped verifier rewards.

DARO weights: one parameter per mu = 1/K ... (K-1)/K, an array of length K - 1 (index k - 1
for group k). `daro_parameterization` "log" stores theta = ln w (w = exp(theta), init 0),
"direct" stores w itself (init 1). Both are kept inside bounds by the optimizer
(daro_jax/optim.py projects after each update onto `daro_param_bounds(spec)`:
[lo, hi] for "log", [e^lo, e^hi] for "direct", with (lo, hi) = daro_log_weight_bounds), so
w stays finite and positive even when L_g <= 0, where -ln w would push w to infinity.

Trainer-facing API (all array functions are jit-friendly; `spec` is a static argument):

    spec = resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    groups = group_advantages(rewards[B, K], lengths[B, K], spec)       # once per RL batch
    batch = token_batch(old_logp[N, T], mask[N, T], advantages[N], group_ids[N], spec,
                        ref_logp=None)                                   # whole minibatch
    # for each micro-batch (rows sl of the minibatch):
    loss_mb, sums_mb = microbatch_loss(daro_params, logp[sl], slice_rows(batch, sl), spec,
                                       entropy=None)
    sums = accumulate_metrics(sums, sums_mb)        # or start from empty_metrics(...)
    metrics = finalize_metrics(sums, daro_params, spec)

Summing `loss_mb` (and its gradients) over micro-batches gives exactly the full-minibatch
loss (and gradient). `batch` must be built from the global minibatch (under jit with
globally sharded arrays this is automatic), so that contributions of all hosts add up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from daro_jax.rewards.shaping import overlong_penalty

AGGREGATIONS = ("seq_mean", "token_sum_const", "token_mean", "group_token_mean")
ADVANTAGES = ("group_std", "group_mean", "batch_std")
PARAMETERIZATIONS = ("log", "direct")
CORRECT_THRESHOLD = 0.5  # a response is correct when its verifier reward is >= this

# Each preset fills the knobs left as placeholders (None) in config.algo.
# Shared setting of the paper: K = 8, model lr 1e-6, DARO weight lr 1e-3 (configs/base.py).
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(  # DeepSeekMath: symmetric clip, k3 KL to the reference, seq-mean.
        clip_low=0.2,
        clip_high=0.2,
        dual_clip=None,
        kl_beta=0.04,
        aggregation="seq_mean",
        advantage="group_std",
        dynamic_sampling=False,
        overlong_shaping=False,
    ),
    "dr_grpo": dict(  # No std, no length normalisation, no KL.
        clip_low=0.2,
        clip_high=0.2,
        dual_clip=None,
        kl_beta=0.0,
        aggregation="token_sum_const",
        advantage="group_mean",
        dynamic_sampling=False,
        overlong_shaping=False,
    ),
    "lipo": dict(  # Lite PPO: group-mean baseline, batch-level std, token-mean.
        clip_low=0.2,
        clip_high=0.2,
        dual_clip=None,
        kl_beta=0.0,
        aggregation="token_mean",
        advantage="batch_std",
        dynamic_sampling=False,
        overlong_shaping=False,
    ),
    "dapo": dict(  # Clip-higher, dynamic sampling, token-mean, overlong shaping, no KL.
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=None,
        kl_beta=0.0,
        aggregation="token_mean",
        advantage="group_std",
        dynamic_sampling=True,
        overlong_shaping=True,
    ),
    "daro": dict(  # Token-mean inside each pass-rate group, learnable group weights.
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=None,
        kl_beta=0.0,
        aggregation="group_token_mean",
        advantage="group_std",
        dynamic_sampling=False,
        overlong_shaping=False,
    ),
}


ALGORITHMS = tuple(PRESETS)


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    """Every loss knob, resolved from the preset and the overrides. Hashable (jit-static)."""

    name: str
    k: int
    clip_low: float
    clip_high: float
    dual_clip: float | None  # None: off
    kl_beta: float  # 0: no KL term in the loss (KL is still a metric when ref_logp is given)
    std_eps: float
    max_log_ratio: float
    aggregation: str
    advantage: str
    dynamic_sampling: bool
    dynamic_sampling_max_tries: int
    overlong_shaping: bool
    overlong_cache: int
    overlong_penalty: float
    daro_parameterization: str
    daro_log_weight_bounds: tuple[float, float]
    max_response_len: int

    @property
    def uses_daro_weights(self) -> bool:
        return self.aggregation == "group_token_mean"

    @property
    def num_groups(self) -> int:
        """Group ids run over 0..K (k correct of K)."""
        return self.k + 1


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"config.algo.{field}={value!r} is invalid: {allowed}.")


def resolve(algo_cfg: Mapping[str, Any], *, max_response_len: int) -> AlgoSpec:
    """Build the AlgoSpec of `algo_cfg` (config.algo): preset of `algo_cfg.name`, then every
    field of `algo_cfg` that is not None wins. `max_response_len` (sampler.max_new_tokens) is
    Dr. GRPO's constant and DAPO's L_max. Raises ValueError naming the bad field."""
    cfg = dict(algo_cfg.items())
    name = cfg.get("name")
    if name not in PRESETS:
        raise _fail("name", name, f"choose one of {ALGORITHMS}")
    known = {f.name for f in dataclasses.fields(AlgoSpec)} - {"max_response_len"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"config.algo has unknown fields {unknown}; the loss knobs are {sorted(known)}."
        )
    values = dict(PRESETS[name])
    values.update({key: val for key, val in cfg.items() if val is not None})
    missing = sorted(known - set(values))
    if missing:
        raise ValueError(f"config.algo lacks {missing} (see configs/base.py for defaults).")
    values["daro_log_weight_bounds"] = tuple(float(b) for b in values["daro_log_weight_bounds"])
    for field in ("clip_low", "clip_high", "kl_beta", "std_eps", "max_log_ratio"):
        values[field] = float(values[field])
    if values["dual_clip"] is not None:
        values["dual_clip"] = float(values["dual_clip"])
    spec = AlgoSpec(max_response_len=max_response_len, **values)
    _validate(spec)
    return spec


def _validate(s: AlgoSpec) -> None:
    if not isinstance(s.k, int) or s.k < 2:
        raise _fail("k", s.k, "need an integer K >= 2 responses per prompt")
    if not 0.0 <= s.clip_low < 1.0:
        raise _fail("clip_low", s.clip_low, "need 0 <= eps_low < 1")
    if s.clip_high < s.clip_low:
        raise _fail("clip_high", s.clip_high, f"need eps_high >= clip_low={s.clip_low}")
    if s.dual_clip is not None and s.dual_clip <= 1.0:
        raise _fail("dual_clip", s.dual_clip, "need c > 1, or None to turn it off")
    if s.kl_beta < 0.0:
        raise _fail("kl_beta", s.kl_beta, "need beta >= 0 (0 turns the KL term off)")
    if s.std_eps < 0.0:
        raise _fail("std_eps", s.std_eps, "need eps >= 0")
    if s.max_log_ratio <= 0.0:
        raise _fail("max_log_ratio", s.max_log_ratio, "need a positive clamp")
    if s.aggregation not in AGGREGATIONS:
        raise _fail("aggregation", s.aggregation, f"choose one of {AGGREGATIONS}")
    if s.advantage not in ADVANTAGES:
        raise _fail("advantage", s.advantage, f"choose one of {ADVANTAGES}")
    if s.dynamic_sampling_max_tries < 1:
        raise _fail("dynamic_sampling_max_tries", s.dynamic_sampling_max_tries, "need >= 1")
    if s.daro_parameterization not in PARAMETERIZATIONS:
        raise _fail(
            "daro_parameterization", s.daro_parameterization, f"choose one of {PARAMETERIZATIONS}"
        )
    lo, hi = s.daro_log_weight_bounds
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= 0.0 <= hi and lo < hi):
        raise _fail(
            "daro_log_weight_bounds",
            s.daro_log_weight_bounds,
            "need finite (lo, hi) with lo <= 0 <= hi and lo < hi (ln w starts at 0)",
        )
    if not isinstance(s.max_response_len, int) or s.max_response_len < 1:
        raise ValueError(f"max_response_len={s.max_response_len!r}: need a positive integer.")
    if s.overlong_shaping:
        if not 0 < s.overlong_cache <= s.max_response_len:
            raise _fail(
                "overlong_cache",
                s.overlong_cache,
                f"need 0 < L_cache <= max_response_len={s.max_response_len} "
                "(sampler.max_new_tokens)",
            )
        if s.overlong_penalty < 0.0:
            raise _fail("overlong_penalty", s.overlong_penalty, "need >= 0")


# ----------------------------------------------------------------------------------------
# Grouping and advantages (once per RL batch, [B, K]).


class Groups(NamedTuple):
    advantages: jax.Array  # [B, K] float32
    group_ids: jax.Array  # [B, K] int32: k = #correct of the row's prompt
    pass_rate: jax.Array  # [B] mu = k / K
    rewards: jax.Array  # [B, K] rewards the advantages use (after overlong shaping)
    stats: dict[str, jax.Array]  # rollout metrics, see `group_advantages`


def group_advantages(rewards: jax.Array, lengths: jax.Array, spec: AlgoSpec) -> Groups:
    """Pass-rate groups and advantages of a batch of B prompts x K responses.

    rewards: [B, K] verifier rewards (0/1; not yet shaped); lengths: [B, K] response tokens.
    A prompt whose K lengths are all 0 is padding: it is left out of the batch std and of the
    stats. stats: "reward" (mean shaped reward), "accuracy", "group_prompts" [K+1] (prompts per
    k), "length_correct", "length_incorrect" (mean response length).
    """
    if rewards.ndim != 2 or rewards.shape[1] != spec.k:
        raise ValueError(f"rewards must be [B, K={spec.k}], got shape {rewards.shape}.")
    rewards = rewards.astype(jnp.float32)
    correct = rewards >= CORRECT_THRESHOLD
    k = correct.sum(axis=1).astype(jnp.int32)
    group_ids = jnp.broadcast_to(k[:, None], rewards.shape)
    if spec.overlong_shaping:
        rewards = rewards + overlong_penalty(
            lengths.astype(jnp.float32),
            spec.max_response_len,
            spec.overlong_cache,
            spec.overlong_penalty,
        )
    mean_q = rewards.mean(axis=1, keepdims=True)
    centred = rewards - mean_q
    valid = (lengths > 0).any(axis=1)
    vmask = jnp.broadcast_to(valid[:, None], rewards.shape).astype(jnp.float32)
    if spec.advantage == "group_mean":
        adv = centred
    else:
        if spec.advantage == "group_std":
            std = rewards.std(axis=1, keepdims=True)
        else:
            n = jnp.maximum(vmask.sum(), 1.0)
            mean_b = (rewards * vmask).sum() / n
            std = jnp.sqrt((jnp.square(rewards - mean_b) * vmask).sum() / n)
        # std = 0 means centred = 0: A = 0 (also when std_eps = 0).
        adv = jnp.where(std > 0, centred / (std + spec.std_eps), 0.0)
    lengths = lengths.astype(jnp.float32)
    right = correct.astype(jnp.float32) * vmask
    wrong = (1.0 - correct.astype(jnp.float32)) * vmask
    n_resp = jnp.maximum(vmask.sum(), 1.0)
    stats = {
        "reward": (rewards * vmask).sum() / n_resp,
        "accuracy": right.sum() / n_resp,
        "group_prompts": jnp.bincount(k, weights=valid.astype(jnp.float32), length=spec.k + 1),
        "length_correct": (lengths * right).sum() / jnp.maximum(right.sum(), 1.0),
        "length_incorrect": (lengths * wrong).sum() / jnp.maximum(wrong.sum(), 1.0),
    }
    return Groups(adv, group_ids, k / spec.k, rewards, stats)


# ----------------------------------------------------------------------------------------
# DARO weights.


def init_daro_weights(spec: AlgoSpec) -> jax.Array:
    """Initial DARO parameters, [K-1] (group k at index k-1): all weights w = 1."""
    fill = 0.0 if spec.daro_parameterization == "log" else 1.0
    return jnp.full((spec.k - 1,), fill, jnp.float32)


def daro_param_bounds(spec: AlgoSpec) -> tuple[float, float]:
    """Bounds of the stored DARO parameters that the optimizer projects onto."""
    lo, hi = spec.daro_log_weight_bounds
    if spec.daro_parameterization == "log":
        return lo, hi
    return float(np.exp(lo)), float(np.exp(hi))


def _weights_and_logs(params: jax.Array, spec: AlgoSpec) -> tuple[jax.Array, jax.Array]:
    """(w, ln w) over group ids 0..K, with w = 1 (ln w = 0) for the unused mu in {0, 1}."""
    if spec.daro_parameterization == "log":
        log_w = params
        w = jnp.exp(params)
    else:
        w = params
        log_w = jnp.log(params)
    one, zero = jnp.ones((1,), params.dtype), jnp.zeros((1,), params.dtype)
    return jnp.concatenate([one, w, one]), jnp.concatenate([zero, log_w, zero])


def daro_weights(params: jax.Array, spec: AlgoSpec) -> jax.Array:
    """w_mu for mu = 1/K ... (K-1)/K from the stored parameters, [K-1]."""
    return _weights_and_logs(params, spec)[0][1:-1]


# ----------------------------------------------------------------------------------------
# Per-token loss over micro-batches.


class TokenBatch(NamedTuple):
    """Per-row inputs of the loss; every field has the minibatch rows as leading axis, so a
    micro-batch is `slice_rows(batch, rows)`. coef / group_coef come from the whole minibatch.
    """

    old_logp: jax.Array  # [N, T]
    mask: jax.Array  # [N, T] float32, 1 on response tokens
    advantages: jax.Array  # [N]
    group_ids: jax.Array  # [N] int32
    coef: jax.Array  # [N] loss coefficient c_i of the aggregation
    group_coef: jax.Array  # [N] 1 / T_{g_i}: the token mean inside the row's group (metric L_g)
    ref_logp: jax.Array | None  # [N, T] reference-policy logprobs, or None


def token_batch(
    old_logp: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    group_ids: jax.Array,
    spec: AlgoSpec,
    ref_logp: jax.Array | None = None,
) -> TokenBatch:
    """The normalisers of the whole minibatch (no model needed): the coefficients c_i of the
    module docstring and 1 / T_g. Rows with no response token are padding and count nowhere.
    """
    mask = mask.astype(jnp.float32)
    lengths = mask.sum(axis=1)
    valid = (lengths > 0).astype(jnp.float32)
    n_seq = jnp.maximum(valid.sum(), 1.0)
    group_ids = group_ids.astype(jnp.int32)
    group_tokens = jax.ops.segment_sum(lengths, group_ids, num_segments=spec.num_groups)
    group_coef = 1.0 / jnp.maximum(group_tokens[group_ids], 1.0)
    if spec.aggregation == "seq_mean":
        coef = valid / (jnp.maximum(lengths, 1.0) * n_seq)
    elif spec.aggregation == "token_sum_const":
        coef = valid / (n_seq * spec.max_response_len)
    elif spec.aggregation == "token_mean":
        coef = valid / jnp.maximum(lengths.sum(), 1.0)
    else:
        inner = (group_ids > 0) & (group_ids < spec.k)
        coef = jnp.where(inner, group_coef, 0.0)
    return TokenBatch(
        old_logp, mask, advantages.astype(jnp.float32), group_ids, coef, group_coef, ref_logp
    )


def slice_rows(batch: TokenBatch, rows) -> TokenBatch:
    """Rows `rows` (a slice or index array) of every field: one micro-batch."""
    return jax.tree.map(lambda x: x[rows], batch)


def _clamp(x: jax.Array, bound: float) -> jax.Array:
    return jnp.clip(x, -bound, bound)


def microbatch_loss(
    daro_params: jax.Array,
    logp: jax.Array,
    batch: TokenBatch,
    spec: AlgoSpec,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Contribution of one micro-batch: sum_{i,t} m c_i lt_{i,t} (module docstring), and the
    metric sums of `accumulate_metrics`. logp / entropy: [n, T] under the current policy.
    Differentiate w.r.t. logp (model) and daro_params; both gradients add over micro-batches.
    """
    if spec.kl_beta > 0.0 and batch.ref_logp is None:
        raise ValueError(
            f"algo.kl_beta={spec.kl_beta} needs reference logprobs: pass ref_logp to "
            "token_batch, or set --config.algo.kl_beta=0."
        )
    dtype = jnp.promote_types(logp.dtype, jnp.float32)
    logp = logp.astype(dtype)
    m = batch.mask.astype(dtype)
    adv = batch.advantages.astype(dtype)[:, None]
    ratio = jnp.exp(_clamp(logp - batch.old_logp.astype(dtype), spec.max_log_ratio))
    surr = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - spec.clip_low, 1.0 + spec.clip_high) * adv
    per_token = -jnp.minimum(surr, clipped)
    if spec.dual_clip is not None:
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, -spec.dual_clip * adv), per_token)
    sums: dict[str, jax.Array] = {}
    if batch.ref_logp is not None:
        d = _clamp(batch.ref_logp.astype(dtype) - logp, spec.max_log_ratio)
        kl = jnp.exp(d) - d - 1.0
        sums["kl_sum"] = (kl * m).sum()
        if spec.kl_beta > 0.0:
            per_token = per_token + spec.kl_beta * kl
    seq_loss = (per_token * m).sum(axis=1)
    lengths = m.sum(axis=1)
    coef = batch.coef.astype(dtype)
    g = batch.group_ids
    if spec.uses_daro_weights:
        w, log_w = _weights_and_logs(daro_params.astype(dtype), spec)
        loss = (coef * (w[g] * seq_loss - log_w[g] * lengths)).sum()
    else:
        loss = (coef * seq_loss).sum()
    ng = spec.num_groups
    sums.update(
        loss=loss,
        tokens=m.sum(),
        clip_low=(m * ((ratio < 1.0 - spec.clip_low) & (adv < 0))).sum(),
        clip_high=(m * ((ratio > 1.0 + spec.clip_high) & (adv > 0))).sum(),
        ratio_sum=(ratio * m).sum(),
        ratio_min=jnp.where(m > 0, ratio, jnp.inf).min(),
        ratio_max=jnp.where(m > 0, ratio, -jnp.inf).max(),
        group_prompts=jax.ops.segment_sum((lengths > 0) / spec.k, g, num_segments=ng),
        group_tokens=jax.ops.segment_sum(lengths, g, num_segments=ng),
        group_loss=jax.ops.segment_sum(batch.group_coef * seq_loss, g, num_segments=ng),
        group_mass=jax.ops.segment_sum(coef * lengths, g, num_segments=ng),
    )
    if spec.dual_clip is not None:
        sums["clip_dual"] = (m * ((ratio > spec.dual_clip) & (adv < 0))).sum()
    if entropy is not None:
        sums["entropy_sum"] = (entropy.astype(dtype) * m).sum()
    return loss, jax.tree.map(jax.lax.stop_gradient, sums)


def empty_metrics(spec: AlgoSpec, *, kl: bool, entropy: bool) -> dict[str, jax.Array]:
    """Neutral element of `accumulate_metrics` (a lax.scan carry over micro-batches)."""
    zero = jnp.zeros((), jnp.float32)
    groups = jnp.zeros((spec.num_groups,), jnp.float32)
    sums = dict(
        loss=zero,
        tokens=zero,
        clip_low=zero,
        clip_high=zero,
        ratio_sum=zero,
        ratio_min=jnp.full((), jnp.inf),
        ratio_max=jnp.full((), -jnp.inf),
        group_prompts=groups,
        group_tokens=groups,
        group_loss=groups,
        group_mass=groups,
    )
    if kl:
        sums["kl_sum"] = zero
    if spec.dual_clip is not None:
        sums["clip_dual"] = zero
    if entropy:
        sums["entropy_sum"] = zero
    return sums


def accumulate_metrics(acc: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict:
    """Combine metric sums of two micro-batches (or hosts): min / max for ratio_min /
    ratio_max, + for everything else."""
    combine = {"ratio_min": jnp.minimum, "ratio_max": jnp.maximum}
    return {key: combine.get(key, jnp.add)(acc[key], new[key]) for key in acc}


def finalize_metrics(
    sums: dict[str, jax.Array], daro_params: jax.Array, spec: AlgoSpec
) -> dict[str, jax.Array]:
    """Divide the accumulated sums once. Per group g = 0..K ([K+1] arrays): prompts, tokens,
    loss L_g (token mean of l inside g), weight (DARO: w_g, 0 for g in {0, K}; otherwise the
    aggregation's mass sum_{i in g} c_i len_i, so that loss = sum_g weight_g L_g for the
    token-level aggregations), weighted_loss = weight_g L_g."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    out = {
        "loss": sums["loss"],
        "tokens": sums["tokens"],
        "clip_frac_low": sums["clip_low"] / tokens,
        "clip_frac_high": sums["clip_high"] / tokens,
        "ratio_mean": sums["ratio_sum"] / tokens,
        "ratio_min": sums["ratio_min"],
        "ratio_max": sums["ratio_max"],
        "group_prompts": sums["group_prompts"],
        "group_tokens": sums["group_tokens"],
        "group_loss": sums["group_loss"],
    }
    if spec.uses_daro_weights:
        w = _weights_and_logs(daro_params, spec)[0]
        weight = w.at[0].set(0.0).at[-1].set(0.0)
    else:
        weight = sums["group_mass"]
    out["group_weight"] = weight
    out["group_weighted_loss"] = weight * sums["group_loss"]
    optional = {"kl_sum": "kl", "entropy_sum": "entropy", "clip_dual": "clip_frac_dual"}
    for key, name in optional.items():
        if key in sums:
            out[name] = sums[key] / tokens
    return out


# ----------------------------------------------------------------------------------------
# DAPO dynamic sampling (host side, pure Python / NumPy).


class DynamicSamplingInfo(NamedTuple):
    tries: int  # calls of sample_fn
    sampled_prompts: int  # prompts drawn in all tries
    kept_prompts: int  # prompts returned (<= batch_prompts)
    full: bool  # False: max_tries reached before the batch was full (trained on fewer)
    sampled_accuracy: float  # share of correct rollouts over every prompt drawn, kept or not


def dynamic_sampling(
    sample_fn: Callable[[int], tuple[np.ndarray, Any]],
    batch_prompts: int,
    max_tries: int,
) -> tuple[np.ndarray, Any, DynamicSamplingInfo]:
    """DAPO's dynamic sampling: call `sample_fn(try_index) -> (rewards [b, K], data)`, keep the
    prompts with 0 < #correct < K, until `batch_prompts` are kept or `max_tries` calls were
    made. `data` is a pytree of arrays with leading axis b (the prompts); kept rows are
    concatenated over tries and the first `batch_prompts` returned with their rewards."""
    if batch_prompts < 1 or max_tries < 1:
        raise ValueError(
            f"dynamic_sampling needs batch_prompts >= 1 and max_tries >= 1, "
            f"got {batch_prompts} and {max_tries}."
        )
    kept_rewards, kept_data = [], []
    n_kept = n_sampled = tries = n_correct = 0
    while n_kept < batch_prompts and tries < max_tries:
        rewards, data = sample_fn(tries)
        rewards = np.asarray(rewards)
        tries += 1
        n_sampled += rewards.shape[0]
        k = (rewards >= CORRECT_THRESHOLD).sum(axis=1)
        n_correct += int(k.sum())
        keep = np.flatnonzero((k > 0) & (k < rewards.shape[1]))
        kept_rewards.append(rewards[keep])
        kept_data.append(jax.tree.map(lambda x, idx=keep: np.asarray(x)[idx], data))
        n_kept += keep.size
    rewards = np.concatenate(kept_rewards)[:batch_prompts]
    data = jax.tree.map(lambda *xs: np.concatenate(xs)[:batch_prompts], *kept_data)
    accuracy = n_correct / (n_sampled * rewards.shape[1])
    info = DynamicSamplingInfo(
        tries, n_sampled, rewards.shape[0], n_kept >= batch_prompts, accuracy
    )
    return rewards, data, info
