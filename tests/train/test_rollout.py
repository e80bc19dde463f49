"""DAPO's dynamic sampling on the host (daro_jax/train/rollout.py), with P processes simulated in
one: each simulated process draws its rows of a global round, and its `gather` returns the
whole round, as jax's process_allgather does on a pod. The expected batches are derived
independently with plain loops over the rounds."""

import logging

import numpy as np
import pytest
from helpers import load_config_file

from daro_jax.algo import presets
from daro_jax.train import rollout

K = 4


def spec(**overrides):
    cfg = load_config_file("configs/base.py").algo
    cfg.name = "dapo"
    cfg.k = K
    cfg.overlong_cache = 2
    for key, value in overrides.items():
        cfg[key] = value
    return presets.resolve(cfg, max_response_len=8)


def make_rounds(n_rounds, prompts, seed, solved=0.3, failed=0.3):
    """Global rounds of `prompts` prompts: rewards [prompts, K] (a share of prompts all
    right, a share all wrong, the others mixed) and rollouts with an id per prompt."""
    rng = np.random.default_rng(seed)
    rounds = []
    for r in range(n_rounds):
        kind = rng.choice(3, prompts, p=[solved, failed, 1 - solved - failed])
        k = np.where(kind == 0, K, np.where(kind == 1, 0, rng.integers(1, K, prompts)))
        rewards = (np.arange(K)[None] < k[:, None]).astype(np.float32)
        rewards = rng.permuted(rewards, axis=1)
        ids = r * prompts + np.arange(prompts)
        lengths = rng.integers(1, 9, (prompts, K))
        data = {
            "id": ids,
            "lengths": lengths,
            "mask": (np.arange(8) < lengths[..., None]).astype(np.int32),
            "truncated": lengths == 8,
            "prompt_tokens": np.repeat(ids[:, None], 3, 1),
        }
        rounds.append((rewards, data))
    return rounds


def expected_batch(rounds, batch_prompts, max_tries):
    """Plain loop: walk the rounds prompt by prompt, keep 0 < k < K, stop when full."""
    kept, tries = [], 0
    for rewards, data in rounds[:max_tries]:
        if len(kept) >= batch_prompts:
            break
        tries += 1
        for i in range(len(rewards)):
            k = int((rewards[i] >= 0.5).sum())
            if 0 < k < K and len(kept) < batch_prompts:
                kept.append(int(data["id"][i]))
    return kept, tries


def collect_simulated(rounds, batch_prompts, processes, algo):
    """collect() on each of `processes` simulated processes; their outputs and the rounds
    each one drew."""
    outs, drawn = [], []
    per = len(rounds[0][0]) // processes
    for p in range(processes):
        current, calls = {}, []

        def draw(r, p=p, current=current, calls=calls):
            calls.append(r)
            current["round"] = rounds[r]
            rewards, data = rounds[r]
            rows = slice(p * per, (p + 1) * per)
            return rewards[rows], {name: x[rows] for name, x in data.items()}

        def gather(local, current=current):
            assert len(local[0]) == per  # this process's rows only
            return current["round"]

        outs.append(rollout.collect(draw, algo, batch_prompts, (p, processes), gather))
        drawn.append(calls)
    return outs, drawn


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_every_process_keeps_the_same_prompts_as_one_process(processes):
    rounds = make_rounds(6, prompts=8, seed=processes)
    algo = spec()
    outs, drawn = collect_simulated(rounds, 8, processes, algo)
    kept, tries = expected_batch(rounds, 8, algo.dynamic_sampling_max_tries)
    assert len(kept) == 8 and tries >= 2  # several rounds were needed
    assert all(calls == list(range(tries)) for calls in drawn)  # same rounds everywhere
    ids = np.concatenate([data["id"] for _, data, _ in outs])
    np.testing.assert_array_equal(ids, kept)  # process p holds rows [p B/P, (p+1) B/P)
    rewards = np.concatenate([r for r, _, _ in outs])
    k = (rewards >= 0.5).sum(1)
    assert np.all((k > 0) & (k < K))
    by_id = {int(i): r for rw, d in rounds for i, r in zip(d["id"], rw, strict=True)}
    np.testing.assert_array_equal(rewards, [by_id[i] for i in kept])
    sampled = rounds[:tries]
    accuracy = np.mean(np.concatenate([r for r, _ in sampled]) >= 0.5)
    for _, _, metrics in outs:
        assert metrics == {
            "dynamic/tries": tries,
            "dynamic/kept_prompts": 8,
            "dynamic/sampled_prompts": 8 * tries,
            "dynamic/batch_full": 1.0,
            "dynamic/sampled_accuracy": pytest.approx(accuracy),
        }


@pytest.mark.parametrize("processes", [1, 2])
def test_short_batch_trains_on_what_it_has(processes, caplog):
    """After max_tries rounds the batch is short: the kept prompts come first, the free rows
    are padding (no tokens, reward 0), batch_full is 0 and a warning says so."""
    rounds = make_rounds(3, prompts=8, seed=7, solved=0.4, failed=0.4)
    algo = spec(dynamic_sampling_max_tries=2)
    with caplog.at_level(logging.WARNING):
        outs, drawn = collect_simulated(rounds, 8, processes, algo)
    kept, tries = expected_batch(rounds, 8, 2)
    assert tries == 2 and 0 < len(kept) < 8
    assert all(calls == [0, 1] for calls in drawn)
    assert (
        f"{len(kept)} of 8 prompts" in caplog.text and "dynamic_sampling_max_tries" in caplog.text
    )
    rewards = np.concatenate([r for r, _, _ in outs])
    data = {name: np.concatenate([d[name] for _, d, _ in outs]) for name in outs[0][1]}
    np.testing.assert_array_equal(data["id"][: len(kept)], kept)
    pad = slice(len(kept), None)
    assert not data["lengths"][pad].any() and not data["mask"][pad].any()
    assert not data["truncated"][pad].any() and not rewards[pad].any()
    assert outs[0][2]["dynamic/batch_full"] == 0.0
    assert outs[0][2]["dynamic/kept_prompts"] == len(kept)


def test_no_mixed_prompt_gives_no_rollout():
    rounds = make_rounds(2, prompts=4, seed=1, solved=0.5, failed=0.5)
    rewards, data, metrics = rollout.collect(
        lambda r: rounds[r], spec(dynamic_sampling_max_tries=2), 4, (0, 1), lambda x: x
    )
    assert data is None and metrics["dynamic/kept_prompts"] == 0


def test_without_dynamic_sampling_one_round_as_drawn():
    rounds = make_rounds(2, prompts=4, seed=2)
    calls = []

    def draw(r):
        calls.append(r)
        return rounds[r]

    rewards, data, metrics = rollout.collect(draw, spec(dynamic_sampling=False), 4, (0, 1))
    assert calls == [0] and metrics == {}
    assert rewards is rounds[0][0] and data is rounds[0][1]


def test_pad_prompts():
    rounds = make_rounds(1, prompts=3, seed=3)
    data = rollout.pad_prompts(rounds[0][1], 5)
    np.testing.assert_array_equal(data["id"], [0, 1, 2, 0, 0])
    for name in rollout.PADDING_ZEROS:
        assert not data[name][3:].any()
        np.testing.assert_array_equal(data[name][:3], rounds[0][1][name])
    assert rounds[0][1]["lengths"].all()  # the input is not modified


def test_mixed():
    rewards = np.array([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]], np.float32)
    np.testing.assert_array_equal(rollout.mixed(rewards), [False, True, False, True])
