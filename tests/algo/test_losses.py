"""The losses (daro_jax/algo/losses.py) against NumPy re-derivations of the formulas in its
docstrings, and the DARO weights' dynamics under the configured optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from algo_reference import (
    DARO_DIRECT_KL,
    NEW_PRESETS,
    PRESET_NAMES,
    K,
    T,
    make_case,
    make_spec,
    np_advantages,
    np_shaped,
)

from configs import base
from daro_jax.algo import advantages, daro, loss_sums, losses, optim
from daro_jax.sampling import selection

# ---------------------------------------------------------------------------------------
# NumPy reference of the losses, written from the formulas (the advantages': algo_reference).


def np_kl(logp, ref, s):
    """The KL estimate (s.kl_estimator) per token and its derivative d kl / d logp."""
    d_raw = ref - logp
    d = np.clip(d_raw, -s.max_log_ratio, s.max_log_ratio)
    dd = -1.0 * (np.abs(d_raw) < s.max_log_ratio)  # d d / d logp
    if s.kl_estimator == "k1":
        return -d, -dd
    if s.kl_estimator == "k2":
        return 0.5 * d**2, d * dd
    k3, dk3 = np.exp(d) - d - 1.0, (np.exp(d) - 1.0) * dd
    if s.kl_estimator == "low_var_kl":  # verl: k3 clamped to [-10, 10]
        return np.clip(k3, -10.0, 10.0), dk3 * (np.abs(k3) < 10.0)
    return k3, dk3


def np_token_loss(logp, old, ref, adv, s, sampler=None, mask=None, entropy=None):
    """Per-token loss l and dl/dlogp; logp, old, ref, sampler, mask, entropy: [N, T]; adv:
    [N]. GSPO (ratio_level "sequence"): every token of response i carries the response's
    objective f_i = -min(s_i A, clip(s_i) A), s_i = exp(mean_t (logp - old)), and
    dl = |y_i| df_i/dlogp_{i,t} = df_i/d ln s_i, so that the aggregation's 1 / |y_i| gives
    the gradient of the sequence objective. CISPO: the objective sg(r^) A log pi has
    d/dlogp = r^ A, and its value is written -r^ A (losses.py)."""
    a = adv[:, None]
    raw = logp - old
    if s.ratio_level == "sequence":
        lens = np.maximum(mask.sum(1, keepdims=True), 1.0)
        raw = np.broadcast_to((raw * mask).sum(1, keepdims=True) / lens, raw.shape)
    inside = np.abs(raw) < s.max_log_ratio
    rho = np.exp(np.clip(raw, -s.max_log_ratio, s.max_log_ratio))
    drho = rho * inside
    lo, hi = 1.0 - s.clip_low, 1.0 + s.clip_high
    if s.policy_loss == "cispo":
        pg = -np.clip(rho, lo, hi) * a
        dpg = pg.copy()  # d/dlogp of -sg(r^) A logp
    else:
        unclipped, clipped = rho * a, np.clip(rho, lo, hi) * a
        obj = np.minimum(unclipped, clipped)
        dobj = np.where(unclipped <= clipped, a * drho, a * drho * ((rho > lo) & (rho < hi)))
        pg, dpg = -obj, -dobj
    if s.dual_clip is not None:
        cap = (a < 0) & (pg > -s.dual_clip * a)
        pg = np.where(cap, -s.dual_clip * a, pg)
        dpg = np.where(cap, 0.0, dpg)
    if s.sampler_is_cap is not None:  # TIS: a constant weight on the policy-gradient term
        weight = np.minimum(np.exp(old - sampler), s.sampler_is_cap)
        pg, dpg = weight * pg, weight * dpg
    if s.kl_beta > 0 and s.kl_placement == "loss":
        kl, dkl = np_kl(logp, ref, s)
        pg, dpg = pg + s.kl_beta * kl, dpg + s.kl_beta * dkl
    if s.entropy_coef > 0:
        pg = pg - s.entropy_coef * entropy
    return pg, dpg


def np_aggregate(ell, dell, mask, rows, s):
    """The aggregation of s over the rows `rows` only (n, T, len counted over them): the
    loss and its gradient [N, T] (0 outside `rows`)."""
    lens = mask.sum(1)
    rows = rows & (lens > 0)
    n_seq, tokens = rows.sum(), mask[rows].sum()
    grad = np.zeros_like(ell)
    if n_seq == 0:
        return 0.0, grad
    if s.aggregation == "seq_mean":
        scale = 1.0 / (np.maximum(lens, 1.0) * n_seq)
    elif s.aggregation == "token_sum_const":
        scale = np.full(lens.shape, 1.0 / (n_seq * s.max_response_len))
    else:  # token_mean; group_token_mean is token_mean inside each group
        scale = np.full(lens.shape, 1.0 / tokens)
    scale = np.where(rows, scale, 0.0)[:, None]
    return (ell * mask * scale).sum(), dell * mask * scale


def np_loss(case, s, theta, keep=None):
    """Loss, d loss / d logp [N, T] and d loss / d theta [K-1] of one whole minibatch; rows
    where `keep` [N] is False carry no loss (overlong filtering), the advantages still
    come from every response."""
    rows = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    adv = rows(np_advantages(case["rewards"], case["lengths"], s))
    groups = rows(np.repeat((case["rewards"] >= 0.5).sum(1)[:, None], K, axis=1))
    mask, logp = rows(case["mask"]), rows(case["logp"])
    if keep is not None:
        mask = mask * keep[:, None]
    ell, dell = np_token_loss(
        logp,
        rows(case["old"]),
        rows(case["ref"]),
        adv,
        s,
        rows(case["sampler"]),
        mask,
        -0.5 * rows(case["old"]),  # the entropy code_arrays passes
    )
    dtheta = np.zeros(K - 1)
    if not s.daro_weights:
        loss, grad = np_aggregate(ell, dell, mask, np.ones(len(mask), bool), s)
        return loss, grad, dtheta
    log_param = s.daro_parameterization == "log"
    loss, grad = 0.0, np.zeros_like(logp)
    for g in range(1, K):
        sel = groups == g
        if mask[sel].sum() == 0:
            continue
        l_g, grad_g = np_aggregate(ell, dell, mask, sel, s)
        w = np.exp(theta[g - 1]) if log_param else theta[g - 1]
        if not s.daro_learn_weights:  # frozen at 1: no gradient reaches theta
            w = 1.0
        log_term = np.log(w) if s.daro_log_term else 0.0
        loss += w * l_g - log_term
        grad += w * grad_g
        dw = l_g - (1.0 / w if s.daro_log_term else 0.0)  # dL/dw
        if s.daro_learn_weights:
            dtheta[g - 1] = w * dw if log_param else dw  # dw/dtheta = w for ln w
    return loss, grad, dtheta


# ---------------------------------------------------------------------------------------
# The code under test, over n_micro micro-batches of shuffled rows.


SPLITS = (1, 2, 4)  # micro-batches per minibatch in the invariance test
# The test graphs are tiny: compile time dominates, and LLVM's -O0 halves it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def code_batch(arrays, spec, **logps):
    """losses.token_batch of `arrays` (code_arrays) with their advantages and groups."""
    groups = advantages.group_advantages(arrays["rewards"], arrays["lengths"], spec)
    adv, ids = groups.advantages.reshape(-1), groups.group_ids.reshape(-1)
    return losses.token_batch(arrays["old"], arrays["mask"], adv, ids, spec, **logps)


@functools.partial(jax.jit, static_argnames=("spec", "splits"), compiler_options=FAST_COMPILE)
def _code_loss(arrays, logp, theta, perm, spec, splits):
    batch = code_batch(arrays, spec, ref_logp=arrays["ref"], sampler_logp=arrays["sampler"])
    entropy = arrays["entropy"]

    def total(logp, theta, micro_rows):
        def step(carry, rows):
            inside = jnp.zeros(batch.mask.shape[0]).at[rows].set(1.0)[:, None]
            micro = batch._replace(mask=batch.mask * inside)  # as the update's chunks do
            part, part_sums = losses.microbatch_loss(theta, logp, micro, spec, entropy=entropy)
            return (carry[0] + part, loss_sums.accumulate(carry[1], part_sums)), None

        init = (0.0, loss_sums.empty(spec, batch, entropy=True))
        return jax.lax.scan(step, init, micro_rows)[0]

    out = {}
    for n_micro in splits:
        (loss, sums), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
            logp, theta, perm.reshape(n_micro, -1)
        )
        out[n_micro] = (loss, *grads, loss_sums.finalize(sums, theta, spec))
    return out


def code_arrays(case):
    flat = lambda x: jnp.asarray(x, jnp.float32).reshape(-1, T)  # noqa: E731
    return dict(
        rewards=jnp.asarray(case["rewards"], jnp.float32),
        lengths=jnp.asarray(case["lengths"], jnp.int32),
        old=flat(case["old"]),
        mask=flat(case["mask"]),
        ref=flat(case["ref"]),
        sampler=flat(case["sampler"]),
        entropy=-0.5 * flat(case["old"]),
        logp=flat(case["logp"]),
    )


def run_code_splits(case, spec, theta, splits=SPLITS):
    """{n: (loss, d/dlogp [N, T], d/dtheta, metrics)} summed over n equal micro-batches of
    shuffled rows (a lax.scan, as a trainer would), for n in splits."""
    arrays = code_arrays(case)
    logp = arrays.pop("logp")
    perm = np.random.default_rng(0).permutation(arrays["mask"].shape[0])
    theta = jnp.asarray(theta, jnp.float32)
    out = _code_loss(arrays, logp, theta, jnp.asarray(perm), spec, splits)
    return {n: (float(r[0]), np.asarray(r[1]), np.asarray(r[2]), r[3]) for n, r in out.items()}


def run_code(case, spec, theta):
    """run_code_splits for one micro-batch (the whole minibatch)."""
    return run_code_splits(case, spec, theta, splits=(1,))[1]


def theta_for(spec, seed=1):
    rng = np.random.default_rng(seed)
    log_w = rng.normal(0.0, 0.5, K - 1)
    return log_w if spec.daro_parameterization == "log" else np.exp(log_w)


def assert_close(actual, expected, tol=1e-5):
    """Relative 1e-5 of the largest entry; a float32 floor of 1e-7 for values that are 0."""
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=max(tol * scale, 1e-7))


def assert_matches_reference(case, spec, theta, keep=None):
    """Loss and both gradients of the code equal the NumPy reference; returns the code's."""
    loss, g_logp, g_theta, m = run_code(case, spec, theta)
    ref_loss, ref_grad, ref_theta = np_loss(case, spec, theta, keep)
    assert_close(loss, ref_loss)
    assert_close(g_logp, ref_grad.reshape(g_logp.shape))
    assert_close(g_theta, ref_theta)
    return loss, g_logp, g_theta, m


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_matches_numpy_reference(name):
    spec = make_spec(name)
    case = make_case(seed=PRESET_NAMES.index(name))
    theta = theta_for(spec)
    _, g_logp, g_theta, _ = assert_matches_reference(case, spec, theta)
    assert np.abs(g_logp).max() > 0
    if spec.uses_daro_weights:
        assert np.all(g_theta != 0)
    else:
        np.testing.assert_array_equal(g_theta, 0.0)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("grpo", dict(dual_clip=3.0, kl_beta=0.1, clip_high=0.3)),
        ("daro", DARO_DIRECT_KL),
    ],
)
def test_overridden_knobs_match_numpy_reference(name, overrides):
    spec = make_spec(name, **overrides)
    for key, value in overrides.items():
        assert getattr(spec, key) == value
    case = make_case(seed=7, log_ratio_std=0.8)  # wide ratios: dual clip is active
    theta = theta_for(spec)
    assert_matches_reference(case, spec, theta)


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("log_ratio_std", [0.0, 0.3])  # ratio = 1, and random ratios
def test_unified_view(name, log_ratio_std):
    """Fixed length T_mu per group: loss = sum_mu c(mu) base_mu, base_mu = the token-mean
    loss of group mu with the std-normalised advantage (DARO's L_mu). c(mu), derived by
    hand from each aggregation and advantage (n_mu prompts of b, T tokens, sigma_mu the
    group's std): GRPO n_mu / b; Dr. GRPO n_mu T_mu (sigma_mu + eps) / (b L_max); LIPO
    n_mu T_mu / T * (sigma_mu + eps) / (sigma_batch + eps); DAPO n_mu T_mu / T; DARO w_mu."""
    group_len = np.array([5, 3, 8, 11, 6])  # T_mu for k = 0..K
    b = 10
    k = np.arange(b) % (K + 1)
    lengths = np.repeat(group_len[k][:, None], K, axis=1)
    case = make_case(seed=11, b=b, lengths=lengths, log_ratio_std=log_ratio_std)
    spec = make_spec(name, kl_beta=0.0, overlong_shaping=False)
    base_spec = make_spec("daro")
    theta = theta_for(base_spec)
    loss, g_logp, _, _ = run_code(case, spec, theta)

    mu = np.arange(K + 1) / K
    eps, ddof = spec.std_eps, spec.std_ddof
    sigma = np.sqrt(mu * (1 - mu) * K / (K - ddof))
    sigma_b = case["rewards"].std(ddof=ddof)
    n_mu = np.bincount(k, minlength=K + 1)
    tokens = (n_mu * group_len).sum()
    c = {
        "grpo": n_mu / b,
        "dr_grpo": n_mu * group_len * (sigma + eps) / (b * T),
        "lipo": n_mu * group_len / tokens * (sigma + eps) / (sigma_b + eps),
        "dapo": n_mu * group_len / tokens,
        "daro": np.concatenate([[1.0], theta, [1.0]]),  # direct parameterisation: w
    }[name]
    adv_std = np_advantages(case["rewards"], lengths, base_spec).reshape(-1)
    ell, dell = np_token_loss(  # the method's own clip range, std-normalised advantage
        case["logp"].reshape(-1, T), case["old"].reshape(-1, T), None, adv_std, spec
    )
    mask, groups = case["mask"].reshape(-1, T), np.repeat(k, K)
    expected, expected_grad = 0.0, np.zeros_like(ell)
    for g in range(1, K):
        sel = groups == g
        t_g = mask[sel].sum()
        expected += c[g] * (ell[sel] * mask[sel]).sum() / t_g
        expected_grad[sel] = c[g] * dell[sel] * mask[sel] / t_g
        if name == "daro":
            expected -= np.log(c[g])
    assert_close(loss, expected)
    assert_close(g_logp, expected_grad)


def assert_microbatch_invariant(case, spec):
    """Loss, gradients and metrics summed over 2 and 4 micro-batches of shuffled rows equal
    those of the whole minibatch."""
    runs = run_code_splits(case, spec, theta_for(spec))
    for n_micro in SPLITS[1:]:
        for a, b in zip(runs[1][:3], runs[n_micro][:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        for key, value in runs[1][3].items():
            np.testing.assert_allclose(value, runs[n_micro][3][key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_microbatch_invariance(name):
    assert_microbatch_invariant(make_case(seed=PRESET_NAMES.index(name)), make_spec(name))


def test_metrics():
    spec = make_spec("daro", **DARO_DIRECT_KL)
    case = make_case(seed=9, b=10, log_ratio_std=0.8)
    theta = theta_for(spec)
    loss, _, _, m = run_code(case, spec, theta)
    mask = case["mask"].reshape(-1, T)
    ratio = np.exp(case["logp"] - case["old"]).reshape(-1, T)[mask > 0]
    adv = np.repeat(np_advantages(case["rewards"], case["lengths"], spec).reshape(-1), T)
    adv = adv.reshape(-1, T)[mask > 0]
    np.testing.assert_allclose(m["ratio_mean"], ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_min"], ratio.min(), rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], ratio.max(), rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac_low"], np.mean((ratio < 0.8) & (adv < 0)), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], np.mean((ratio > 1.28) & (adv > 0)), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_dual"], np.mean((ratio > 2) & (adv < 0)), rtol=1e-6)
    assert 0 < m["clip_frac_dual"] < m["clip_frac_low"] + m["clip_frac_high"]
    d = (case["ref"] - case["logp"]).reshape(-1, T)[mask > 0]
    np.testing.assert_allclose(m["kl"], np.mean(np.exp(d) - d - 1), rtol=1e-5)
    entropy = -0.5 * case["old"].reshape(-1, T)[mask > 0]
    np.testing.assert_allclose(m["entropy"], entropy.mean(), rtol=1e-6)
    # The sampler against the policy that sampled (old), not the current one (issue 25).
    d = (case["old"] - case["sampler"]).reshape(-1, T)[mask > 0]
    np.testing.assert_allclose(m["sampler_logp_gap"], np.abs(d).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["sampler_mismatch_kl"], np.mean(np.exp(d) - d - 1), rtol=1e-5)
    assert "sampler_truncation" not in m  # no full log-probs given: no truncation to report
    assert "tis_weight_mean" not in m  # TIS off
    k = (case["rewards"] >= 0.5).sum(1)
    np.testing.assert_allclose(m["group_prompts"], np.bincount(k, minlength=K + 1), rtol=1e-6)
    groups, lens = np.repeat(k, K), mask.sum(1)
    tok = np.bincount(groups, weights=lens, minlength=K + 1)
    np.testing.assert_allclose(m["group_tokens"], tok)
    ell, _ = np_token_loss(
        case["logp"].reshape(-1, T),
        case["old"].reshape(-1, T),
        case["ref"].reshape(-1, T),
        np_advantages(case["rewards"], case["lengths"], spec).reshape(-1),
        spec,
    )
    l_g = np.bincount(groups, weights=(ell * mask).sum(1), minlength=K + 1) / tok
    assert_close(m["group_loss"], l_g)
    np.testing.assert_allclose(m["group_weight"], np.concatenate([[0], theta, [0]]), rtol=1e-6)
    np.testing.assert_allclose(m["group_weighted_loss"], m["group_weight"] * m["group_loss"])
    weighted = m["group_weighted_loss"][1:K].sum()
    np.testing.assert_allclose(loss, weighted - np.log(theta).sum(), rtol=1e-5)
    # The other aggregations: weight = the group's share of the loss (loss_sums.finalize).
    seqs = np.bincount(groups, weights=lens > 0, minlength=K + 1)
    shares = {
        "grpo": seqs / seqs.sum(),
        "dr_grpo": tok / (seqs.sum() * T),
        "dapo": tok / tok.sum(),
    }
    for name, share in shares.items():
        spec = make_spec(name, kl_beta=0.0, overlong_shaping=False)
        loss, _, _, m = run_code(case, spec, theta)
        np.testing.assert_allclose(m["group_weight"], share, rtol=1e-6)
        if name != "grpo":  # token-level: loss = sum_g weight_g L_g
            np.testing.assert_allclose(loss, m["group_weighted_loss"].sum(), rtol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "lipo"])  # n_seq, batch std
def test_padding_rows_count_nowhere(name):
    case = make_case(seed=4, b=10)
    padded = {key: np.concatenate([val, val[:2]]) for key, val in case.items()}
    padded["lengths"][-2:] = 0
    padded["mask"][-2:] = 0.0
    spec = make_spec(name)
    theta = theta_for(spec)
    a, b = run_code(case, spec, theta), run_code(padded, spec, theta)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1][: a[1].shape[0]], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["dapo", "grpo"])  # token-mean; seq-mean with KL
def test_truncated_importance_sampling_matches_numpy_reference(name):
    """TIS: each token's policy-gradient term times min(pi_old / pi_sampler, C), a constant
    of the gradient; the KL term is not weighted."""
    spec = make_spec(name, sampler_is_cap=1.2)
    case = make_case(seed=17)
    theta = theta_for(spec)
    loss, _, _, m = assert_matches_reference(case, spec, theta)
    mask = case["mask"].reshape(-1, T) > 0
    ratio = np.exp(case["old"] - case["sampler"]).reshape(-1, T)[mask]
    np.testing.assert_allclose(m["tis_weight_mean"], np.minimum(ratio, 1.2).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["tis_capped_frac"], np.mean(ratio > 1.2), rtol=1e-6)
    assert 0.1 < m["tis_capped_frac"] < 0.9  # the cap binds on some tokens, not all
    plain = make_spec(name)  # off by default: the sampler's log-probs change nothing
    assert plain.sampler_is_cap is None
    assert_close(run_code(case, plain, theta)[0], np_loss(case, plain, theta)[0])
    assert abs(run_code(case, plain, theta)[0] - loss) > 1e-3


ABLATIONS = [
    dict(daro_learn_weights=False),
    dict(daro_log_term=False),
    dict(daro_log_term=False, daro_parameterization="log"),
]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_daro_ablations_match_numpy_reference(ablation):
    spec = make_spec("daro", **ablation)
    case = make_case(seed=23)
    theta = theta_for(spec)
    loss, g_logp, g_theta, m = assert_matches_reference(case, spec, theta)
    inner = m["group_loss"][1:K]
    if not spec.daro_learn_weights:  # sum_g L_g, weights 1, no gradient to them
        np.testing.assert_array_equal(g_theta, 0.0)
        np.testing.assert_array_equal(m["group_weight"], [0, 1, 1, 1, 0])
        np.testing.assert_allclose(loss, inner.sum(), rtol=1e-5)
    else:  # sum_g w_g L_g: dL/dw_g = L_g
        w = np.asarray(daro.weights(jnp.asarray(theta, jnp.float32), spec))
        np.testing.assert_allclose(loss, (w * inner).sum(), rtol=1e-5)
        dw = g_theta / w if spec.daro_parameterization == "log" else g_theta
        np.testing.assert_allclose(dw, inner, rtol=1e-5)


@functools.partial(jax.jit, static_argnames=("spec", "n_mini"), compiler_options=FAST_COMPILE)
def _batch_metrics(arrays, theta, spec, n_mini):
    """loss_sums.finalize of the metric sums of n_mini minibatches of consecutive prompts, each
    with its own normalisers (token_batch); advantages from the whole batch, as the trainer."""
    groups = advantages.group_advantages(arrays["rewards"], arrays["lengths"], spec)
    adv, ids = groups.advantages.reshape(-1), groups.group_ids.reshape(-1)
    rows = adv.shape[0] // n_mini
    sums = None
    for i in range(n_mini):
        sl = slice(i * rows, (i + 1) * rows)
        batch = losses.token_batch(
            arrays["old"][sl],
            arrays["mask"][sl],
            adv[sl],
            ids[sl],
            spec,
            ref_logp=arrays["ref"][sl],
            sampler_logp=arrays["sampler"][sl],
        )
        part = losses.microbatch_loss(
            theta, arrays["logp"][sl], batch, spec, entropy=arrays["entropy"][sl]
        )[1]
        sums = part if sums is None else loss_sums.accumulate(sums, part)
    return loss_sums.finalize(sums, theta, spec)


@pytest.mark.parametrize("name", PRESET_NAMES + NEW_PRESETS)
def test_group_metrics_over_four_minibatches_equal_one_minibatch(name):
    """The per-group metrics (and the token means) of a batch split into 4 minibatches of
    shuffled prompts, accumulated over the minibatches, equal those of 1 minibatch."""
    overrides = dict(sampler_is_cap=1.5) if name == "dapo" else {}
    spec = make_spec(name, **overrides)
    case = make_case(seed=31, b=12, log_ratio_std=0.5)
    order = np.random.default_rng(3).permutation(12)
    case = {key: value[order] for key, value in case.items()}
    arrays = code_arrays(case)
    theta = jnp.asarray(theta_for(spec), jnp.float32)
    one, four = (_batch_metrics(arrays, theta, spec, n) for n in (1, 4))
    assert set(one) == set(four)
    for key in one:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
    k = (case["rewards"] >= 0.5).sum(1)
    np.testing.assert_allclose(one["group_prompts"], np.bincount(k, minlength=K + 1))


# ---------------------------------------------------------------------------------------
# DARO dynamics with the configured optimizer.


def daro_problem(signs, seed=0):
    """A DARO batch (ratio = 1) with one prompt per group k = 1..K-1; signs[k-1] > 0 makes
    wrong answers longer (L_k > 0), < 0 right answers longer (L_k < 0), 0 equal lengths."""
    k = np.arange(1, K)
    rewards = (np.arange(K)[None, :] < k[:, None]).astype(np.float64)
    long_short = {1: (12, 1), 0: (6, 6), -1: (1, 12)}  # (wrong, right) lengths
    wrong, right = np.array([long_short[s] for s in signs]).T
    lengths = np.where(rewards > 0, right[:, None], wrong[:, None])
    case = make_case(seed, b=K - 1, lengths=lengths, log_ratio_std=0.0)
    case["rewards"] = rewards
    return case


@functools.partial(jax.jit, static_argnames=("spec", "steps"), compiler_options=FAST_COMPILE)
def optimise_daro_only(case, spec, steps):
    """Weights after `steps` updates of the configured optimizer (configs/base.py optim) on
    the DARO loss of `case` with the model held fixed, so that every L_mu stays constant."""
    state = optim.init_params({"w": jnp.zeros((3,))}, spec)
    tx = optim.make_optimizer(base.get_config().optim, state, steps, spec)
    groups = advantages.group_advantages(case["rewards"], case["lengths"], spec)
    flat = lambda x: jnp.asarray(x, jnp.float32).reshape(-1, T)  # noqa: E731
    batch = losses.token_batch(
        flat(case["old"]),
        flat(case["mask"]),
        groups.advantages.reshape(-1),
        groups.group_ids.reshape(-1),
        spec,
    )
    logp = flat(case["logp"])
    grad_fn = jax.grad(lambda th: losses.microbatch_loss(th, logp, batch, spec)[0])

    def step(carry, _):
        state, opt_state = carry
        grads = {"model": {"w": jnp.zeros((3,))}, "daro": grad_fn(state["daro"])}
        updates, opt_state = tx.update(grads, opt_state, state)
        return (optax.apply_updates(state, updates), opt_state), None

    (state, _), _ = jax.lax.scan(step, (state, tx.init(state)), None, length=steps)
    return daro.weights(state["daro"], spec)


def np_group_losses(case, spec):
    adv = np_advantages(case["rewards"], case["lengths"], spec)
    mask = case["mask"]
    return np.array([-(adv[i] * mask[i].sum(1)).sum() / mask[i].sum() for i in range(K - 1)])


BOUNDS = (-1.0, 1.0)  # small, so that the bound is reached within the test's steps


@pytest.mark.parametrize("param", ["log", "direct"])
def test_daro_weights_converge_to_inverse_loss(param):
    spec = make_spec("daro", daro_parameterization=param, daro_log_weight_bounds=BOUNDS)
    case = daro_problem(signs=[1, 1, 1])
    l_mu = np_group_losses(case, spec)
    assert np.all(l_mu > 0) and l_mu.max() / l_mu.min() > 2
    assert np.all(np.abs(np.log(l_mu)) < BOUNDS[1])  # the bounds do not bind here
    w = np.asarray(optimise_daro_only(case, spec, steps=5000))
    np.testing.assert_allclose(w * l_mu, 1.0, atol=1e-2)


@pytest.mark.parametrize("param", ["log", "direct"])
def test_daro_weights_stay_finite_when_loss_nonpositive(param):
    spec = make_spec("daro", daro_parameterization=param, daro_log_weight_bounds=BOUNDS)
    case = daro_problem(signs=[-1, 0, 1])
    l_mu = np_group_losses(case, spec)
    assert l_mu[0] < 0 and abs(l_mu[1]) < 1e-6 and l_mu[2] > 0
    w = np.asarray(optimise_daro_only(case, spec, steps=3000))
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    np.testing.assert_allclose(w[:2], np.exp(BOUNDS[1]), rtol=1e-6)  # -ln w pushes to the bound
    np.testing.assert_allclose(w[2] * l_mu[2], 1.0, atol=1e-2)  # the others are unaffected


def test_daro_ablation_weight_dynamics():
    """Frozen weights stay at 1; without -ln w the weights of groups with L_g > 0 run down
    to their lower bound (dL/dw_g = L_g > 0 everywhere)."""
    case = daro_problem(signs=[1, 1, 1])
    frozen = make_spec("daro", daro_learn_weights=False, daro_log_weight_bounds=BOUNDS)
    np.testing.assert_array_equal(optimise_daro_only(case, frozen, steps=200), 1.0)
    no_log = make_spec("daro", daro_log_term=False, daro_log_weight_bounds=BOUNDS)
    assert np.all(np_group_losses(case, no_log) > 0)
    w = np.asarray(optimise_daro_only(case, no_log, steps=3000))
    np.testing.assert_allclose(w, np.exp(BOUNDS[0]), rtol=1e-6)


def test_absent_group_gets_exactly_zero_weight_gradient():
    """A group with no prompt in the batch gives its DARO weight a gradient of exactly 0
    (what the lazy Adam of the weights skips on: test_optim.py), the present groups' not."""
    spec = make_spec("daro")
    case = daro_problem(signs=[1, 1, 1])
    case["rewards"][2] = 0.0  # the k = 3 prompt becomes k = 0: group 3 absent
    g_theta = run_code(case, spec, theta_for(spec))[2]
    assert g_theta[2] == 0.0 and np.all(g_theta[:2] != 0)


def test_model_gradient_is_weighted_sum_of_group_gradients():
    spec = make_spec("daro")
    case = make_case(seed=21)
    theta = theta_for(spec)
    _, g_logp, _, _ = run_code(case, spec, theta)
    adv = np_advantages(case["rewards"], case["lengths"], spec).reshape(-1)
    _, dell = np_token_loss(
        case["logp"].reshape(-1, T), case["old"].reshape(-1, T), None, adv, spec
    )
    mask = case["mask"].reshape(-1, T)
    groups = np.repeat((case["rewards"] >= 0.5).sum(1), K)
    expected = np.zeros_like(dell)
    for g in range(1, K):
        sel = groups == g
        grad_l_g = np.where(sel[:, None], dell * mask / mask[sel].sum(), 0.0)  # grad of L_g
        expected += theta[g - 1] * grad_l_g  # w_g (direct parameterisation)
    assert_close(g_logp, expected)


# ---------------------------------------------------------------------------------------
# GSPO, CISPO, DARO's weights on any base loss, overlong filtering, KL options, entropy bonus.

DARO_BASES = ("grpo", "dr_grpo", "dapo", "gspo", "cispo")


@pytest.mark.parametrize("name", NEW_PRESETS)
@pytest.mark.parametrize("log_ratio_std", [0.0, 0.3])  # on-policy, and off-policy ratios
def test_gspo_and_cispo_presets_match_numpy_reference(name, log_ratio_std):
    spec = make_spec(name)
    case = make_case(seed=41, log_ratio_std=log_ratio_std)
    theta = theta_for(spec)
    _, g_logp, g_theta, _ = assert_matches_reference(case, spec, theta)
    np.testing.assert_array_equal(g_theta, 0.0)  # no DARO weights
    adv = np_advantages(case["rewards"], case["lengths"], spec).reshape(-1)
    mask = case["mask"].reshape(-1, T) > 0
    moving = np.abs(g_logp).max(axis=1) > 0
    if name == "cispo" or log_ratio_std == 0.0:  # every token of A != 0 keeps a gradient
        assert np.all(np.abs(g_logp)[mask & (adv[:, None] != 0)] > 0)
    else:  # GSPO's clip range (3e-4, 4e-4) stops some responses whole, not others
        assert moving.any() and not moving[adv != 0].all()


def test_gspo_is_the_sequence_level_objective():
    """GSPO (arXiv 2507.18071, eq. 5-7), written directly: s_i = (pi / pi_old)^(1/|y_i|),
    loss = -(1/n) sum_i min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i), and the gradient
    d loss / d logp_{i,t} = -(1/n) A_i s_i / |y_i| where the unclipped term is the min."""
    spec = make_spec("gspo")
    assert (spec.clip_low, spec.clip_high, spec.aggregation) == (3e-4, 4e-4, "seq_mean")
    case = make_case(seed=43, log_ratio_std=0.01)  # s_i near 1: both branches occur
    loss, g_logp, _, m = run_code(case, spec, theta_for(spec))
    mask = case["mask"].reshape(-1, T)
    lens = mask.sum(1)
    adv = np_advantages(case["rewards"], case["lengths"], spec).reshape(-1)
    s_i = np.exp(((case["logp"] - case["old"]).reshape(-1, T) * mask).sum(1) / lens)
    clipped = np.clip(s_i, 1 - 3e-4, 1 + 4e-4)
    n = len(lens)
    np.testing.assert_allclose(loss, -np.minimum(s_i * adv, clipped * adv).sum() / n, rtol=1e-5)
    active = (s_i * adv <= clipped * adv) | ((s_i > 1 - 3e-4) & (s_i < 1 + 4e-4))
    grad = -(adv * s_i * active / (lens * n))[:, None] * mask
    assert_close(g_logp, grad)
    assert 0 < active[adv != 0].mean() < 1
    token_clipped = (m["clip_frac_low"] + m["clip_frac_high"]) * mask.sum()
    np.testing.assert_allclose(token_clipped, (~active * lens).sum(), rtol=1e-5)


def test_cispo_keeps_every_gradient_and_equals_dapo_on_policy():
    """CISPO (arXiv 2506.13585, eq. 4): the gradient of token t is -clip(r, 0, 1.28) A / T
    for every token, clipped or not (PPO's clip zeroes some); at ratio 1 it is DAPO's
    token-mean gradient -A / T, and its value -A / T summed."""
    cispo, dapo = make_spec("cispo"), make_spec("dapo", overlong_shaping=False)
    assert (cispo.clip_low, cispo.clip_high, cispo.aggregation) == (1.0, 0.28, "token_mean")
    wide = make_case(seed=45, log_ratio_std=0.8)
    theta = theta_for(cispo)
    mask = wide["mask"].reshape(-1, T) > 0
    adv = np.repeat(np_advantages(wide["rewards"], wide["lengths"], cispo).reshape(-1, 1), T, 1)
    ratio = np.exp(wide["logp"] - wide["old"]).reshape(-1, T)
    g_cispo = run_code(wide, cispo, theta)[1]
    expected = np.where(mask, -np.clip(ratio, 0.0, 1.28) * adv / mask.sum(), 0.0)
    assert_close(g_cispo, expected)
    g_dapo = run_code(wide, dapo, theta)[1]
    live = mask & (adv != 0)
    assert np.all(g_cispo[live] != 0) and np.mean(g_dapo[live] == 0) > 0.1
    flat = make_case(seed=45, log_ratio_std=0.0)
    (l_c, g_c, _, _), (l_d, g_d, _, _) = (run_code(flat, s, theta) for s in (cispo, dapo))
    assert_close(g_c, g_d)
    np.testing.assert_allclose(l_c, l_d, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base", DARO_BASES)
def test_daro_weights_on_any_base_match_numpy_reference(base):
    """sum_g (w_g L_g - ln w_g) with L_g the base's own aggregation inside group g."""
    spec = make_spec(base, daro_weights=True)
    assert spec.uses_daro_weights and spec.aggregation == make_spec(base).aggregation
    case = make_case(seed=47, log_ratio_std=0.3)
    _, _, g_theta, m = assert_matches_reference(case, spec, theta_for(spec))
    assert np.all(g_theta != 0)
    np.testing.assert_array_equal(np.asarray(m["group_weight"])[[0, K]], 0.0)


def test_daro_preset_is_dapo_with_daro_weights():
    """Today's daro preset is one combination: DAPO's clip and token mean, DARO's weights,
    without DAPO's overlong shaping; group_token_mean = token_mean with the weights."""
    case = make_case(seed=49, log_ratio_std=0.3)
    preset = make_spec("daro")
    theta = theta_for(preset)
    expected = run_code(case, preset, theta)
    for spec in (
        make_spec("dapo", daro_weights=True, overlong_shaping=False),
        make_spec("daro", aggregation="token_mean", daro_weights=True),
    ):
        for a, b in zip(run_code(case, spec, theta)[:3], expected[:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


MICRO_SETTINGS = [
    ("gspo", {}),
    ("cispo", dict(kl_beta=0.05, kl_estimator="low_var_kl", entropy_coef=0.01)),
    ("grpo", dict(daro_weights=True)),
    ("gspo", dict(daro_weights=True, kl_beta=0.05, kl_estimator="k2")),
    ("cispo", dict(daro_weights=True, entropy_coef=0.01)),
    ("dr_grpo", dict(daro_weights=True, daro_parameterization="log")),
]


@pytest.mark.parametrize("name,overrides", MICRO_SETTINGS)
def test_microbatch_invariance_of_the_new_losses(name, overrides):
    spec = make_spec(name, **overrides)
    assert_microbatch_invariant(make_case(seed=51, log_ratio_std=0.3), spec)


@pytest.mark.parametrize("name", ["grpo", "daro"])  # seq-mean; DARO's groups
def test_overlong_filtering_matches_numpy_reference(name):
    """mask_truncated: truncated completions carry no loss and count in no normaliser (n,
    T, T_g), while their rewards still shape their prompt's advantages."""
    case = make_case(seed=53, log_ratio_std=0.3)
    truncated = np.random.default_rng(5).random(case["lengths"].shape) < 0.3
    spec, plain = make_spec(name, mask_truncated=True), make_spec(name)
    theta = theta_for(spec)
    filtered = dict(case, mask=losses.loss_mask(case["mask"], truncated, spec))
    np.testing.assert_array_equal(losses.loss_mask(case["mask"], truncated, plain), case["mask"])
    loss, g_logp, _, m = assert_matches_reference(filtered, spec, theta, ~truncated.reshape(-1))
    np.testing.assert_array_equal(g_logp[truncated.reshape(-1)], 0.0)
    assert m["tokens"] == case["mask"][~truncated].sum()
    assert abs(loss - run_code(case, plain, theta)[0]) > 1e-4


def kl_case(seed):
    """A case whose reference is far from the policy on some tokens (k3 > 10 there)."""
    case = make_case(seed=seed, log_ratio_std=0.3)
    rng = np.random.default_rng(seed)
    case["ref"] = case["logp"] + rng.normal(0.0, 2.0, case["logp"].shape)
    return case


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_in_the_loss_match_numpy_reference(estimator):
    spec = make_spec("grpo", kl_estimator=estimator, kl_beta=0.1)
    case = kl_case(seed=55)
    _, _, _, m = assert_matches_reference(case, spec, theta_for(spec))
    mask = case["mask"].reshape(-1, T) > 0
    kl, _ = np_kl(case["logp"].reshape(-1, T), case["ref"].reshape(-1, T), spec)
    np.testing.assert_allclose(m["kl"], kl[mask].mean(), rtol=1e-5)
    d = (case["ref"] - case["logp"]).reshape(-1, T)[mask]
    k3 = np.exp(d) - d - 1
    assert np.mean(k3 > 10) > 0.01  # the low-variance clamp binds on some tokens
    closed = {"k1": -d, "k2": d**2 / 2, "k3": k3, "low_var_kl": np.minimum(k3, 10.0)}
    np.testing.assert_allclose(kl[mask], closed[estimator], rtol=1e-12)


@functools.partial(jax.jit, static_argnames="spec", compiler_options=FAST_COMPILE)
def _kl_in_reward(arrays, spec):
    penalty = losses.kl_reward_penalty(arrays["old"], arrays["ref"], arrays["mask"], spec)
    groups = advantages.group_advantages(
        arrays["rewards"], arrays["lengths"], spec, penalty.reshape(arrays["rewards"].shape)
    )
    return penalty, groups


@pytest.mark.parametrize("name", ["grpo", "dapo"])  # with DAPO's overlong shaping too
def test_kl_in_the_reward_matches_numpy_reference(name):
    """kl_placement reward: each response's reward loses beta sum_t kl(old, ref) before the
    advantages (k1, verl's default in the reward); the groups still come from correctness,
    and the loss has no KL term (that of kl_beta = 0) while the KL metric stays."""
    spec = make_spec(name, kl_beta=0.05, kl_placement="reward", kl_estimator="k1")
    case = kl_case(seed=57)
    penalty, groups = _kl_in_reward(code_arrays(case), spec)
    mask, old, ref = (case[x].reshape(-1, T) for x in ("mask", "old", "ref"))
    expected = 0.05 * ((old - ref) * mask).sum(1)
    np.testing.assert_allclose(penalty, expected, rtol=1e-5, atol=1e-6)
    shaped = np_shaped(case["rewards"], case["lengths"], spec) if spec.overlong_shaping else None
    base = case["rewards"] if shaped is None else shaped
    centred = base - expected.reshape(base.shape)
    centred = centred - centred.mean(1, keepdims=True)
    std = (base - expected.reshape(base.shape)).std(1, ddof=spec.std_ddof, keepdims=True)
    np.testing.assert_allclose(groups.advantages, centred / (std + spec.std_eps), rtol=1e-4)
    k = (case["rewards"] >= 0.5).sum(1)
    np.testing.assert_array_equal(groups.group_ids[:, 0], k)
    np.testing.assert_allclose(groups.stats["kl_penalty"], expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(groups.stats["reward"], base.mean(), rtol=1e-6)
    no_kl = make_spec(name, kl_beta=0.0)
    theta = theta_for(spec)
    (loss, grad, _, m), (loss0, grad0, _, _) = (run_code(case, s, theta) for s in (spec, no_kl))
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    np.testing.assert_allclose(grad, grad0, rtol=1e-6, atol=1e-9)
    assert "kl" in m


@functools.partial(jax.jit, static_argnames="spec", compiler_options=FAST_COMPILE)
def _entropy_grad(arrays, theta, spec):
    batch = code_batch(arrays, spec)
    return jax.grad(lambda h: losses.microbatch_loss(theta, arrays["logp"], batch, spec, h)[0])(
        arrays["entropy"]
    )


@pytest.mark.parametrize("name", ["dapo", "daro"])
def test_entropy_bonus_matches_numpy_reference(name):
    """entropy_coef c: l = pg - c H per token, so d loss / d H_{i,t} = -c c_i (times w_g
    under DARO): the bonus's gradient reaches the model through the entropy."""
    spec = make_spec(name, entropy_coef=0.02)
    case = make_case(seed=59, log_ratio_std=0.3)
    theta = theta_for(spec)
    loss = assert_matches_reference(case, spec, theta)[0]
    assert abs(loss - run_code(case, make_spec(name), theta)[0]) > 1e-4
    d_entropy = np.asarray(_entropy_grad(code_arrays(case), jnp.asarray(theta, jnp.float32), spec))
    mask = case["mask"].reshape(-1, T)
    if name == "dapo":
        expected = -0.02 * mask / mask.sum()
    else:  # per group: -c w_g / T_g
        groups = np.repeat((case["rewards"] >= 0.5).sum(1), K)
        tok = np.bincount(groups, weights=mask.sum(1), minlength=K + 1)
        w = np.concatenate([[0.0], theta, [0.0]])
        expected = -0.02 * (w[groups] / np.maximum(tok[groups], 1))[:, None] * mask
    assert_close(d_entropy, expected)


# ---------------------------------------------------------------------------------------


def test_missing_reference_logprobs_raise():
    spec = make_spec("grpo")
    batch = losses.token_batch(
        jnp.zeros((2, T)), jnp.ones((2, T)), jnp.ones(2), jnp.ones(2, jnp.int32), spec
    )
    with pytest.raises(ValueError, match="kl_beta"):
        losses.microbatch_loss(jnp.zeros(K - 1), jnp.zeros((2, T)), batch, spec)
    with pytest.raises(ValueError, match="entropy_coef"):
        spec = make_spec("dapo", entropy_coef=0.01)
        losses.microbatch_loss(jnp.zeros(K - 1), jnp.zeros((2, T)), batch, spec)
    with pytest.raises(ValueError, match="sampler_is_cap"):
        losses.token_batch(
            jnp.zeros((2, T)),
            jnp.ones((2, T)),
            jnp.ones(2),
            jnp.ones(2, jnp.int32),
            make_spec("dapo", sampler_is_cap=2.0),
        )


def test_tis_under_top_p_weighs_by_the_truncated_policy_and_reports_mismatch_apart():
    """At top-p 0.9 the sampler's log-prob of a token is of the nucleus distribution
    π_trunc that drew it, its full log-prob of softmax(z) π_full (NumPy, from the logits).
    TIS weighs each token by min(π_old / π_trunc, C): the truncated policy is the
    behaviour policy. sampler_logp_gap and sampler_mismatch_kl see only the trainer's
    numerical mismatch (π_old against π_full, not the truncation, not the drift of the
    current policy), sampler_truncation the nucleus' −log mass."""
    rng = np.random.default_rng(3)
    rows, t, vocab, temperature, top_p, cap = 8, 8, 40, 0.8, 0.9, 1.5
    logits = rng.normal(0.0, 2.0, (rows * t, vocab)).astype(np.float32)
    uniforms = rng.uniform(0.0, 1.0, rows * t).astype(np.float32)
    tokens, logp_trunc, logp_full = jax.jit(
        functools.partial(selection.select_both, temperature=temperature, top_p=top_p)
    )(jnp.asarray(logits), jnp.asarray(uniforms))
    z = logits.astype(np.float64) / temperature
    p_full = np.exp(z - z.max(1, keepdims=True))
    p_full /= p_full.sum(1, keepdims=True)
    order = np.argsort(-p_full, axis=1)
    ranked = np.take_along_axis(p_full, order, 1)
    keep = np.zeros(p_full.shape, bool)
    np.put_along_axis(keep, order, np.cumsum(ranked, 1) - ranked < top_p, 1)
    p_trunc = np.where(keep, p_full, 0.0) / np.where(keep, p_full, 0.0).sum(1, keepdims=True)
    tok = np.asarray(tokens)
    at = np.arange(rows * t), tok
    assert keep[at].all() and (keep.sum(1) < vocab).all()  # drawn from a proper nucleus
    np.testing.assert_allclose(logp_trunc, np.log(p_trunc[at]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logp_full, np.log(p_full[at]), rtol=1e-5, atol=1e-5)
    # The trainer: π_full up to a bf16-sized numerical mismatch; the current policy drifted.
    old = np.log(p_full[at]) + rng.normal(0.0, 0.02, rows * t)
    logp = old + rng.normal(0.0, 0.3, rows * t)
    spec = make_spec("dapo", sampler_is_cap=cap)
    adv = rng.normal(0.0, 1.0, rows)
    as_rows = lambda x: jnp.asarray(np.reshape(x, (rows, t)), jnp.float32)  # noqa: E731
    batch = losses.token_batch(
        as_rows(old),
        jnp.ones((rows, t)),
        jnp.asarray(adv, jnp.float32),
        jnp.full((rows,), 2, jnp.int32),
        spec,
        sampler_logp=as_rows(logp_trunc),
        sampler_logp_full=as_rows(logp_full),
    )
    theta = jnp.asarray(theta_for(spec), jnp.float32)
    loss, sums = losses.microbatch_loss(theta, as_rows(logp), batch, spec)
    m = loss_sums.finalize(sums, theta, spec)
    weight = np.minimum(np.exp(old) / p_trunc[at], cap)
    assert weight.max() < 1.0  # π_old ≈ π_full ≤ π_trunc: the weight carries the truncation
    np.testing.assert_allclose(m["tis_weight_mean"], weight.mean(), rtol=1e-5)
    ell, _ = np_token_loss(
        np.reshape(logp, (rows, t)),
        np.reshape(old, (rows, t)),
        None,
        adv,
        spec,
        np.log(p_trunc[at]).reshape(rows, t),
    )
    assert_close(float(loss), ell.mean())
    d = old - np.log(p_full[at])
    np.testing.assert_allclose(m["sampler_logp_gap"], np.abs(d).mean(), rtol=1e-4)
    np.testing.assert_allclose(m["sampler_mismatch_kl"], np.mean(np.exp(d) - d - 1), rtol=1e-3)
    kept_mass = np.where(keep, p_full, 0.0).sum(1)
    np.testing.assert_allclose(m["sampler_truncation"], np.mean(-np.log(kept_mass)), rtol=1e-4)
    assert m["sampler_logp_gap"] < 0.05 < m["sampler_truncation"]  # mismatch apart from truncation
