"""Pass-rate groups and advantages of an RL batch (B prompts x K responses, once per step).

For prompt q with K responses and verifier rewards r_i in {0, 1}:

    correct_i = r_i >= 0.5,   k = sum_i correct_i,   pass rate mu = k / K,   group id g = k

Advantages, with std = sqrt(sum (r - mean)^2 / (n - ddof)) (`std_ddof`; 1 by default, the
unbiased std of verl and TRL) over the K rewards of a prompt, or over every reward of the
batch's valid prompts for batch_std; eps = std_eps:

    group_std   A_i = (r_i - mean_q) / (std_q + eps)     (GRPO, DAPO, DARO)
    group_mean  A_i = r_i - mean_q                        (Dr. GRPO)
    batch_std   A_i = (r_i - mean_q) / (std_batch + eps)  (LIPO)

With overlong shaping the advantages use DAPO's soft length penalty mapped onto our 0/1
rewards (daro_jax.rewards.shaping.shape_rewards: r + R_length / 2, L_max = max_response_len,
L_cache = overlong_cache); groups are always formed from the verifier's correctness, so
pass the unshaped verifier rewards. With the KL in the reward (kl_placement "reward") each
response's reward also loses its penalty beta sum_t kl (`losses.kl_reward_penalty`) before
the advantages.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from daro_jax.algo.presets import AlgoSpec
from daro_jax.rewards.shaping import shape_rewards

CORRECT_THRESHOLD = 0.5  # a response is correct when its verifier reward is >= this


class Groups(NamedTuple):
    advantages: jax.Array  # [B, K] float32
    group_ids: jax.Array  # [B, K] int32: k = #correct of the row's prompt
    pass_rate: jax.Array  # [B] mu = k / K
    rewards: jax.Array  # [B, K] rewards the advantages use (after overlong shaping, KL penalty)
    stats: dict[str, jax.Array]  # rollout metrics, see `group_advantages`


def group_advantages(
    rewards: jax.Array, lengths: jax.Array, spec: AlgoSpec, penalty: jax.Array | None = None
) -> Groups:
    """Pass-rate groups and advantages of a batch of B prompts x K responses.

    rewards: [B, K] verifier rewards (0/1; not yet shaped); lengths: [B, K] response tokens;
    penalty: [B, K] subtracted from the (shaped) rewards before the advantages (the KL in
    the reward), or None. A prompt whose K lengths are all 0 is padding: it is left out of
    the batch std and of the stats. stats: "reward" (mean shaped reward, without the
    penalty), "accuracy", "group_prompts" [K+1] (prompts per k), "length_correct",
    "length_incorrect" (mean response length), and "kl_penalty" (its mean) with a penalty.
    """
    if rewards.ndim != 2 or rewards.shape[1] != spec.k:
        raise ValueError(f"rewards must be [B, K={spec.k}], got shape {rewards.shape}.")
    rewards = rewards.astype(jnp.float32)
    correct = rewards >= CORRECT_THRESHOLD
    k = correct.sum(axis=1).astype(jnp.int32)
    group_ids = jnp.broadcast_to(k[:, None], rewards.shape)
    if spec.overlong_shaping:
        rewards = shape_rewards(
            rewards,
            lengths.astype(jnp.float32),
            spec.max_response_len,
            spec.overlong_cache,
            spec.overlong_penalty,
        )
    valid = (lengths > 0).any(axis=1)
    vmask = jnp.broadcast_to(valid[:, None], rewards.shape).astype(jnp.float32)
    n_resp = jnp.maximum(vmask.sum(), 1.0)
    stats = {"reward": (rewards * vmask).sum() / n_resp}
    if penalty is not None:
        penalty = penalty.astype(jnp.float32)
        stats["kl_penalty"] = (penalty * vmask).sum() / n_resp
        rewards = rewards - penalty
    mean_q = rewards.mean(axis=1, keepdims=True)
    centred = rewards - mean_q
    if spec.advantage == "group_mean":
        adv = centred
    else:
        if spec.advantage == "group_std":
            std = rewards.std(axis=1, ddof=spec.std_ddof, keepdims=True)
        else:
            n = vmask.sum()
            mean_b = (rewards * vmask).sum() / jnp.maximum(n, 1.0)
            sq = (jnp.square(rewards - mean_b) * vmask).sum()
            std = jnp.sqrt(sq / jnp.maximum(n - spec.std_ddof, 1.0))
        # std = 0 means centred = 0: A = 0 (also when std_eps = 0).
        adv = jnp.where(std > 0, centred / (std + spec.std_eps), 0.0)
    lengths = lengths.astype(jnp.float32)
    right = correct.astype(jnp.float32) * vmask
    wrong = (1.0 - correct.astype(jnp.float32)) * vmask
    stats |= {
        "accuracy": right.sum() / n_resp,
        "group_prompts": jnp.bincount(k, weights=valid.astype(jnp.float32), length=spec.k + 1),
        "length_correct": (lengths * right).sum() / jnp.maximum(right.sum(), 1.0),
        "length_incorrect": (lengths * wrong).sum() / jnp.maximum(wrong.sum(), 1.0),
    }
    return Groups(adv, group_ids, k / spec.k, rewards, stats)
