"""Scoring one completion against a gold answer, in-process: 1.0 if equivalent, else 0.0.

Pipeline of `score_item` (every step after extraction runs under one deadline):

1. `extract_answer`: last `\\boxed{}` (plus the configured fallback), capped lengths.
2. refusals before SymPy: bracket nesting deeper than `max_nesting`, Python-like payloads
   (`__`), then, after parsing, expressions whose `digits_bound` exceeds `max_digits`.
3. `normalize`: math-verify's own normalization of a boxed answer (`normalize_latex` of
   latex2sympy2_extended with math-verify's settings), after joining `1\\,234` groups.
4. fast paths on the normalized text, which give exactly the verdict of step 5 without
   SymPy: the answer equals the gold (the gold's verdict against itself, cached); both are
   plain rationals (`-12`, `1,234`, `3/4`, `\\frac{3}{4}`, `2.50`), or the answer is
   `x = <rational>` against a plain-rational gold, and the values are equal, or exact and
   unequal.
5. parse with latex2sympy2_extended through math-verify's `parse_latex_cached` (the call
   math-verify's `parse` makes for a boxed answer; it builds SymPy objects without `eval`;
   math-verify's plain-expression extraction, which calls `sympy.parse_expr`, is never
   used), `math_verify.verify`, then the corrections of `guards` (set vs tuple, number
   bases, percentages, tiny magnitudes).

Verdicts are LRU-cached per (answer, gold) (`judge`); a gold is normalized once
(`parse_gold`) and parsed by SymPy once, only if a comparison needs it. No SymPy object is
converted to text or logged here; only floats and reason names leave this module.
"""

import dataclasses
import math
import re
import signal
import threading
import time
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

from latex2sympy2_extended.latex2sympy2 import normalize_latex
from math_verify import LatexExtractionConfig, verify
from math_verify.parser import parse_latex_cached
from sympy import Basic, MatrixBase

from daro_jax.rewards import guards
from daro_jax.rewards.extract import FALLBACKS, extract_answer

REASONS = (
    "correct",
    "wrong",
    "no_answer",
    "too_long",
    "prescreened",
    "parse_failures",
    "gold_failures",
    "timeouts",
    "memory_errors",
    "errors",
    "crashes",
)

_BOXED_NORMALIZATION = dataclasses.replace(
    LatexExtractionConfig().normalization_config, boxed="last"
)
_INT = r"(?:0|[1-9]\d*|[1-9]\d{0,2}(?:,\d{3})+)"
_RATIONAL_RE = re.compile(
    rf"(?P<sign>-?)(?:(?P<num>{_INT})(?:/(?P<den>[1-9]\d*))?"
    rf"|\\[dt]?frac\{{(?P<fnum>{_INT})\}}\{{(?P<fden>[1-9]\d*)\}})"
)
_DECIMAL_RE = re.compile(rf"-?{_INT}\.\d+")
_THIN_SPACE_GROUP_RE = re.compile(r"(?<=\d)\\[,;: ](?=\d{3}(?!\d))")
_ASSIGNMENT_RE = re.compile(r"[A-Za-z]\s*=\s*(?P<rhs>[^=]+)")


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """Settings of one verifier (picklable, shared by `math_reward` and the pool workers).

    fallback: extraction when there is no box: "none", "answer_is", "last_number".
    timeout_s: deadline of one item (SIGALRM, main thread only; the pool also kills).
    max_chars: only the last max_chars characters of a completion are searched.
    max_answer_chars: longer answers are refused. max_nesting: deeper bracket nesting is
    refused. max_digits: bound for `guards.digits_bound` of a parsed answer.
    """

    fallback: str = "none"
    timeout_s: float = 5.0
    max_chars: int = 4000
    max_answer_chars: int = 1000
    max_nesting: int = 50
    max_digits: float = 100_000.0

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback={self.fallback!r} is not one of {FALLBACKS}.")
        for name in ("timeout_s", "max_chars", "max_answer_chars", "max_nesting", "max_digits"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VerifierConfig.{name}={getattr(self, name)!r} must be > 0.")


class ItemTimeout(BaseException):
    """Raised by `deadline` (a BaseException, so math-verify's `except Exception` lets it
    through instead of turning it into a silent False)."""


def deadline(seconds: float, repeat_s: float = 0.1) -> "_Deadline":
    """Context manager: raise `ItemTimeout` in the block once `seconds` have passed, and again
    every `repeat_s` until the block has exited, so an alarm that lands where it is swallowed
    (a finalizer, a callback, an `except BaseException`) is followed by another.

    A block still running at `seconds` ends with `ItemTimeout`: a block that swallowed it and
    then returned, or raised an `Exception`, has `ItemTimeout` raised from its exit (chained
    to that exception); other BaseExceptions (KeyboardInterrupt ...) pass unchanged. Code
    that swallows every alarm is not bounded (the pool kills such a worker).

    SIGALRM and ITIMER_REAL, in the main thread only; elsewhere the block runs without a
    deadline and the caller must bound it, as the pool does. A caller's own SIGALRM handler
    is restored on exit and its timer re-armed with the time it had left (at least 1 ms: an
    alarm due during the block fires just after it) and its interval. In a process with
    other threads, an alarm sent as the block ends may be handled late, by the caller's
    handler, as with any timer cancelled at the moment it fires. Single use."""
    return _Deadline(seconds, repeat_s)


class _Deadline:
    """The context manager of `deadline`. While one of its methods is on the stack (including
    what they call, such as `signal.signal`), an alarm only marks the deadline as passed, so
    entering and leaving are never interrupted half-way."""

    def __init__(self, seconds: float, repeat_s: float):
        self._seconds = seconds
        self._repeat_s = repeat_s
        self._armed = False
        self._expired = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._start = time.monotonic()
        self._previous = signal.signal(signal.SIGALRM, self._tick)
        self._outer = signal.setitimer(signal.ITIMER_REAL, self._seconds, self._repeat_s)
        self._armed = True
        return self

    def __exit__(self, exc_type, exc, traceback):
        if not self._armed:
            return False
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, self._previous)
        outer_delay, outer_interval = self._outer
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - self._start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)
        if self._expired and (exc is None or isinstance(exc, Exception)):
            raise ItemTimeout from exc
        return False

    def _tick(self, signum, frame):
        if time.monotonic() < self._start + self._seconds:
            return  # a late alarm of a timer set before this block's
        self._expired = True
        while frame is not None:
            if frame.f_code in _UNINTERRUPTED:
                return
            frame = frame.f_back
        raise ItemTimeout


_UNINTERRUPTED = frozenset(
    method.__code__ for method in (_Deadline.__enter__, _Deadline.__exit__, _Deadline._tick)
)


def normalize(answer: str) -> str:
    """The text latex2sympy2_extended parses for `\\boxed{answer}` in math-verify (its
    `normalize_latex`: units, `\\text`, `\\left`, `0.5` -> `\\frac{1}{2}` ...), after
    joining thousands groups written with a LaTeX space (`1\\,234`, read as a product)."""
    answer = _THIN_SPACE_GROUP_RE.sub("", answer)
    return normalize_latex("\\boxed{" + answer + "}", _BOXED_NORMALIZATION)


def _parse(normalized: str) -> list:
    """What math-verify's `parse` returns for a boxed answer: [SymPy object, normalized
    text], or [normalized text] if it does not parse ([] if empty)."""
    if not normalized:
        return []
    try:
        return [parse_latex_cached(normalized), normalized]
    except Exception:  # the grammar rejects the text: keep it for string comparison
        return [normalized]


def _first_sympy(parsed: list):
    return next((p for p in parsed if isinstance(p, (Basic, MatrixBase))), None)


def rational_value(text: str) -> tuple[Fraction, bool] | None:
    """(value, is_exact) of a plain number: integer (optionally with `,ddd` groups),
    `a/b`, `\\frac{a}{b}` (exact), or a decimal `-1.50` (not exact); else None."""
    text = text.strip()
    match = _RATIONAL_RE.fullmatch(text)
    if match:
        num = match["num"] or match["fnum"]
        den = match["den"] or match["fden"] or "1"
        value = Fraction(int(num.replace(",", "")), int(den))
        return (-value if match["sign"] else value), True
    if _DECIMAL_RE.fullmatch(text):
        return Fraction(text.replace(",", "")), False
    return None


class Gold(NamedTuple):
    """A gold answer: its normalized text and its plain-number value (`rational_value`)."""

    text: str
    number: tuple[Fraction, bool] | None


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> Gold:
    """Normalize a gold answer once (LRU-cached on the string)."""
    text = normalize(gold)
    return Gold(text, rational_value(text))


@lru_cache(maxsize=4096)
def _parse_gold_text(text: str) -> list:
    """SymPy parse of a normalized gold, done once and only when a comparison needs it."""
    return _parse(text)


@lru_cache(maxsize=4096)
def _gold_matches_itself(text: str) -> bool:
    """Verdict of a normalized gold against itself (`_parse` is deterministic, so the
    gold's own parse stands for the answer's)."""
    parsed = _parse_gold_text(text)
    return _compare_parsed(parsed, parsed, math.inf) == "correct"


def _compare(answer: str, gold: Gold, *, fast: bool = True, max_digits: float = 1e5) -> str:
    """Reason of the verdict of a normalized `answer`: "correct", "wrong", "parse_failures"
    (it does not parse and is not equal to the gold as a string) or "prescreened"
    (`guards.too_large`). fast=False skips the fast paths (the tests use it to show that
    both give the same verdict)."""
    if fast:
        verdict = _fast_verdict(answer, gold)
        if verdict is not None:
            return "correct" if verdict else "wrong"
    if guards.set_tuple_mismatch(gold.text, answer) or guards.base_mismatch(gold.text, answer):
        return "wrong"
    return _compare_parsed(_parse(answer), _parse_gold_text(gold.text), max_digits)


def _fast_verdict(answer: str, gold: Gold) -> bool | None:
    """The verdict when it is known without SymPy (step 4 of the module docstring)."""
    if gold.number is not None:
        assignment = _ASSIGNMENT_RE.fullmatch(answer)
        number = rational_value(assignment["rhs"] if assignment else answer)
        if number is not None:
            if number[0] == gold.number[0]:
                return True
            if number[1] and gold.number[1]:
                return False
    if answer == gold.text:
        return _gold_matches_itself(gold.text)
    return None


def _compare_parsed(pred: list, gold: list, max_digits: float) -> str:
    pred_expr, gold_expr = _first_sympy(pred), _first_sympy(gold)
    if pred_expr is None:
        return "correct" if verify(gold, pred, timeout_seconds=None) else "parse_failures"
    if guards.too_large(pred_expr, max_digits):
        return "prescreened"
    if not verify(gold, pred, allow_set_relation_comp=True, timeout_seconds=None):
        gold_pct, pred_pct = guards.percent_value(gold_expr), guards.percent_value(pred_expr)
        if (gold_pct is None) == (pred_pct is None):
            return "wrong"
        gold_expr = gold_expr if gold_pct is None else gold_pct
        pred_expr = pred_expr if pred_pct is None else pred_pct
        if not verify(gold_expr, pred_expr, timeout_seconds=None):
            return "wrong"
    return "wrong" if guards.numeric_disagreement(gold_expr, pred_expr) else "correct"


@lru_cache(maxsize=16384)
def judge(answer: str, gold: str, max_digits: float = 1e5) -> str:
    """Reason of the verdict of an extracted `answer` against `gold`: "correct", "wrong",
    "parse_failures", "prescreened" or "gold_failures" (an empty gold). LRU-cached:
    rollouts of one prompt often repeat an answer. Timeouts and memory errors propagate
    and are not cached."""
    parsed_gold = parse_gold(gold)
    if not parsed_gold.text:
        return "gold_failures"
    return _compare(normalize(answer), parsed_gold, max_digits=max_digits)


def clear_caches() -> None:
    """Empty this process's gold, parse and verdict caches (and math-verify's parse cache),
    e.g. to measure or to test the uncached path."""
    for cached in (parse_gold, _parse_gold_text, _gold_matches_itself, judge, parse_latex_cached):
        cached.cache_clear()


def score_item(completion: str, gold: str, config: VerifierConfig) -> tuple[float, str]:
    """(reward, reason) of one completion; reason is one of `REASONS` ("correct" or "wrong"
    when the answer was judged, otherwise why it scored 0)."""
    extraction = extract_answer(
        completion,
        config.fallback,
        max_chars=config.max_chars,
        max_answer_chars=config.max_answer_chars,
    )
    answer = extraction.answer
    if answer is None:
        return 0.0, extraction.reason
    if "__" in answer or guards.nesting_depth(answer) > config.max_nesting:
        return 0.0, "prescreened"
    try:
        with deadline(config.timeout_s):
            reason = judge(answer, gold, config.max_digits)
    except ItemTimeout:
        return 0.0, "timeouts"
    except MemoryError:
        return 0.0, "memory_errors"
    except RecursionError:
        return 0.0, "prescreened"
    except Exception:  # any other failure of the parser or of SymPy: scored 0, counted
        return 0.0, "errors"
    return (1.0 if reason == "correct" else 0.0), reason


def math_reward(
    completion: str, gold: str, *, fallback: str = "none", timeout_s: float = 5.0
) -> float:
    """1.0 if the final answer of `completion` is equivalent to `gold`, else 0.0.

    In-process, for tests and small evaluations: the deadline (SIGALRM) works in the main
    thread only, and an item it interrupts leaves the libraries in whatever state it
    reached; `RewardPool` replaces such a worker. Use the pool in training."""
    return score_item(completion, gold, _config(fallback, timeout_s))[0]


@lru_cache(maxsize=16)
def _config(fallback: str, timeout_s: float) -> VerifierConfig:
    return VerifierConfig(fallback=fallback, timeout_s=timeout_s)
