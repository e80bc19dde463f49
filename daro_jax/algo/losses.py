"""The clipped policy-gradient losses over pass-rate groups, the DARO weights, and metrics.

One formulation covers GRPO, Dr. GRPO, LIPO, DAPO, DARO, GSPO and CISPO
(`daro_jax.algo.presets` picks the knobs; the README's "Algorithms" section sets each beside
its paper). Response i of a prompt has advantage A_i and pass-rate group g_i = k, its
prompt's number of correct responses (daro_jax.algo.advantages); per token t, with
sg = stop-gradient, M = max_log_ratio, eps = clip_low / clip_high:

    ratio_level token     x_{i,t} = logp - old_logp
    ratio_level sequence  x_{i,t} = sg(s_i) + logp - sg(logp),
                          s_i = sum_t (logp - old_logp) / |y_i|                     (GSPO)
    rho_{i,t} = exp(clip(x, -M, M))

    policy_loss clip   pg_{i,t} = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)
                       (dual clip c > 1, A_i < 0:  pg_{i,t} = min(pg_{i,t}, -c A_i))
    policy_loss cispo  pg_{i,t} = -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A_i exp(x - sg(x))

    (TIS, cap C:  pg_{i,t} *= min(exp(clip(old_logp - sampler_logp, -M, M)), C))
    l_{i,t}   = pg_{i,t} + beta kl_{i,t} [kl_placement loss] - c_H H_{i,t} [entropy_coef]

GSPO's sequence ratio enters in its token form (GSPO-token): every token of response i has
ratio value (pi/pi_old)^(1/|y_i|) and d rho_{i,t} / d logp_{i,t} = rho_{i,t}, so with the
seq_mean aggregation (1/|y_i| per token) loss and gradient equal GSPO's sequence objective
-(1/n) sum_i min(s_i A_i, clip(s_i) A_i) whenever A is constant over a response (always
here). s_i needs every token of the response in one micro-batch: the update's packing
never splits a completion (daro_jax/train/packing.py). CISPO's objective is
sg(r^) A log pi; exp(x - sg(x)) = pi / sg(pi) has the same gradient (d/dlogp = 1) and makes
the value -r^ A, the surrogate's value (-A at ratio 1) that DARO's weights learn from,
where sg(r^) A log pi would scale with the log-probabilities. Every token keeps its
gradient; the clip range bounds the weight only.

KL estimators (`kl_estimator`), d = clip(ref_logp - logp, -M, M):

    k1  -d       k2  d^2 / 2       k3  exp(d) - d - 1       low_var_kl  clip(k3, -10, 10)

With kl_placement "reward" the KL is no loss term: each response's reward loses
beta sum_t kl(old_logp, ref_logp) before the advantages (`kl_reward_penalty`,
daro_jax.algo.advantages).

TIS (`sampler_is_cap`) corrects for the sampler's log-probs differing from the trainer's
(bf16 kernels, another decode layout); its weight is a constant of the gradient and weights
the policy gradient only (the KL term regularises the current policy, under no sampler).
Under top-p / top-k, sampler_logp is of the truncated, renormalised distribution that drew
the token, so the weight pi_old / pi_sampler also corrects for the truncation (the
principled importance weight; the behaviour policy is the truncated one).

Sampler metrics, over the tokens (s_full = the sampler's log-prob of the token under its
untruncated softmax(logits / T), the distribution old_logp is of; = sampler_logp without
truncation), so that numerical mismatch is reported apart from truncation and drift:

    sampler_logp_gap     mean |old_logp - s_full|
    sampler_mismatch_kl  mean k3(d) = exp(d) - d - 1, d = old_logp - s_full: the estimator of
                         KL(pi_sampler || pi_trainer) on tokens the sampler drew (under
                         truncation: on the tokens it can draw)
    sampler_truncation   mean sampler_logp - s_full = -log(the kept tokens' mass) >= 0

Every aggregation is a weighted token sum  loss = sum_{i,t} m_{i,t} c_i lt_{i,t}  with one
coefficient c_i per sequence, computed from the whole minibatch (n = sequences with at
least one token, T = tokens of the minibatch, L_max = max response length):

    seq_mean          c_i = 1 / (len_i n)                          (GRPO, GSPO)
    token_sum_const   c_i = 1 / (n L_max)                          (Dr. GRPO)
    token_mean        c_i = 1 / T                                  (LIPO, DAPO, CISPO)
    group_token_mean  token_mean with the DARO weights             (DARO)

DARO's weights (`daro_weights`, on for group_token_mean) sit on top of any of them: n and T
become n_g and T_g, the sequences and tokens of the row's group g, c_i = 0 for g in {0, K},
so that the base loss restricted to g is L_g, and lt_{i,t} = w_{g_i} l_{i,t}, with
-ln w_g shared equally by the group's sequences (1 / n_g each):

    L_DARO = sum_{g present, 0 < g < K} (w_g L_g - ln w_g),    dL/dw_g = L_g - 1 / w_g.

The -ln w_g term thus appears exactly once in the sum over micro-batches and hosts, and a
group absent from the minibatch gets exactly zero gradient. The KL and entropy terms are
part of l, hence of L_g: under DARO the groups mu in {0, 1} carry none. Ablations:
`daro_learn_weights=False` fixes w_g = 1 (loss sum_g L_g, no gradient to the weights);
`daro_log_term=False` drops -ln w_g (dL/dw_g = L_g).

DARO weights: [K - 1] parameters (index k - 1 for group k), w ("direct") or ln w ("log"),
projected by the optimizer onto `daro.param_bounds(spec)`: w stays finite and positive even
when L_g <= 0, where -ln w would push w to infinity.

API (jit-friendly; `spec` = presets.resolve(config.algo, ...) is a static argument):

    batch = token_batch(old_logp, mask, advantages, group_ids, spec, ref_logp, sampler_logp)
    part = batch._replace(mask=batch.mask * inside)  # a micro-batch: its tokens only
    loss_mb, sums_mb = microbatch_loss(daro_params, logp, part, spec, entropy)
    sums = loss_sums.accumulate(sums, sums_mb)     # or start from loss_sums.empty(...)
    metrics = loss_sums.finalize(sums, daro_params, spec)

`batch` holds the normalisers of a whole minibatch (global arrays under jit, so that the
hosts' contributions add up); the micro-batches' losses and gradients sum to exactly the
minibatch's. The metric sums add over minibatches too: over one pass of minibatches,
`loss_sums.finalize` gives the whole RL batch's metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from daro_jax.algo import daro
from daro_jax.algo.presets import AlgoSpec

# ----------------------------------------------------------------------------------------
# Per-token loss over micro-batches.


class TokenBatch(NamedTuple):
    """Per-row inputs of the loss; every field has the minibatch rows as leading axis. A
    micro-batch is the batch with `mask` restricted to its tokens; coef comes from the
    whole minibatch."""

    old_logp: jax.Array  # [N, T] trainer's log-probs of the policy that sampled
    mask: jax.Array  # [N, T] float32, 1 on response tokens
    advantages: jax.Array  # [N]
    group_ids: jax.Array  # [N] int32
    coef: jax.Array  # [N] loss coefficient c_i of the aggregation
    daro_share: jax.Array  # [N] the row's share 1 / n_g of -ln w_g (0 without DARO weights)
    ref_logp: jax.Array | None  # [N, T] reference-policy logprobs, or None
    sampler_logp: jax.Array | None  # [N, T] the sampler's logprobs, or None
    # [N, T] the sampler's logprobs under its untruncated distribution, or None (= sampler_logp)
    sampler_logp_full: jax.Array | None = None


def loss_mask(mask, truncated, spec: AlgoSpec):
    """The loss mask of completions `mask` [..., T] (NumPy or JAX) with `truncated` [...]
    (cut at max_new_tokens): unchanged, or with overlong filtering (`mask_truncated`)
    mask (1 - truncated), so that a truncated completion carries no loss and counts in no
    normaliser (its reward still enters its prompt's advantages)."""
    if not spec.mask_truncated:
        return mask
    return mask * (1 - truncated[..., None].astype(mask.dtype))


def token_batch(
    old_logp: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    group_ids: jax.Array,
    spec: AlgoSpec,
    ref_logp: jax.Array | None = None,
    sampler_logp: jax.Array | None = None,
    sampler_logp_full: jax.Array | None = None,
) -> TokenBatch:
    """The normalisers of the whole minibatch (no model needed): the coefficients c_i of the
    module docstring. Rows with no response token are padding and count nowhere."""
    if spec.sampler_is_cap is not None and sampler_logp is None:
        raise ValueError(
            f"algo.sampler_is_cap={spec.sampler_is_cap} needs the sampler's logprobs: pass "
            "sampler_logp to token_batch, or set --config.algo.sampler_is_cap=None."
        )
    mask = mask.astype(jnp.float32)
    lengths = mask.sum(axis=1)
    valid = (lengths > 0).astype(jnp.float32)
    group_ids = group_ids.astype(jnp.int32)
    if spec.uses_daro_weights:  # the base's normalisers inside each group

        def count(x):
            return jax.ops.segment_sum(x, group_ids, num_segments=spec.num_groups)[group_ids]

        n_seq, tokens = count(valid), count(lengths)
        inner = ((group_ids > 0) & (group_ids < spec.k)).astype(jnp.float32)
    else:
        n_seq, tokens, inner = valid.sum(), lengths.sum(), 1.0
    n_seq = jnp.maximum(n_seq, 1.0)
    if spec.aggregation == "seq_mean":
        coef = valid / (jnp.maximum(lengths, 1.0) * n_seq)
    elif spec.aggregation == "token_sum_const":
        coef = valid / (n_seq * spec.max_response_len)
    else:
        coef = valid / jnp.maximum(tokens, 1.0)
    share = inner * valid / n_seq if spec.uses_daro_weights else jnp.zeros_like(valid)
    return TokenBatch(
        old_logp,
        mask,
        advantages.astype(jnp.float32),
        group_ids,
        inner * coef,
        share,
        ref_logp,
        sampler_logp,
        sampler_logp_full,
    )


def _clamp(x: jax.Array, bound: float) -> jax.Array:
    return jnp.clip(x, -bound, bound)


def _sampler_sums(old, batch: TokenBatch, m, spec: AlgoSpec) -> dict[str, jax.Array]:
    """Token sums of the sampler metrics (module docstring) against old_logp `old`."""
    sampler = batch.sampler_logp.astype(old.dtype)
    full = sampler if batch.sampler_logp_full is None else batch.sampler_logp_full.astype(old.dtype)
    d = _clamp(old - full, spec.max_log_ratio)
    sums = {
        "sampler_gap_sum": (jnp.abs(d) * m).sum(),
        "mismatch_kl_sum": ((jnp.exp(d) - d - 1.0) * m).sum(),
    }
    if batch.sampler_logp_full is not None:
        sums["truncation_sum"] = ((sampler - full) * m).sum()
    return sums


LOW_VAR_KL_BOUND = 10.0  # verl's low_var_kl clamps the k3 estimate to [-10, 10]


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, spec: AlgoSpec) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (module
    docstring): d = clip(ref_logp - logp, -M, M); k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1,
    low_var_kl = clip(k3, -10, 10)."""
    d = _clamp(ref_logp - logp, spec.max_log_ratio)
    if spec.kl_estimator == "k1":
        return -d
    if spec.kl_estimator == "k2":
        return 0.5 * jnp.square(d)
    k3 = jnp.exp(d) - d - 1.0
    if spec.kl_estimator == "low_var_kl":
        return _clamp(k3, LOW_VAR_KL_BOUND)
    return k3


def kl_reward_penalty(
    old_logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, spec: AlgoSpec
) -> jax.Array:
    """KL in the reward (kl_placement "reward"): beta sum_t m_t kl(old_logp, ref_logp)_t per
    response [N], the amount its reward loses before the advantages; no gradient flows."""
    kl = kl_estimate(old_logp.astype(jnp.float32), ref_logp.astype(jnp.float32), spec)
    return spec.kl_beta * (kl * mask.astype(jnp.float32)).sum(axis=1)


def _ratio(logp: jax.Array, old: jax.Array, m: jax.Array, spec: AlgoSpec) -> jax.Array:
    """x of the module docstring: the token log-ratio, or GSPO's sequence log-ratio in its
    token form (sg(s_i) + logp - sg(logp))."""
    x = logp - old
    if spec.ratio_level == "sequence":
        seq = (x * m).sum(axis=1, keepdims=True) / jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
        x = jax.lax.stop_gradient(seq) + logp - jax.lax.stop_gradient(logp)
    return x


def microbatch_loss(
    daro_params: jax.Array,
    logp: jax.Array,
    batch: TokenBatch,
    spec: AlgoSpec,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Contribution of one micro-batch: sum_{i,t} m c_i lt_{i,t} (module docstring), and the
    metric sums of `loss_sums.accumulate`. logp / entropy: [n, T] under the current policy.
    Differentiate w.r.t. logp (model) and daro_params; both gradients add over micro-batches.
    """
    if spec.kl_in_loss and batch.ref_logp is None:
        raise ValueError(
            f"algo.kl_beta={spec.kl_beta} needs reference logprobs: pass ref_logp to "
            "token_batch, or set --config.algo.kl_beta=0."
        )
    if spec.entropy_coef > 0.0 and entropy is None:
        raise ValueError(
            f"algo.entropy_coef={spec.entropy_coef} needs the policy's entropy: pass entropy "
            "to microbatch_loss, or set --config.algo.entropy_coef=0."
        )
    dtype = jnp.promote_types(logp.dtype, jnp.float32)
    logp = logp.astype(dtype)
    m = batch.mask.astype(dtype)
    adv = batch.advantages.astype(dtype)[:, None]
    old = batch.old_logp.astype(dtype)
    x = _ratio(logp, old, m, spec)
    ratio = jnp.exp(_clamp(x, spec.max_log_ratio))
    low, high = 1.0 - spec.clip_low, 1.0 + spec.clip_high
    if spec.policy_loss == "cispo":
        cispo_weight = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
        per_token = -cispo_weight * adv * jnp.exp(x - jax.lax.stop_gradient(x))
        clipped_low, clipped_high = ratio < low, ratio > high
    else:
        per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
        clipped_low, clipped_high = (ratio < low) & (adv < 0), (ratio > high) & (adv > 0)
    if spec.dual_clip is not None:
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, -spec.dual_clip * adv), per_token)
    sums: dict[str, jax.Array] = {}
    if batch.sampler_logp is not None:
        sampler = batch.sampler_logp.astype(dtype)
        sums |= _sampler_sums(old, batch, m, spec)
        if spec.sampler_is_cap is not None:
            is_ratio = jax.lax.stop_gradient(jnp.exp(_clamp(old - sampler, spec.max_log_ratio)))
            is_weight = jnp.minimum(is_ratio, spec.sampler_is_cap)
            per_token = is_weight * per_token
            sums["tis_weight_sum"] = (is_weight * m).sum()
            sums["tis_capped"] = (m * (is_ratio > spec.sampler_is_cap)).sum()
    if batch.ref_logp is not None:
        kl = kl_estimate(logp, batch.ref_logp.astype(dtype), spec)
        sums["kl_sum"] = (kl * m).sum()
        if spec.kl_in_loss:
            per_token = per_token + spec.kl_beta * kl
    if spec.entropy_coef > 0.0:
        per_token = per_token - spec.entropy_coef * entropy.astype(dtype)
    seq_loss = (per_token * m).sum(axis=1)
    lengths = m.sum(axis=1)
    coef = batch.coef.astype(dtype)
    g = batch.group_ids
    if spec.uses_daro_weights:
        w, log_w = daro.weights_and_logs(daro_params.astype(dtype), spec)
        loss = (coef * w[g] * seq_loss).sum()
        if spec.daro_log_term:
            present = (lengths > 0).astype(dtype)
            loss = loss - (batch.daro_share.astype(dtype) * present * log_w[g]).sum()
    else:
        loss = (coef * seq_loss).sum()
    ng = spec.num_groups
    sums.update(
        loss=loss,
        tokens=m.sum(),
        clip_low=(m * clipped_low).sum(),
        clip_high=(m * clipped_high).sum(),
        ratio_sum=(ratio * m).sum(),
        ratio_min=jnp.where(m > 0, ratio, jnp.inf).min(),
        ratio_max=jnp.where(m > 0, ratio, -jnp.inf).max(),
        group_seqs=jax.ops.segment_sum((lengths > 0).astype(dtype), g, num_segments=ng),
        group_tokens=jax.ops.segment_sum(lengths, g, num_segments=ng),
        group_loss_sum=jax.ops.segment_sum(seq_loss, g, num_segments=ng),
    )
    if spec.dual_clip is not None:
        sums["clip_dual"] = (m * ((ratio > spec.dual_clip) & (adv < 0))).sum()
    if entropy is not None:
        sums["entropy_sum"] = (entropy.astype(dtype) * m).sum()
    return loss, jax.tree.map(jax.lax.stop_gradient, sums)
