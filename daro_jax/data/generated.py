"""Verifiable problems generated from (seed, index), with exact answers.

Kinds: "arithmetic" (integer + - * chains), "linear" (a·x + b = c with an integer x),
"fractions" / "fractions_latex" (sums and products of fractions, answered as a reduced
fraction, `3/4` or `\\frac{3}{4}`). Answers come from Python ints and `fractions.Fraction`;
no string is ever evaluated. A problem is held out iff a hash of its text falls in one of
`HELDOUT_BUCKETS` buckets, so the "heldout" split never shares a problem text with the
"train" split, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from fractions import Fraction

from daro_jax.errors import UserError

KINDS = ("arithmetic", "linear", "fractions", "fractions_latex")
SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 5  # a problem is held out iff sha256(text) mod 5 == 0: about 1 in 5
GENERATED_TRAIN_SIZE = 10_000  # generated training problems per epoch
GENERATED_HELDOUT_SIZE = 200  # at most this many distinct held-out problems


def arithmetic_shape(difficulty: int) -> tuple[int, int, str]:
    """(operands, digits per operand, operators) of arithmetic problems at `difficulty` ≥ 1.

    operands = 2 + (d − 1) // 2, digits = 1 + d // 2, operators "+" at d = 1, "+-" at d = 2
    and 3, "+-*" from d = 4: d=1 `7 + 5`, d=2 `37 - 48`, d=3 `37 + 12 - 48`,
    d=4 `371 - 125 * 480`. One-digit operands are 0–9, k-digit ones 10^(k−1) … 10^k − 1.
    """
    ops = "+" if difficulty == 1 else "+-" if difficulty <= 3 else "+-*"
    return 2 + (difficulty - 1) // 2, 1 + difficulty // 2, ops


def exact_value(values: Sequence[int | Fraction], ops: Sequence[str]) -> int | Fraction:
    """Exact value of v0 o1 v1 o2 v2 … with "*" binding tighter than "+" and "-"."""
    total, sign, term = 0, 1, values[0]
    for op, value in zip(ops, values[1:], strict=True):
        if op == "*":
            term = term * value
        else:
            total, sign, term = total + sign * term, (1 if op == "+" else -1), value
    return total + sign * term


def _chain(terms: Sequence[str], ops: Sequence[str]) -> str:
    """ "t0 o1 t1 o2 t2 …" """
    return " ".join([terms[0], *(f"{o} {t}" for o, t in zip(ops, terms[1:], strict=True))])


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, str]:
    n, digits, ops = arithmetic_shape(difficulty)
    values = [_operand(rng, digits) for _ in range(n)]
    chosen = [rng.choice(ops) for _ in range(n - 1)]
    return f"What is {_chain([str(v) for v in values], chosen)}?", str(exact_value(values, chosen))


def _linear(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """a·x + b = c with integer x: |a| ≤ 2d + 3, |x|, |b| ≤ 10d; negatives from d = 2 on."""
    size, low = 10 * difficulty, (0 if difficulty == 1 else -10 * difficulty)
    a = rng.randint(2, 2 * difficulty + 3) * (1 if difficulty == 1 else rng.choice((1, -1)))
    x, b = rng.randint(low, size), rng.randint(low, size)
    lhs = f"{a}x" if b == 0 else f"{a}x {'+' if b > 0 else '-'} {abs(b)}"
    return f"Solve for x: {lhs} = {a * x + b}.", str(x)


def _fraction_text(value: Fraction, latex: bool) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    if not latex:
        return f"{value.numerator}/{value.denominator}"
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _fractions(rng: random.Random, difficulty: int, latex: bool) -> tuple[str, str]:
    """Sum/product of 2 + (d − 1) // 2 proper fractions with denominators 2 … 4 + 2d.

    Operators "+" at d = 1, "+*" at d = 2, "+-*" from d = 3; the answer is the reduced
    fraction (an integer when the denominator is 1).
    """
    n = 2 + (difficulty - 1) // 2
    ops = "+" if difficulty == 1 else "+*" if difficulty == 2 else "+-*"
    values = []
    for _ in range(n):
        den = rng.randint(2, 4 + 2 * difficulty)
        values.append(Fraction(rng.randint(1, den - 1), den))
    chosen = [rng.choice(ops) for _ in range(n - 1)]
    names = {"+": "+", "-": "-", "*": "\\times" if latex else "*"}
    terms = [
        f"\\frac{{{v.numerator}}}{{{v.denominator}}}" if latex else f"{v.numerator}/{v.denominator}"
        for v in values
    ]
    text = _chain(terms, [names[o] for o in chosen])
    if latex:
        text = f"${text}$"
    answer = _fraction_text(Fraction(exact_value(values, chosen)), latex)
    return f"Compute {text}. Give the answer as a reduced fraction.", answer


def is_heldout(problem: str) -> bool:
    """True iff the problem text belongs to the held-out split (sha256 bucket 0 of 5)."""
    digest = hashlib.sha256(problem.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def generate_problem(
    kind: str, difficulty: int, seed: int, index: int, split: str = "train"
) -> dict[str, str]:
    """Problem `index` of a split, a pure function of (kind, difficulty, seed, index, split).

    Draws from a `random.Random` seeded by those values (string seeds hash with SHA-512, so
    the stream is the same on every machine) until the problem's split matches `split`.
    """
    if kind not in KINDS:
        raise UserError(f"data.generated_kind={kind!r} is not one of {KINDS}")
    if not isinstance(difficulty, int) or difficulty < 1:
        raise UserError(f"data.generated_difficulty={difficulty!r} must be an integer >= 1")
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {SPLITS}")
    rng = random.Random(f"{seed}/{kind}/{difficulty}/{split}/{index}")
    for _ in range(1000):
        if kind == "arithmetic":
            problem, answer = _arithmetic(rng, difficulty)
        elif kind == "linear":
            problem, answer = _linear(rng, difficulty)
        else:
            problem, answer = _fractions(rng, difficulty, latex=kind == "fractions_latex")
        if is_heldout(problem) == (split == "heldout"):
            return {"problem": problem, "answer": answer}
    raise RuntimeError(f"no {split} problem of kind {kind!r} at difficulty {difficulty}")


def generate_problems(
    kind: str, difficulty: int, seed: int, num: int, split: str = "train"
) -> list[dict[str, str]]:
    """Problems 0 … num − 1 of `split` (repeats possible where the problem space is small)."""
    return [generate_problem(kind, difficulty, seed, i, split) for i in range(num)]


def heldout_problems(kind: str, difficulty: int, seed: int, num: int) -> list[dict[str, str]]:
    """Up to `num` distinct held-out problems, scanning indices 0 … 20·num − 1 in order."""
    seen: dict[str, dict[str, str]] = {}
    for i in range(20 * num):
        example = generate_problem(kind, difficulty, seed, i, "heldout")
        seen.setdefault(example["problem"], example)
        if len(seen) == num:
            break
    return list(seen.values())
