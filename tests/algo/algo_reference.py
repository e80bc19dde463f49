"""What the algo tests share: the test algorithm configs, random batches of K responses per
prompt, and the NumPy re-derivation of the advantages from the formulas in the docstring of
daro_jax/algo/advantages.py (imported by tests/algo/test_*.py)."""

import numpy as np

from configs import base
from daro_jax.algo import presets

K = 4
T = 12
PRESET_NAMES = ("grpo", "dr_grpo", "lipo", "dapo", "daro")
NEW_PRESETS = ("gspo", "cispo")
DARO_DIRECT_KL = dict(daro_parameterization="direct", kl_beta=0.05, dual_clip=2.0)


def algo_cfg(name, **overrides):
    cfg = base.get_config().algo
    cfg.name = name
    cfg.k = K
    cfg.overlong_cache = 4
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def make_spec(name, **overrides):
    return presets.resolve(algo_cfg(name, **overrides), max_response_len=T)


def make_case(seed, b=10, lengths=None, log_ratio_std=0.3):
    """B prompts x K responses covering every k = 0..K, variable lengths."""
    rng = np.random.default_rng(seed)
    k = np.arange(b) % (K + 1)
    rewards = np.zeros((b, K))
    for i in range(b):
        rewards[i, rng.permutation(K)[: k[i]]] = 1.0
    if lengths is None:
        lengths = rng.integers(1, T + 1, (b, K))
    mask = (np.arange(T) < lengths[..., None]).astype(np.float64)
    old = -rng.uniform(0.1, 3.0, (b, K, T))
    logp = old + rng.normal(0.0, log_ratio_std, old.shape)
    ref = old + rng.normal(0.0, 0.2, old.shape)
    sampler = old + rng.normal(0.0, 0.4, old.shape)
    return dict(
        rewards=rewards, lengths=lengths, mask=mask, old=old, logp=logp, ref=ref, sampler=sampler
    )


# ---------------------------------------------------------------------------------------
# NumPy reference, written from the formulas.


def np_penalty(lengths, l_max, cache, factor):
    """DAPO's soft overlong punishment, in DAPO's units (rewards ±1)."""
    out = np.zeros(lengths.shape)
    for idx, n in np.ndenumerate(lengths):
        if n > l_max:
            out[idx] = -1.0
        elif n > l_max - cache:
            out[idx] = (l_max - cache - n) / cache
    return factor * out


def np_shaped(rewards, lengths, s):
    """0/1 rewards with DAPO's penalty: R = 2r - 1 in {-1, 1}, R' = R + penalty, r' = (R' + 1)/2."""
    dapo = 2.0 * rewards - 1.0
    dapo = dapo + np_penalty(lengths, s.max_response_len, s.overlong_cache, s.overlong_penalty)
    return (dapo + 1.0) / 2.0


def np_advantages(rewards, lengths, s):
    r = rewards.astype(np.float64)
    if s.overlong_shaping:
        r = np_shaped(r, lengths, s)
    valid = lengths.max(axis=1) > 0
    std_batch = r[valid].std(ddof=s.std_ddof)  # over the batch's responses
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        centred = r[b] - r[b].mean()
        std_q = r[b].std(ddof=s.std_ddof)  # over the prompt's K rewards
        if s.advantage == "group_std":
            adv[b] = centred / (std_q + s.std_eps) if std_q > 0 else 0.0
        elif s.advantage == "group_mean":
            adv[b] = centred
        else:
            adv[b] = centred / (std_batch + s.std_eps)
    return adv
