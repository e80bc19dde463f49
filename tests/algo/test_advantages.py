"""The group advantages (daro_jax/algo/advantages.py) against NumPy re-derivations and
closed forms: group / batch std with either ddof, DAPO's overlong shaping, the stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from algo_reference import (
    PRESET_NAMES,
    K,
    T,
    make_case,
    make_spec,
    np_advantages,
    np_penalty,
    np_shaped,
)

from daro_jax.algo import advantages

# The test graphs are tiny: compile time dominates, and LLVM's -O0 halves it.
group_advantages = jax.jit(
    advantages.group_advantages,
    static_argnums=2,
    compiler_options={"xla_backend_optimization_level": 0},
)


def test_advantages_and_stats():
    case = make_case(seed=3)
    case["lengths"][0] = 0  # a padding prompt: out of the batch std and the stats
    for name in PRESET_NAMES:
        spec = make_spec(name)
        g = group_advantages(jnp.asarray(case["rewards"]), jnp.asarray(case["lengths"]), spec)
        np.testing.assert_allclose(
            g.advantages, np_advantages(case["rewards"], case["lengths"], spec), atol=1e-6
        )
    k = (case["rewards"] >= 0.5).sum(1)
    np.testing.assert_array_equal(g.group_ids, np.repeat(k[:, None], K, 1))
    np.testing.assert_allclose(g.pass_rate, k / K)
    valid = case["lengths"].max(1) > 0
    np.testing.assert_array_equal(g.stats["group_prompts"], np.bincount(k[valid], minlength=K + 1))
    np.testing.assert_allclose(g.stats["accuracy"], case["rewards"][valid].mean(), rtol=1e-6)


@pytest.mark.parametrize("k", [4, 8])
def test_std_ddof(k):
    """One right answer of K, closed form: std^2 = mu (1 - mu) K / (K - ddof), so the unbiased
    std (ddof = 1, the default, as verl and TRL) makes the advantages sqrt((K-1)/K) of the
    population std's: 7 % smaller at K = 8."""
    r = np.zeros((1, k))
    r[0, 0] = 1.0
    mu = 1.0 / k
    lengths = jnp.ones((1, k), jnp.int32)
    out = {}
    for ddof in (0, 1):
        spec = make_spec("grpo", k=k, std_eps=0.0, std_ddof=ddof)
        out[ddof] = np.asarray(group_advantages(jnp.asarray(r), lengths, spec).advantages[0])
        std = np.sqrt(mu * (1 - mu) * k / (k - ddof))
        np.testing.assert_allclose(out[ddof], (r[0] - mu) / std, rtol=1e-6)
    np.testing.assert_allclose(out[1] / out[0], np.sqrt((k - 1) / k), rtol=1e-6)
    assert make_spec("grpo").std_ddof == 1  # the default
    # batch_std (LIPO) over every response of the batch, same ddof.
    case = make_case(seed=5)
    for ddof in (0, 1):
        spec = make_spec("lipo", std_ddof=ddof)
        g = group_advantages(jnp.asarray(case["rewards"]), jnp.asarray(case["lengths"]), spec)
        r, n = case["rewards"], case["rewards"].size
        std_b = np.sqrt(((r - r.mean()) ** 2).sum() / (n - ddof))
        centred = r - r.mean(axis=1, keepdims=True)
        np.testing.assert_allclose(g.advantages, centred / (std_b + spec.std_eps), rtol=1e-5)


def dapo_convention_advantages(rewards, lengths, penalty, ddof):
    """DAPO's own convention, independently: outcome reward +1 / -1, plus its soft overlong
    punishment (L_max = T, L_cache = 4) in those units, group-std normalised (eps = 0)."""
    dapo = np.where(rewards > 0.5, 1.0, -1.0) + np_penalty(lengths, T, 4, penalty)
    centred = dapo - dapo.mean(axis=1, keepdims=True)
    return centred / dapo.std(axis=1, ddof=ddof, keepdims=True)


@pytest.mark.parametrize("ddof", [0, 1])
def test_overlong_shaping_in_the_0_1_scale(ddof):
    """Rewards [1, 1, 0, 0], the first answer right but exactly at the length limit (full
    penalty): its advantage stays positive, between the short right answer's and the wrong
    ones', as under DAPO's ±1 rewards ([0.302, 1.508, -0.905, -0.905] at ddof 0); DAPO's
    penalty of 1 on our 0/1 rewards would tie it with the wrong answers."""
    spec = make_spec("dapo", std_eps=0.0, std_ddof=ddof)  # L_max = 12, L_cache = 4
    rewards = np.array([[1.0, 1.0, 0.0, 0.0]])
    lengths = np.array([[T, 3, 5, 7]])
    g = group_advantages(jnp.asarray(rewards), jnp.asarray(lengths), spec)
    np.testing.assert_allclose(g.rewards, [[0.5, 1.0, 0.0, 0.0]], atol=1e-7)
    expected = dapo_convention_advantages(rewards, lengths, 1.0, ddof)
    np.testing.assert_allclose(g.advantages, expected, rtol=1e-5)
    if ddof == 0:
        np.testing.assert_allclose(g.advantages[0], [0.302, 1.508, -0.905, -0.905], atol=5e-4)
    assert 0 < g.advantages[0, 0] < g.advantages[0, 1]
    np.testing.assert_array_equal(g.group_ids[0], [2, 2, 2, 2])  # groups from correctness


def test_overlong_shaping_keeps_the_order_not_the_sign():
    """K = 8: 6 short right answers, 1 right exactly at the length limit, 1 wrong. Shaped
    rewards 1 (x6), 0.5, 0: the answer at the limit ranks above the wrong one but its
    advantage is -0.84 (std ddof 1), as under DAPO's own ±1 rewards: a right answer at
    the limit keeps a positive advantage only when few of its group are right."""
    spec = make_spec("dapo", k=8, std_eps=0.0)  # L_max = 12, L_cache = 4
    rewards = np.array([[1.0] * 7 + [0.0]])
    lengths = np.array([[3, 4, 5, 6, 7, 8, T, 5]])
    g = group_advantages(jnp.asarray(rewards), jnp.asarray(lengths), spec)
    np.testing.assert_allclose(g.rewards[0, 6:], [0.5, 0.0], atol=1e-7)
    expected = dapo_convention_advantages(rewards, lengths, 1.0, 1)
    np.testing.assert_allclose(g.advantages, expected, rtol=1e-5)
    np.testing.assert_allclose(g.advantages[0, 6], -0.840, atol=5e-4)
    assert g.advantages[0, 7] < g.advantages[0, 6] < 0 < g.advantages[0, 0]


def test_overlong_shaping_partial_penalties():
    spec = make_spec("dapo", overlong_penalty=0.5, std_eps=0.0)  # L_max = 12, L_cache = 4
    lengths = np.array([[1, 8, 9, 10], [11, 12, 13, 4]])
    rewards = np.array([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
    g = group_advantages(jnp.asarray(rewards), jnp.asarray(lengths), spec)
    penalty = np_penalty(lengths, T, 4, 0.5)
    assert penalty[0, 1] == 0.0 and penalty[0, 3] == -0.25 and penalty[1, 2] == -0.5
    np.testing.assert_allclose(g.rewards, np_shaped(rewards, lengths, spec), atol=1e-7)
    np.testing.assert_allclose(g.rewards, rewards + penalty / 2, atol=1e-7)
    expected = dapo_convention_advantages(rewards, lengths, 0.5, spec.std_ddof)
    np.testing.assert_allclose(g.advantages, expected, rtol=1e-5)
    # Groups come from correctness: long correct answers stay in their group.
    np.testing.assert_array_equal(g.group_ids[:, 0], [3, 3])
