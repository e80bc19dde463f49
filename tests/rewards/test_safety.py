"""Model output is never executed, and hostile answers (towers, huge factorials, deep
nesting, megabytes of text, slow sums) score 0 within timeout + 1 s, in-process and in the
pool, which keeps scoring afterwards."""

import collections
import contextlib
import re
import signal
import sys
import time

import pytest
import sympy.parsing.sympy_parser as sympy_parser

from daro_jax.rewards import RewardPool, math_reward
from daro_jax.rewards.verify import ItemTimeout, clear_caches, deadline

TIMEOUT_S = 1.0
PAYLOADS = [
    "__import__('os').system('touch {path}')",
    "().__class__.__bases__[0].__subclasses__()",
    "print(open('{path}', 'w')) or 2\\pi",
    "open('{path}', 'w').write('x')",
    "eval(\"open('{path}', 'w')\")",
    "exec(\"open('{path}', 'w')\")",
    "(lambda: open('{path}', 'w'))()",
    "getattr(open, '__call__')('{path}', 'w')",
    "x.__globals__['os'].system('touch {path}')",
]
HAZARDS = {
    "exponent tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge factorial": "\\boxed{(10^{10})!}",
    "nested log base": "\\boxed{\\log_{2^{2^{2^{2^{100}}}}} 3}",
    "slow sum": "\\boxed{\\sum_{k=1}^{3000} k^{k}}",
    "1 MB of text": "lorem ipsum " * 90_000 + "\\boxed{1+1}",
    "1 MB in the box": "\\boxed{" + "1+" * 500_000 + "1}",
    "10,000 nested braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "400 nested braces": "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
    "400 nested parens": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
}


def _completions(path) -> list[str]:
    out = []
    for payload in PAYLOADS:
        text = payload.format(path=path)
        out += [f"so $\\boxed{{{text}}}$", f"The answer is {text}", f"$$ {text} $$ 7"]
    return out


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2, TIMEOUT_S) as p:
        yield p


def test_payloads_never_execute_in_process(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    seen = []
    original = sympy_parser.stringify_expr

    def spy(text, *args, **kwargs):
        seen.append(text)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(sympy_parser, "stringify_expr", spy)
    clear_caches()
    for completion in _completions(target):
        for fallback in ("none", "answer_is", "last_number"):
            assert math_reward(completion, "2\\pi", fallback=fallback) == 0.0
    assert not target.exists()
    # SymPy's string parser (the route to eval) only ever sees the grammar's own tokens.
    assert all(re.fullmatch(r"[A-Za-z0-9.]+", s) for s in seen), seen
    assert not any(word in s for s in seen for word in ("open", "import", "touch", "system"))


def test_payloads_never_execute_in_pool(tmp_path, pool):
    target = tmp_path / "pwned"
    completions = _completions(target)
    rewards = pool.score(completions, ["2\\pi"] * len(completions))
    assert rewards.tolist() == [0.0] * len(completions)
    assert not target.exists()


@pytest.mark.parametrize("name", list(HAZARDS))
def test_hazards_in_process(name):
    start = time.monotonic()
    assert math_reward(HAZARDS[name], "5", timeout_s=TIMEOUT_S) == 0.0
    assert time.monotonic() - start < TIMEOUT_S + 1.0


@pytest.mark.parametrize("name", list(HAZARDS))
def test_hazards_in_pool_then_next_batch(name, pool):
    start = time.monotonic()
    assert pool.score([HAZARDS[name]], ["5"]).tolist() == [0.0]
    assert time.monotonic() - start < TIMEOUT_S + 1.0
    assert pool.score(["\\boxed{5}", "\\boxed{4}"], ["5", "5"]).tolist() == [1.0, 0.0]


def test_hazard_batch_counters(pool):
    pool.pop_stats()
    rewards = pool.score(list(HAZARDS.values()), ["5"] * len(HAZARDS))
    stats = pool.pop_stats()
    assert rewards.tolist() == [0.0] * len(HAZARDS)
    assert stats["items"] == len(HAZARDS)
    assert stats["timeouts"] == 1  # the slow sum
    assert stats["wrong"] == 1  # 1 MB of text ending in \boxed{1+1}: read, and judged
    assert stats["prescreened"] == 5  # tower, factorial, log base, 400 braces, 400 parens
    assert stats["no_answer"] == 2  # the box starts before the last 4,000 characters


def _busy(until: float) -> None:
    while time.monotonic() < until:
        time.sleep(0.005)


class _SlowFinalizer:
    def __init__(self, until: float):
        self.until = until

    def __del__(self):
        _busy(self.until)


def _swallow_in_except(seen: list, until: float) -> None:
    for _ in range(3):
        try:
            _busy(until)
        except BaseException as exc:  # a library that catches everything, three times
            seen.append(exc)


def _swallow_in_finalizer(seen: list, until: float, monkeypatch) -> None:
    monkeypatch.setattr(sys, "unraisablehook", lambda hook_args: seen.append(hook_args.exc_value))
    finalizer = _SlowFinalizer(until)
    del finalizer  # __del__ runs now and is still running when the alarm comes


@pytest.mark.parametrize("where", ["except BaseException", "__del__"])
def test_deadline_survives_swallowed_alarms(where, monkeypatch):
    """The first alarms land where they are swallowed; the block still ends with ItemTimeout
    within the deadline + 1 s (a one-shot alarm would let it run to its end, 3 s later)."""
    seen = []
    start = time.monotonic()
    end = start + TIMEOUT_S + 2.0
    with pytest.raises(ItemTimeout), deadline(TIMEOUT_S):
        if where == "__del__":
            _swallow_in_finalizer(seen, end, monkeypatch)
        else:
            _swallow_in_except(seen, end)
        _busy(end)
    assert time.monotonic() - start < TIMEOUT_S + 1.0
    assert seen and all(isinstance(exc, ItemTimeout) for exc in seen)
    assert len(seen) == (1 if where == "__del__" else 3)


@pytest.mark.parametrize("exit_with", [None, ValueError, KeyboardInterrupt])
def test_expired_block_that_swallowed_the_alarm(exit_with):
    """A block that swallowed its only alarm (no repeat within its run) and then returns or
    raises an Exception ends with ItemTimeout; KeyboardInterrupt passes unchanged."""
    start = time.monotonic()
    expected = KeyboardInterrupt if exit_with is KeyboardInterrupt else ItemTimeout
    with pytest.raises(expected) as raised, deadline(0.1, repeat_s=60.0):
        with contextlib.suppress(ItemTimeout):
            _busy(start + 0.5)
        if exit_with is not None:
            raise exit_with
    if exit_with is ValueError:
        assert isinstance(raised.value.__cause__, ValueError)
    else:
        assert raised.value.__cause__ is None


@pytest.fixture
def own_alarm():
    """The test's own SIGALRM: no handler or timer of the harness's in the way; they are put
    back afterwards."""
    handler = signal.getsignal(signal.SIGALRM)
    timer = signal.setitimer(signal.ITIMER_REAL, 0.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0.0)
    signal.signal(signal.SIGALRM, handler)
    if timer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *timer)


def test_deadline_restores_an_outer_handler_and_timer(own_alarm):
    calls = []

    def outer(signum, frame):
        calls.append(time.monotonic())

    signal.signal(signal.SIGALRM, outer)
    # A caller's repeating timer, not due during the blocks: handler, delay and interval come
    # back, whether the block ran out (after swallowing alarms) or not.
    armed = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 30.0, 7.0)
    for seconds in (5.0, 0.05):
        with contextlib.suppress(ItemTimeout), deadline(seconds):
            _swallow_in_except([], time.monotonic() + 0.5)
            time.sleep(0.5)
        delay, interval = signal.getitimer(signal.ITIMER_REAL)
        assert signal.getsignal(signal.SIGALRM) is outer
        assert 30.0 - (time.monotonic() - armed) <= delay + 0.01 and delay < 30.0
        assert interval == pytest.approx(7.0)
    # A caller's alarm due during the block fires after it (not during it), once.
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    with deadline(5.0):
        time.sleep(0.4)
        block_end = time.monotonic()
    time.sleep(0.3)
    assert len(calls) == 1 and calls[0] > block_end
    # No caller's timer: none is left behind, and the handler is the caller's again.
    with pytest.raises(ItemTimeout), deadline(0.05):
        time.sleep(1.0)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is outer
    time.sleep(0.2)
    assert len(calls) == 1


def test_deadline_enter_and_exit_under_a_storm_of_alarms(own_alarm):
    """With an alarm every 20 us, entering and leaving are never interrupted half-way: each
    block ends normally or with ItemTimeout and leaves the caller's handler and no timer."""

    def outer(signum, frame):
        pass

    signal.signal(signal.SIGALRM, outer)
    outcomes = collections.Counter()
    for i in range(300):
        try:
            with deadline(1e-4 * (i % 20 + 1), repeat_s=2e-5):
                end = time.monotonic() + 1e-3
                while time.monotonic() < end:
                    pass
            outcomes["returned"] += 1
        except ItemTimeout:
            outcomes["timeouts"] += 1
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is outer
    assert outcomes["timeouts"] > 0
