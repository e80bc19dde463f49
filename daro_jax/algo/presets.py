"""The seven algorithms as presets of one loss, and their validated settings (`AlgoSpec`).

GRPO, Dr. GRPO, LIPO, DAPO, DARO, GSPO and CISPO differ only in the knobs below;
`daro_jax.algo.losses` holds the formulas they select. `resolve(config.algo)` fills every
knob that config.algo leaves as None from the preset named by `algo.name`; a knob set in
the config (or on the command line) wins. The README's "Algorithms" section sets each
preset beside its paper.

Knobs outside the presets, with their defaults in configs/base.py:

- `std_ddof`: the advantage's std is sqrt(sum (r - mean)^2 / (n - ddof)); 1 (unbiased, as
  the reference implementations of verl and TRL compute it) by default, 0 for the
  population std.
- `daro_parameterization`: "direct" stores the DARO weight w itself (the paper's
  parameterisation, init 1); "log" stores ln w (init 0), which keeps w > 0 by
  construction and turns each Adam step into a relative change of w, steadier when the
  weights span orders of magnitude. Both are projected onto bounds after each update
  (daro_jax/algo/optim.py), because -ln w pushes w without limit where L_g <= 0.
- `daro_learn_weights` / `daro_log_term`: the ablations of DARO's analysis. False / True:
  weights frozen at 1, i.e. an unweighted sum of per-group token means (no learning).
  True / False: weights learned without the -ln w term; then dL/dw_g = L_g, so every
  weight runs to a bound, the collapse the term exists to prevent.
- `sampler_is_cap`: truncated importance sampling (TIS) between the sampler's and the
  trainer's log-probabilities, None (off) or the cap C >= 1 (daro_jax/algo/losses.py).
- `dynamic_sampling_max_tries`: the most sampling rounds of one step under DAPO's dynamic
  sampling, the first included (daro_jax/train/rollout.py).
- `overlong_penalty`: DAPO's largest length penalty in DAPO's reward units (rewards -1 and
  +1); daro_jax/rewards/shaping.py maps it onto our 0/1 rewards (half of it is added).
- `daro_weights`: DARO's learned group weights on top of any base loss: the base's
  aggregation is applied inside each pass-rate group and the groups are summed as
  sum_g (w_g L_g - ln w_g) (daro_jax/algo/losses.py). None: on exactly for the
  aggregation "group_token_mean" (the `daro` preset's, token_mean inside each group).
- `mask_truncated`: overlong filtering (DAPO's option, TRL's mask_truncated_completions):
  completions cut at max_new_tokens carry no loss and count in no normaliser.
- `kl_estimator`: the KL estimate against the reference policy, "k1", "k2", "k3" (the
  default, GRPO's) or "low_var_kl" (k3 clamped to [-10, 10], verl's); `kl_placement`:
  "loss" (a term beta * kl per token) or "reward" (each response's reward minus beta times
  its summed kl under the sampling policy, before the advantages).
- `entropy_coef`: an entropy bonus, -coef * H per token in the loss (0: off).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from daro_jax.errors import UserError

AGGREGATIONS = ("seq_mean", "token_sum_const", "token_mean", "group_token_mean")
ADVANTAGES = ("group_std", "group_mean", "batch_std")
PARAMETERIZATIONS = ("log", "direct")
POLICY_LOSSES = ("clip", "cispo")  # PPO's clipped surrogate; CISPO's clipped IS weight
RATIO_LEVELS = ("token", "sequence")  # per-token ratio; GSPO's length-normalised sequence ratio
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
KL_PLACEMENTS = ("loss", "reward")
TOKEN_LEVEL = dict(policy_loss="clip", ratio_level="token")  # the five PPO-clip presets

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
        **TOKEN_LEVEL,
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
        **TOKEN_LEVEL,
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
        **TOKEN_LEVEL,
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
        **TOKEN_LEVEL,
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
        **TOKEN_LEVEL,
    ),
    "gspo": dict(  # Sequence-level ratio (pi / pi_old)^(1/|y|), the paper's tiny clip range.
        clip_low=3e-4,
        clip_high=4e-4,
        dual_clip=None,
        kl_beta=0.0,
        aggregation="seq_mean",
        advantage="group_std",
        dynamic_sampling=False,
        overlong_shaping=False,
        policy_loss="clip",
        ratio_level="sequence",
    ),
    "cispo": dict(  # Clipped, stop-gradient IS weight; no lower bound (1 - eps_low = 0).
        clip_low=1.0,
        clip_high=0.28,
        dual_clip=None,
        kl_beta=0.0,
        aggregation="token_mean",
        advantage="group_std",
        dynamic_sampling=False,
        overlong_shaping=False,
        policy_loss="cispo",
        ratio_level="token",
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
    kl_estimator: str
    kl_placement: str
    entropy_coef: float  # 0: no entropy bonus
    policy_loss: str
    ratio_level: str
    std_eps: float
    std_ddof: int
    max_log_ratio: float
    aggregation: str
    advantage: str
    dynamic_sampling: bool
    dynamic_sampling_max_tries: int
    overlong_shaping: bool
    overlong_cache: int
    overlong_penalty: float
    daro_weights: bool
    daro_parameterization: str
    daro_log_weight_bounds: tuple[float, float]
    daro_learn_weights: bool
    daro_log_term: bool
    sampler_is_cap: float | None  # None: off
    mask_truncated: bool
    max_response_len: int

    @property
    def uses_daro_weights(self) -> bool:
        return self.daro_weights

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_beta > 0.0 and self.kl_placement == "loss"

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_beta > 0.0 and self.kl_placement == "reward"

    @property
    def num_groups(self) -> int:
        """Group ids run over 0..K (k correct of K)."""
        return self.k + 1


def _fail(field: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config.algo.{field}={value!r} is invalid: {allowed}.")


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
    # None keeps the preset's value where it has one (sampler_is_cap: None means off).
    values.update({key: val for key, val in cfg.items() if val is not None or key not in values})
    missing = sorted(known - set(values))
    if missing:
        raise ValueError(f"config.algo lacks {missing} (see configs/base.py for defaults).")
    values["daro_log_weight_bounds"] = tuple(float(b) for b in values["daro_log_weight_bounds"])
    if values["daro_weights"] is None:
        values["daro_weights"] = values["aggregation"] == "group_token_mean"
    for field in ("clip_low", "clip_high", "kl_beta", "std_eps", "max_log_ratio", "entropy_coef"):
        values[field] = float(values[field])
    for field in ("dual_clip", "sampler_is_cap"):
        if values[field] is not None:
            values[field] = float(values[field])
    spec = AlgoSpec(max_response_len=max_response_len, **values)
    _validate(spec)
    return spec


def _validate(s: AlgoSpec) -> None:
    if not isinstance(s.k, int) or s.k < 2:
        raise _fail("k", s.k, "need an integer K >= 2 responses per prompt")
    _validate_choices(s)
    if s.policy_loss == "cispo":
        if not 0.0 <= s.clip_low <= 1.0:
            raise _fail("clip_low", s.clip_low, "need 0 <= eps_low <= 1 (1: no lower bound)")
        if s.clip_high < 0.0:
            raise _fail("clip_high", s.clip_high, "need eps_high >= 0")
        if s.dual_clip is not None:
            raise _fail("dual_clip", s.dual_clip, "CISPO has no dual clip: set it to None")
    else:
        if not 0.0 <= s.clip_low < 1.0:
            raise _fail("clip_low", s.clip_low, "need 0 <= eps_low < 1")
        if s.clip_high < s.clip_low:
            raise _fail("clip_high", s.clip_high, f"need eps_high >= clip_low={s.clip_low}")
    if s.dual_clip is not None and s.dual_clip <= 1.0:
        raise _fail("dual_clip", s.dual_clip, "need c > 1, or None to turn it off")
    if s.kl_beta < 0.0:
        raise _fail("kl_beta", s.kl_beta, "need beta >= 0 (0 turns the KL term off)")
    if s.entropy_coef < 0.0:
        raise _fail("entropy_coef", s.entropy_coef, "need a bonus coefficient >= 0 (0: off)")
    if s.std_eps < 0.0:
        raise _fail("std_eps", s.std_eps, "need eps >= 0")
    if s.std_ddof not in (0, 1):
        raise _fail("std_ddof", s.std_ddof, "need 0 (population std) or 1 (unbiased std)")
    if s.max_log_ratio <= 0.0:
        raise _fail("max_log_ratio", s.max_log_ratio, "need a positive clamp")
    if not isinstance(s.dynamic_sampling_max_tries, int) or s.dynamic_sampling_max_tries < 1:
        raise _fail(
            "dynamic_sampling_max_tries",
            s.dynamic_sampling_max_tries,
            "need an integer >= 1 (sampling rounds per step, the first included)",
        )
    if s.sampler_is_cap is not None and s.sampler_is_cap < 1.0:
        raise _fail("sampler_is_cap", s.sampler_is_cap, "need a cap C >= 1, or None (off)")
    _validate_daro(s)
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


def _validate_choices(s: AlgoSpec) -> None:
    for field, allowed in (
        ("aggregation", AGGREGATIONS),
        ("advantage", ADVANTAGES),
        ("policy_loss", POLICY_LOSSES),
        ("ratio_level", RATIO_LEVELS),
        ("kl_estimator", KL_ESTIMATORS),
        ("kl_placement", KL_PLACEMENTS),
    ):
        if getattr(s, field) not in allowed:
            raise _fail(field, getattr(s, field), f"choose one of {allowed}")
    for field in ("daro_weights", "mask_truncated"):
        if not isinstance(getattr(s, field), bool):
            raise _fail(field, getattr(s, field), "need True or False")


def _validate_daro(s: AlgoSpec) -> None:
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
    for field in ("daro_learn_weights", "daro_log_term"):
        value = getattr(s, field)
        if not isinstance(value, bool):
            raise _fail(field, value, "need True or False")
        if not value and not s.uses_daro_weights:
            raise _fail(field, value, "a DARO ablation needs the DARO weights (daro_weights=True)")
    if s.aggregation == "group_token_mean" and not s.daro_weights:
        raise _fail(
            "daro_weights",
            s.daro_weights,
            "aggregation='group_token_mean' is token_mean inside DARO's groups: use "
            "aggregation='token_mean' without the weights",
        )
