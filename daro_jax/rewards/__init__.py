"""Math answer rewards: extraction, equivalence (math-verify + fixes), a safe process pool,
and DAPO's overlong shaping.

    math_reward(completion, gold, fallback="none") -> 1.0 | 0.0       in-process
    with RewardPool(num_workers, timeout_s) as pool:
        rewards = pool.score(completions, golds)                      # float32 [N]
        counters = pool.pop_stats()                                   # per-step metrics
    overlong_penalty(lengths, max_len, cache_len, penalty)           # DAPO soft penalty
"""

from daro_jax.rewards.extract import extract_answer
from daro_jax.rewards.pool import RewardPool
from daro_jax.rewards.shaping import overlong_penalty
from daro_jax.rewards.verify import REASONS, VerifierConfig, math_reward, score_item

__all__ = [
    "REASONS",
    "RewardPool",
    "VerifierConfig",
    "extract_answer",
    "math_reward",
    "overlong_penalty",
    "score_item",
]
