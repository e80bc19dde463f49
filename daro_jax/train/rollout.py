"""From prompts to the step's rollouts and groups, with DAPO's dynamic sampling (host side).

One sampling round draws the next global batch of B prompts (each process its B / P rows,
`data.PromptIterator`), samples K responses per prompt and scores them: `draw(round)` in
`collect`, `sample_and_score` in training (prompts → sampler → texts → rewards), with the
training sampler (`make_sampler`) and the round's key (`rollout_key`, jitted by
`jit_rollout_key`). Without dynamic sampling the step uses that round as it is.

With DAPO's dynamic sampling the step keeps only the prompts with mixed results,
0 < k < K correct, and draws further rounds until B are kept, as DAPO does:

- a prompt's pass rate is a global fact: after each round every process gathers the whole
  round (rewards and rollouts of every process, in process order, which is the order of
  the one-process batch), so all processes keep the same prompts, stop after the same
  round and make the same number of (collective) sampler calls;
- the kept prompts are taken in order (round, then position in the global batch) and the
  first B form the batch; process p then holds rows [p B / P, (p + 1) B / P) of it. The
  kept batch, and so the whole step, is the same for any number of processes;
- at most `algo.dynamic_sampling_max_tries` rounds are drawn in a step. If the batch is
  still short then, the step trains on the prompts it kept: the free rows are padding
  (length 0, weight 0 in every loss and metric), a warning names the numbers, and
  `dynamic/batch_full` is 0 in the step's metrics. A step that kept no prompt makes no
  update (the RL loop warns).

`flat_advantages` forms the pass-rate groups and advantages of the step's global batch
(`daro_jax.algo.advantages`), under jit in the RL loop.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import hosts
from daro_jax.algo import advantages
from daro_jax.algo.presets import AlgoSpec
from daro_jax.models.config import ModelConfig
from daro_jax.sampling import completions, sampler

Draw = Callable[[int], tuple[np.ndarray, dict[str, np.ndarray]]]
PADDING_ZEROS = ("mask", "lengths", "truncated")  # rollout fields that are 0 on padding rows
# The sampler's outputs, per rollout.
SAMPLED = ("tokens", "mask", "logprobs", "logprobs_full", "lengths", "truncated")


def make_sampler(s, cfg: ModelConfig, k: int, prompt_len: int, stop_token_ids, mesh):
    """The training sampler (`sampler.make_sampler`), as training runs it and the plan
    compiles it: K samples of each prompt left-padded to `prompt_len`, up to
    s.max_new_tokens new tokens at s.temperature, s.top_p and s.top_k (`s`: config.sampler),
    stopping at `stop_token_ids`."""
    return sampler.make_sampler(
        cfg,
        k=k,
        max_new_tokens=s.max_new_tokens,
        prompt_len=int(prompt_len),
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        top_k=int(s.top_k),
        stop_token_ids=tuple(stop_token_ids),
        mesh=mesh,
    )


def rollout_key(seed: int, step, attempt) -> jax.Array:
    """The sampling key of a step's round: fold_in(fold_in(key(seed), step), attempt)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), attempt)


def jit_rollout_key(seed: int, mesh: Mesh) -> Callable:
    """The jitted `rollout_key` of `seed`, (step, attempt) → key, replicated on `mesh`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(functools.partial(rollout_key, seed), out_shardings=replicated)


def sample_and_score(
    sample: sampler.Sampler, params, examples, rng, tokenizer, pool, timers: dict
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One round of this process's prompts `examples` (dicts with "prompt_ids" and
    "answer"): K samples per prompt (`completions.sample_and_decode`, this process's rows
    of the global batch) and their rewards from `pool` (a `rewards.RewardPool`).

    Returns rewards [b, K] and the rollout: tokens, mask, logprobs, logprobs_full
    [b, K, N], lengths, truncated [b, K] and prompt_tokens, prompt_mask [b, P]; adds the
    seconds spent to timers["sampler_s"] and timers["reward_s"].
    """
    prompts = completions.left_pad([e["prompt_ids"] for e in examples], sample.prompt_len)
    t0 = time.perf_counter()
    out = completions.sample_and_decode(sample, params, *prompts, rng, tokenizer, per_process=True)
    t1 = time.perf_counter()
    b, k = len(examples), sample.k
    rewards = pool.score(out["texts"], [e["answer"] for e in examples for _ in range(k)])
    timers["sampler_s"] += t1 - t0
    timers["reward_s"] += time.perf_counter() - t1
    rollout = {name: out[name].reshape(b, k, *out[name].shape[1:]) for name in SAMPLED}
    rollout["prompt_tokens"], rollout["prompt_mask"] = prompts
    return rewards.reshape(b, k), rollout


def mixed(rewards: np.ndarray) -> np.ndarray:
    """[B] bool: the prompts with 0 < k < K correct responses (rewards [B, K])."""
    k = (np.asarray(rewards) >= advantages.CORRECT_THRESHOLD).sum(axis=1)
    return (k > 0) & (k < rewards.shape[1])


class DynamicSamplingInfo(NamedTuple):
    tries: int  # sampling rounds drawn
    sampled_prompts: int  # prompts drawn in all rounds, all processes
    kept_prompts: int  # prompts in the batch (<= batch_prompts)
    full: bool  # False: max_tries rounds were drawn before batch_prompts were kept
    sampled_accuracy: float  # share of correct responses over every prompt drawn


def dynamic_sampling(
    draw: Draw, batch_prompts: int, max_tries: int, gather: Callable = hosts.allgather
) -> tuple[np.ndarray, dict[str, np.ndarray], DynamicSamplingInfo]:
    """DAPO's dynamic sampling over all processes (module docstring).

    `draw(round) -> (rewards [b, K], rollout)`: this process's rows of a round (rollout: a
    dict of arrays with leading axis b); `gather` concatenates a pytree over the processes.
    Returns the rewards [n, K] and rollout of the n <= batch_prompts kept prompts of the
    global batch, identical on every process, and the info of the step."""
    if batch_prompts < 1 or max_tries < 1:
        raise ValueError(
            f"dynamic sampling needs batch_prompts >= 1 and max_tries >= 1, "
            f"got {batch_prompts} and {max_tries}."
        )
    kept: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    n_kept = n_sampled = n_correct = tries = 0
    while n_kept < batch_prompts and tries < max_tries:
        rewards, rollout = gather(draw(tries))
        rewards = np.asarray(rewards)
        tries += 1
        n_sampled += rewards.shape[0]
        n_correct += int((rewards >= advantages.CORRECT_THRESHOLD).sum())
        keep = np.flatnonzero(mixed(rewards))
        kept.append((rewards[keep], {name: np.asarray(x)[keep] for name, x in rollout.items()}))
        n_kept += keep.size
    rewards = np.concatenate([r for r, _ in kept])[:batch_prompts]
    rollout = {
        name: np.concatenate([data[name] for _, data in kept])[:batch_prompts]
        for name in kept[0][1]
    }
    info = DynamicSamplingInfo(
        tries,
        n_sampled,
        rewards.shape[0],
        n_kept >= batch_prompts,
        n_correct / (n_sampled * rewards.shape[1]),
    )
    return rewards, rollout, info


def pad_prompts(rollout: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """`rollout` padded to n prompts with copies of prompt 0 whose PADDING_ZEROS fields
    are 0: empty completions, which count nowhere in the loss and the metrics."""
    have = len(next(iter(rollout.values())))
    idx = np.concatenate([np.arange(have), np.zeros(n - have, np.int64)])
    out = {name: x[idx] for name, x in rollout.items()}
    for name in PADDING_ZEROS:
        out[name][have:] = 0
    return out


def collect(
    draw: Draw,
    spec: AlgoSpec,
    batch_prompts: int,
    process: tuple[int, int],
    gather: Callable = hosts.allgather,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None, dict[str, float]]:
    """This process's rewards [b, K] and rollouts of the step (b = batch_prompts / P, process
    = (p, P)) and the step's dynamic-sampling metrics. With dynamic sampling, the kept
    prompts padded to batch_prompts; the rollout is None when no prompt was kept."""
    if not spec.dynamic_sampling:
        rewards, rollout = draw(0)
        return rewards, rollout, {}
    rewards, rollout, info = dynamic_sampling(
        draw, batch_prompts, spec.dynamic_sampling_max_tries, gather
    )
    metrics = {
        "dynamic/tries": float(info.tries),
        "dynamic/kept_prompts": float(info.kept_prompts),
        "dynamic/sampled_prompts": float(info.sampled_prompts),
        "dynamic/batch_full": float(info.full),
        "dynamic/sampled_accuracy": info.sampled_accuracy,
    }
    if 0 < info.kept_prompts < batch_prompts:
        logging.warning(
            "dynamic sampling: %d of %d prompts with 0 < mu < 1 after %d rounds "
            "(algo.dynamic_sampling_max_tries); training on these, the other %d rows are "
            "padding. Raise the cap, or use easier or more varied prompts.",
            info.kept_prompts,
            batch_prompts,
            info.tries,
            batch_prompts - info.kept_prompts,
        )
    if info.kept_prompts == 0:
        return rewards, None, metrics
    padding = np.zeros((batch_prompts - info.kept_prompts, spec.k), rewards.dtype)
    rewards = np.concatenate([rewards, padding])
    rollout = pad_prompts(rollout, batch_prompts)
    index, count = process
    rows = slice(index * batch_prompts // count, (index + 1) * batch_prompts // count)
    return rewards[rows], {name: x[rows] for name, x in rollout.items()}, metrics


def flat_advantages(rewards: Any, lengths: Any, penalty: Any, spec: AlgoSpec):
    """Advantages and group ids flattened to rollout rows [B·K], and the rollout stats;
    `penalty` [B·K] (the KL in the reward) or None."""
    if penalty is not None:
        penalty = penalty.reshape(rewards.shape)
    groups = advantages.group_advantages(rewards, lengths, spec, penalty)
    return groups.advantages.reshape(-1), groups.group_ids.reshape(-1), groups.stats
