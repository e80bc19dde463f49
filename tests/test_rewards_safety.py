"""Model output is never executed, and hostile answers (towers, huge factorials, deep
nesting, megabytes of text, slow sums) score 0 within timeout + 1 s, in-process and in the
pool, which keeps scoring afterwards."""

import re
import signal
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


def test_deadline_interrupts_and_keeps_an_outer_alarm():
    with pytest.raises(ItemTimeout), deadline(0.05):
        time.sleep(1.0)
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with deadline(5.0):
            pass
        assert 0.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.3
        time.sleep(0.4)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
