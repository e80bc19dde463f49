"""`RewardPool`: identical to `math_reward` under load, deadline kills, crashes, memory
limit, counters and lifecycle."""

import os
import random
import signal
import threading
import time

import numpy as np
import pytest

from daro_jax.rewards import REASONS, RewardPool, math_reward
from daro_jax.rewards.verify import ItemTimeout, deadline

SLOW = "\\boxed{\\sum_{k=1}^{3000} k^{k}}"  # passes the prescreen, then computes for minutes
# (gold, boxed answer) pairs covering the fast paths and the SymPy path
PAIRS = [
    ("\\frac{14}{3}", "14/3"),
    ("\\frac{14}{3}", "4\\frac{2}{3}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("2\\sqrt{3}", "3\\sqrt{2}"),
    ("(-\\infty, 3)", "(-\\infty,3)"),
    ("\\{1,2\\}", "(1,2)"),
    ("\\text{(C)}", "C"),
    ("90^\\circ", "90"),
    ("x=3", "3"),
    ("25\\%", "0.25"),
    ("1,234", "1234"),
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}"),
    ("3+4i", "4i+3"),
    ("p - q", "q - p"),
]


def _mixed_items(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, golds = [], []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            gold, answer = rng.choice(PAIRS)
            text = f"Step {i}: simplify. The result is $\\boxed{{{answer}}}$."
        elif kind in (1, 2):
            value = rng.randint(-300, 3000)
            gold = str(value)
            answer = rng.choice([f"{value:,}", str(value + rng.choice((-1, 1))), f"x = {value}"])
            text = (
                f"We compute {rng.randint(2, 9)} + {rng.randint(2, 9)} then get \\boxed{{{answer}}}"
            )
        elif kind == 3:
            num, den = rng.randint(1, 40), rng.randint(2, 40)
            gold = f"\\frac{{{num}}}{{{den}}}"
            answer = rng.choice(
                [f"{num}/{den}", f"\\frac{{{2 * num}}}{{{2 * den}}}", f"{num + 1}/{den}"]
            )
            text = f"Hence the probability is $\\boxed{{{answer}}}$."
        else:
            gold = str(rng.randint(1, 99))
            text = rng.choice(["I am not sure.", f"The answer is {gold}.", "\\boxed{"])
        completions.append(text)
        golds.append(gold)
    return completions, golds


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2, 10.0) as p:  # generous: these tests are about results, not deadlines
        yield p


def test_2000_items_identical_to_math_reward(pool):
    completions, golds = _mixed_items(2000)
    pool.pop_stats()
    rewards = pool.score(completions, golds)
    stats = pool.pop_stats()
    expected = np.array([math_reward(c, g) for c, g in zip(completions, golds, strict=True)])
    assert rewards.dtype == np.float32 and rewards.shape == (2000,)
    np.testing.assert_array_equal(rewards, expected)
    assert 200 < rewards.sum() < 1800
    assert stats["items"] == 2000
    assert stats["correct"] == int(rewards.sum())
    assert sum(stats[reason] for reason in REASONS) == 2000
    assert stats["timeouts"] == stats["crashes"] == stats["worker_restarts"] == 0


def test_soft_timeout_replaces_worker():
    with RewardPool(1, 1.0) as pool:
        pool.score(["\\boxed{1}"], ["1"])
        old = pool.worker_pids
        pool.pop_stats()
        start = time.monotonic()
        rewards = pool.score([SLOW, "\\boxed{5}"], ["5", "5"])
        assert time.monotonic() - start < 1.0 + 1.0
        stats = pool.pop_stats()
        assert rewards.tolist() == [0.0, 1.0]
        assert stats["timeouts"] == 1 and stats["worker_restarts"] == 1
        assert pool.worker_pids != old


def _score_while(pool, sig, completions, golds, delay=0.2):
    """Score with the worker(s) hit by `sig` after `delay` seconds (a C-level hang is
    simulated by SIGSTOP: the worker stops answering, its own alarm cannot fire)."""
    pids = pool.worker_pids
    timer = threading.Timer(delay, lambda: [os.kill(pid, sig) for pid in pids])
    timer.start()
    try:
        start = time.monotonic()
        rewards = pool.score(completions, golds)
        return rewards, time.monotonic() - start
    finally:
        timer.cancel()


@pytest.mark.parametrize(
    ("sig", "reason"), [(signal.SIGSTOP, "timeouts"), (signal.SIGKILL, "crashes")]
)
def test_hung_or_dead_worker_is_replaced(sig, reason):
    with RewardPool(1, 1.0) as pool:
        pool.score(["\\boxed{1}"], ["1"])
        old = pool.worker_pids
        completions = [SLOW, "\\boxed{5}", "\\boxed{6}", "\\boxed{5}"]
        rewards, elapsed = _score_while(pool, sig, completions, ["5"] * 4)
        stats = pool.pop_stats()
        assert rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
        assert stats[reason] == 1 and stats["worker_restarts"] == 1
        assert pool.worker_pids != old
        assert elapsed < 1.0 + 1.0 + 2.0  # deadline + grace, then a fresh worker's start
        assert pool.score(["\\boxed{7}"], ["7"]).tolist() == [1.0]


def test_interrupted_call_leaves_no_stale_answers():
    with RewardPool(1, 5.0) as pool:
        with pytest.raises(ItemTimeout), deadline(0.5):
            pool.score([SLOW, "\\boxed{1}"], ["5", "1"])
        assert pool.score(["\\boxed{6}", "\\boxed{7}"], ["6", "0"]).tolist() == [1.0, 0.0]


def test_memory_limit_is_applied():
    with RewardPool(1, 2.0, memory_limit_mb=64, max_digits=float("inf")) as pool:
        (pid,) = pool.worker_pids
        pool.score(["\\boxed{1}"], ["1"])
        with open(f"/proc/{pid}/limits") as limits:
            line = next(row for row in limits if row.startswith("Max address space"))
        soft = int(line.split()[3])
        with open(f"/proc/{pid}/status") as status:
            vm = next(int(row.split()[1]) for row in status if row.startswith("VmSize")) * 1024
        assert vm < soft <= vm + 64 * 2**20 + 2**26
        start = time.monotonic()
        assert pool.score(["\\boxed{10^{10^{9}}}"], ["5"]).tolist() == [0.0]
        assert time.monotonic() - start < 2.0 + 1.0
        assert pool.score(["\\boxed{8}"], ["8"]).tolist() == [1.0]


def test_counters_and_lifecycle():
    pool = RewardPool(1, 2.0, fallback="last_number")
    assert pool.score([], []).shape == (0,)
    pool.score(["so 5 + 3 = 8.", "nothing"], ["8", "8"])
    assert pool.stats["items"] == 2
    assert pool.stats["items"] == 2  # reading does not reset
    stats = pool.pop_stats()
    assert (stats["correct"], stats["no_answer"]) == (1, 1)
    assert pool.pop_stats()["items"] == 0
    # A per-call fallback, then the pool's own again: "so 5 + 3 = 8." has no box.
    assert pool.score(["so 5 + 3 = 8.", "\\boxed{8}"], ["8", "8"], fallback="none").tolist() == [
        0.0,
        1.0,
    ]
    assert pool.score(["so 5 + 3 = 8."], ["8"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="fallback='every'"):
        pool.score(["1"], ["1"], fallback="every")
    pool.pop_stats()
    with pytest.raises(ValueError, match="golds"):
        pool.score(["a", "b"], ["1"])
    pids = pool.worker_pids
    pool.close()
    pool.close()
    time.sleep(0.1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="close"):
        pool.score(["\\boxed{1}"], ["1"])


def test_argument_errors():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(0, 1.0)
    with pytest.raises(ValueError, match="fork"):
        RewardPool(1, 1.0, start_method="fork")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(1, 0.0)
