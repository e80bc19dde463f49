"""Scoring one completion against a gold answer, in-process: 1.0 if equivalent, else 0.0.

Pipeline of `score_item` (every step after extraction runs under one deadline):

1. `extract_answer`: last `\\boxed{}` (plus the configured fallback), capped lengths.
2. refusals before SymPy: bracket nesting deeper than `max_nesting`, Python-like payloads
   (`__`), then, after parsing, expressions whose `digits_bound` exceeds `max_digits`.
3. fast paths, which give exactly the verdict of step 4 without SymPy: the answer equals
   the gold text (verdict of gold vs itself, cached per gold); both are plain rationals
   (`-12`, `1,234`, `3/4`, `\\frac{3}{4}`, `2.50`) that are equal, or exact and unequal.
4. math-verify: both sides go through `math_verify.parse` with only its LaTeX extraction
   (latex2sympy2_extended builds SymPy objects without `eval`; math-verify's plain-
   expression extraction, which calls `sympy.parse_expr`, is never used), wrapped as one
   `\\boxed{...}` so an answer is read whole; then `math_verify.verify` and the corrections
   of `guards` (set vs tuple, tiny magnitudes).

The gold is parsed once per distinct gold string (`parse_gold`, LRU-cached). No SymPy
object is converted to text or logged here; only floats and reason names leave this module.
"""

import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

from math_verify import LatexExtractionConfig, parse, verify
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

_LATEX_ONLY = (LatexExtractionConfig(),)
_INT = r"(?:0|[1-9]\d*|[1-9]\d{0,2}(?:,\d{3})+)"
_RATIONAL_RE = re.compile(
    rf"(?P<sign>-?)(?:(?P<num>{_INT})(?:/(?P<den>[1-9]\d*))?"
    rf"|\\[dt]?frac\{{(?P<fnum>{_INT})\}}\{{(?P<fden>[1-9]\d*)\}})"
)
_DECIMAL_RE = re.compile(rf"-?{_INT}\.\d+")
_THIN_SPACE_GROUP_RE = re.compile(r"(?<=\d)\\[,;: ](?=\d{3}(?!\d))")


@dataclass(frozen=True)
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


@contextmanager
def deadline(seconds: float):
    """Raise `ItemTimeout` in the block after `seconds` (only in the main thread; elsewhere
    the block runs without a deadline and the caller must bound it, as the pool does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expire(signum, frame):
        raise ItemTimeout

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def _parse(text: str) -> list:
    """math-verify's LaTeX reading of `text` as one boxed answer: [SymPy object, string],
    the string alone if it does not parse, or []. Thousands groups written with a LaTeX
    space (`1\\,234`) are joined first (math-verify reads them as a product)."""
    text = _THIN_SPACE_GROUP_RE.sub("", text)
    return parse("\\boxed{" + text + "}", _LATEX_ONLY, parsing_timeout=None)


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
    """A parsed gold answer: its text, math-verify's parse and its plain-number value."""

    text: str
    parsed: list
    number: tuple[Fraction, bool] | None


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> Gold:
    """Parse a gold answer once (LRU-cached on the string)."""
    text = gold.strip()
    return Gold(text, _parse(text), rational_value(text))


@lru_cache(maxsize=4096)
def _gold_matches_itself(gold: str) -> bool:
    return _compare(gold.strip(), parse_gold(gold), fast=False)


class _Refused(Exception):
    """An item scored 0 for a counted reason other than a wrong answer."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _compare(answer: str, gold: Gold, *, fast: bool = True, max_digits: float = 1e5) -> bool:
    """Verdict of `answer` (extracted answer text) against `gold`. With fast=False the fast
    paths are skipped (the tests use it to show that both give the same verdict)."""
    if fast:
        if answer == gold.text:
            return _gold_matches_itself(gold.text)
        number = rational_value(answer)
        if number is not None and gold.number is not None:
            if number[0] == gold.number[0]:
                return True
            if number[1] and gold.number[1]:
                return False
    if guards.set_tuple_mismatch(gold.text, answer):
        return False
    pred = _parse(answer)
    pred_expr = _first_sympy(pred)
    if pred_expr is not None and guards.too_large(pred_expr, max_digits):
        raise _Refused("prescreened")
    if not verify(gold.parsed, pred, allow_set_relation_comp=True, timeout_seconds=None):
        if pred_expr is None:
            raise _Refused("parse_failures")
        return False
    gold_expr = _first_sympy(gold.parsed)
    return not guards.numeric_disagreement(gold_expr, pred_expr)


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
            gold_parsed = parse_gold(gold)
            if not gold_parsed.parsed:
                return 0.0, "gold_failures"
            ok = _compare(answer, gold_parsed, max_digits=config.max_digits)
    except _Refused as refused:
        return 0.0, refused.reason
    except ItemTimeout:
        return 0.0, "timeouts"
    except MemoryError:
        return 0.0, "memory_errors"
    except RecursionError:
        return 0.0, "prescreened"
    except Exception:  # any other failure of the parser or of SymPy: scored 0, counted
        return 0.0, "errors"
    return (1.0, "correct") if ok else (0.0, "wrong")


def math_reward(
    completion: str, gold: str, *, fallback: str = "none", timeout_s: float = 5.0
) -> float:
    """1.0 if the final answer of `completion` is equivalent to `gold`, else 0.0 (in-process;
    the deadline works in the main thread only: use `RewardPool` in training)."""
    return score_item(completion, gold, _config(fallback, timeout_s))[0]


@lru_cache(maxsize=16)
def _config(fallback: str, timeout_s: float) -> VerifierConfig:
    return VerifierConfig(fallback=fallback, timeout_s=timeout_s)
