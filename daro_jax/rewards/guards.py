"""Checks around math-verify: cheap refusals before SymPy runs, and fixes of its false positives.

- `nesting_depth`: bracket depth of an answer; deep nesting is refused before parsing (the
  ANTLR grammar and SymPy recurse on it).
- `digits_bound`: an upper bound on the decimal digits SymPy may have to produce to evaluate
  an expression exactly; exponent towers (`9^{9^{9^{9}}}`), huge factorials (`(10^{10})!`)
  and huge logarithm bases are refused before any comparison evaluates them.
- `set_tuple_mismatch`: math-verify equates the set `\\{1,2\\}` with `(1,2)` (it reads the
  latter as an open interval, then compares it as a pair); a set literal never equals an
  ordered pair or an interval.
- `base_mismatch`: latex2sympy2_extended drops a subscript, so `40_3` equals `40_9`; two
  numbers written with different bases never match.
- `percent_value`: math-verify accepts `25` for `25\\%` (integers only); the verifier
  also accepts `12.5` for `12.5\\%` (either side may carry the percent sign).
- `numeric_disagreement`: math-verify compares numbers with `evalf(chop=True)` and
  6-decimal rounding, so tiny magnitudes collapse to equal (`1/2004!` vs `1/2006!`,
  `1/2^{99}` vs `1/2^{98}`, `1/2^{99}` vs `0.0`). A positive verdict on two numeric
  constants is kept only if their relative difference at 30 significant digits is at most
  1e-20 (exact expressions) or 1e-4 (a float is involved: this only bites below about
  0.01, where 6-decimal rounding equates `0.0000672` with `0.0000673`; at ordinary
  magnitudes math-verify's rounding is stricter). Two exact constants built only from
  integers, + − × ÷, integer powers, factorials and binomials are compared as exact
  rationals instead: 30 digits cannot tell `1 + 1/2004!` from `1 + 1/2006!`.
  Percentages are left to math-verify.
"""

import math
import re

from sympy import (
    Add,
    Expr,
    Float,
    Integer,
    Mul,
    Pow,
    Rational,
    UnevaluatedExpr,
    binomial,
    factorial,
    preorder_traversal,
)

_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])")
_SET_BUILDER_RE = re.compile(r"\\mid|\||:|\\colon")
_BASE_RE = re.compile(r"-?[0-9A-Za-z]+_\{?(\d+)\}?")
_LOG10_2 = math.log10(2.0)
_EXACT_RTOL = 1e-20
_FLOAT_RTOL = 1e-4
_EVAL_DIGITS = 30
_PERCENT = UnevaluatedExpr(Rational(1, 100))
_MAX_EXP10 = 300.0  # 10.0 ** 300 still fits a float


def nesting_depth(text: str) -> int:
    """Maximum nesting depth of `{}`, `()` and `[]` in `text` (unbalanced closers ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]" and depth > 0:
            depth -= 1
    return deepest


def _log10_abs(n: int) -> float:
    return math.log10(max(abs(n), 2))


def digits_bound(expr, limit: float) -> float:
    """Upper bound D on log10 of the magnitudes met while evaluating `expr` exactly.

    integer n: log10 max(|n|, 2); rational p/q: the larger of p's and
    q's; anything without arguments (float, symbol, constant): 1;  b^e: D(b) * 10^D(e);
    n!: 10^D(n) * D(n);  binom(n, k): min(10^D(n) log10 2, D(n) 10^D(k));  anything else:
    the sum over its arguments. Returns `math.inf` as soon as the bound exceeds `limit`, so
    towers are never expanded (10^D is capped at 10^300).
    """
    if isinstance(expr, Integer):
        return _log10_abs(int(expr))
    if isinstance(expr, Rational):
        return max(_log10_abs(expr.p), _log10_abs(expr.q))
    args = getattr(expr, "args", ())
    if not args:
        return 1.0
    if isinstance(expr, Pow):
        base, exponent = (digits_bound(a, limit) for a in args)
        total = base * _exp10(exponent)
    elif isinstance(expr, factorial):
        d = digits_bound(args[0], limit)
        total = _exp10(d) * d
    elif isinstance(expr, binomial):
        n, k = (digits_bound(a, limit) for a in args)
        total = min(_exp10(n) * _LOG10_2, n * _exp10(k))
    else:
        total = 0.0
        for arg in args:
            total += digits_bound(arg, limit)
            if total > limit:
                break
    return math.inf if total > limit else total


def _exp10(d: float) -> float:
    return 10.0 ** min(d, _MAX_EXP10)


def too_large(expr, limit: float) -> bool:
    """True if `digits_bound(expr)` exceeds `limit` or the tree is too deep to walk."""
    try:
        return digits_bound(expr, limit) > limit
    except RecursionError:
        return True


def _bracket_kind(text: str) -> str:
    s = _LEFT_RIGHT_RE.sub("", text).replace(" ", "")
    if s.startswith("\\{") and s.endswith("\\}") and not _SET_BUILDER_RE.search(s):
        return "set"
    if s[:1] in "([" and s[-1:] in ")]" and "," in s:
        return "ordered"
    return "other"


def set_tuple_mismatch(gold: str, answer: str) -> bool:
    """True if one side is a set literal `\\{..\\}` and the other a tuple or interval."""
    return {_bracket_kind(gold), _bracket_kind(answer)} == {"set", "ordered"}


def percent_value(expr):
    """x if `expr` is latex2sympy2_extended's percentage x% (x * UnevaluatedExpr(1/100)),
    else None."""
    if isinstance(expr, Mul) and len(expr.args) == 2 and expr.args[1] == _PERCENT:
        return expr.args[0]
    return None


def base_mismatch(gold: str, answer: str) -> bool:
    """True if both are numbers with a base subscript (`52_8`, `4210_{5}`) and the bases
    differ."""
    gold_base, answer_base = _BASE_RE.fullmatch(gold.strip()), _BASE_RE.fullmatch(answer.strip())
    return bool(gold_base and answer_base and int(gold_base[1]) != int(answer_base[1]))


def _numeric_value(expr):
    """30-digit value of a numeric constant, or None if `expr` is not one."""
    if not isinstance(expr, Expr) or expr.free_symbols or expr.has(UnevaluatedExpr):
        return None
    value = expr.evalf(_EVAL_DIGITS)
    return value if value.is_number and value.is_finite else None


_RATIONAL_NODES = (Integer, Rational, Add, Mul, Pow, factorial, binomial)


def _exact_rational(expr):
    """The exact value of a constant made only of rationals, +, ×, powers, factorials and
    binomials, if that value is rational (else None: also for anything holding a Float or
    a symbol). Sizes are bounded by `digits_bound` (answers over the limit are refused
    before any comparison)."""
    if not all(isinstance(node, _RATIONAL_NODES) for node in preorder_traversal(expr)):
        return None
    value = expr.doit()
    return value if value.is_Rational else None


def numeric_disagreement(gold, pred) -> bool:
    """True if `gold` and `pred` are numeric constants that differ beyond the tolerance
    described in the module docstring (then math-verify's positive verdict is refused)."""
    exact = _exact_rational(gold), _exact_rational(pred)
    if None not in exact:
        return exact[0] != exact[1]
    g = _numeric_value(gold)
    p = _numeric_value(pred)
    if g is None or p is None:
        return False
    rtol = _FLOAT_RTOL if gold.has(Float) or pred.has(Float) else _EXACT_RTOL
    try:
        return bool(abs(g - p) > rtol * max(abs(g), abs(p)))
    except TypeError:
        return False
