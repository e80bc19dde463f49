"""Verifier throughput: `RewardPool` (2 workers) vs plain math-verify in one process.

Completions are MATH-style solutions generated from the MATH-500 golds: the problem
restated, a few reasoning lines with inline and display LaTeX, and a final boxed answer that
is the gold itself, an equivalent rewrite of it (`1,234`, `a/b`, a terminating decimal,
`\\dfrac`, `x = n`, degrees or `\\text{}` dropped, `\\left`/`\\right` dropped, spaces), or a
wrong answer that looks close (n +- 1, -n, 10n, a changed digit, a swapped fraction); about
1 in 20 is truncated before its box. Each item carries the label its construction implies.

Peer: `math_verify.verify(parse("$" + gold + "$"), parse(completion))` in this process (the
gold wrapped in `$` as math-verify's README does; a bare gold is often misread, e.g.
`1-\\frac{1}{e}` parses as 1). Ours: `RewardPool(2, timeout).score(completions, golds)`,
timed after both sides scored the same small warm-up set, with a fresh pool (empty caches)
in each of --repeats rounds; the best round of each side is reported (other jobs share this
machine). Prints the verdicts where the two disagree, grouped with the construction label,
then the ratio of answers/s as the last line.

    python -m bench.verifier [--data-dir /work/shared/data/benchmarks] [--n 2000] [--repeats 3]
"""

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

DEFAULT_DATA_DIR = "/work/shared/data/benchmarks"
_INT_RE = re.compile(r"-?\d+")
_FRAC_RE = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_STEPS = (
    "First, we simplify: $${a} \\cdot {b} = {ab}$$ so the product is ${ab}$.",
    "Substituting $x = {a}$ gives $x^2 + {b}x = {c}$.",
    "Note that \\[ \\frac{{{ab}}}{{{b}}} = {a}, \\] which we use below.",
    "By the Pythagorean theorem, $c^2 = {a}^2 + {b}^2 = {s}$.",
    "We have ${a} + {b} = {apb}$, and the remaining cases give ${c}$ more.",
    "Counting the cases one by one, there are ${apb}$ possibilities in total.",
)


def load_golds(data_dir: Path) -> list[tuple[str, str]]:
    path = data_dir / "math500.jsonl"
    if not path.is_file():
        sys.exit(
            f"bench/verifier.py: {path} not found. Pass --data-dir pointing to a folder with "
            "math500.jsonl (one JSON object per line with 'problem' and 'answer')."
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(row["problem"], row["answer"]) for row in rows]


def equivalent_forms(gold: str) -> list[str]:
    """Rewrites of `gold` with the same value (the label of these items is "correct")."""
    forms = []
    if _INT_RE.fullmatch(gold):
        n = int(gold)
        forms += [f"{n:,}" if abs(n) >= 1000 else f"{n}.0", f"x = {n}", f"{n}\\text{{ units}}"]
    frac = _FRAC_RE.fullmatch(gold.replace("-\\frac", "\\frac"))
    if frac:
        sign = "-" if gold.startswith("-") else ""
        a, b = int(frac[1]), int(frac[2])
        forms += [f"{sign}{a}/{b}", f"{sign}\\dfrac{{{2 * a}}}{{{2 * b}}}"]
        if b and all(p in (2, 5) for p in _prime_factors(b)):
            forms.append(f"{sign}{a / b:g}")
    if "^\\circ" in gold:
        forms.append(gold.replace("^\\circ", ""))
    if "\\left" in gold or "\\right" in gold:
        forms.append(gold.replace("\\left", "").replace("\\right", ""))
    text = re.fullmatch(r"\\text\{(.+)\}", gold)
    if text:
        forms.append(text[1])
    forms.append(re.sub(r"\s+", "", gold) if " " in gold else gold.replace(",", ", "))
    return forms


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1 and p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors + ([n] if n > 1 else [])


def wrong_forms(gold: str, rng: random.Random) -> list[str]:
    """Answers that look close to `gold` but are wrong (label "wrong")."""
    if _INT_RE.fullmatch(gold):
        n = int(gold)
        return [str(n + rng.choice((-1, 1))), str(-n if n else 1), str(10 * n + 1)]
    frac = _FRAC_RE.fullmatch(gold)
    if frac and int(frac[1]) != int(frac[2]):
        a, b = frac[1], frac[2]
        return [f"\\frac{{{b}}}{{{a}}}", f"\\frac{{{int(a) + 1}}}{{{b}}}"]
    digits = [m.start() for m in re.finditer(r"\d", gold)]
    if digits:
        i = rng.choice(digits)
        changed = gold[:i] + str((int(gold[i]) + rng.randint(1, 8)) % 10) + gold[i + 1 :]
        return [changed, "-(" + gold + ")" if not gold.startswith("(") else gold + "+1"]
    return [gold + "+1", "2" + gold]


def solution(problem: str, answer: str, rng: random.Random, truncate: bool) -> str:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(1, 99)
    values = dict(a=a, b=b, c=c, ab=a * b, apb=a + b, s=a * a + b * b)
    steps = [step.format(**values) for step in rng.sample(_STEPS, k=rng.randint(2, 4))]
    text = (
        f"We need to solve the following. {problem[:400]}\n\n"
        + "\n\n".join(steps)
        + f"\n\nPutting everything together, the final answer is $\\boxed{{{answer}}}$."
    )
    return text[: text.rfind("\\boxed")] if truncate else text


def build_items(golds: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(completion, gold, label) items, label in {"correct", "wrong", "truncated"}."""
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        for problem, gold in golds:
            choices = [(gold, "correct")]
            choices += [(f, "correct") for f in equivalent_forms(gold)]
            choices += [(f, "wrong") for f in wrong_forms(gold, rng)]
            for answer, label in rng.sample(choices, k=min(4, len(choices))):
                truncate = rng.random() < 0.05
                completion = solution(problem, answer, rng, truncate)
                items.append((completion, gold, "truncated" if truncate else label))
    rng.shuffle(items)
    return items[:n]


def plain_math_verify(items) -> list[bool]:
    from math_verify import parse, verify

    return [verify(parse("$" + gold + "$"), parse(completion)) for completion, gold, _ in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is reported")
    parser.add_argument("--show", type=int, default=12, help="disagreements to print")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    items = build_items(load_golds(args.data_dir), args.n, args.seed)
    warmup = build_items(load_golds(args.data_dir), 16, args.seed + 1)
    print(f"{len(items)} completions, labels {dict(Counter(label for *_, label in items))}")

    plain_math_verify(warmup)
    peer_times, ours_times = [], []
    for round_ in range(args.repeats):
        start = time.perf_counter()
        peer = plain_math_verify(items)
        peer_times.append(time.perf_counter() - start)
        ours, stats, startup_s, seconds = _pool_round(args, items, warmup)
        ours_times.append(seconds)
        print(
            f"round {round_}: math_verify {peer_times[-1]:.2f} s, RewardPool {seconds:.2f} s "
            f"(+ {startup_s:.2f} s start-up, not timed), load average {os.getloadavg()[0]:.2f}"
        )

    differ = Counter()
    shown = 0
    for (completion, gold, label), p, o in zip(items, peer, ours, strict=True):
        if bool(p) != bool(o):
            differ[(label, f"math_verify={int(p)} ours={int(o)}")] += 1
            if shown < args.show:
                shown += 1
                box = completion[completion.rfind("\\boxed") :][:80] or completion[-80:]
                print(f"  differ [{label}] gold={gold!r} answer={box!r} mv={p} ours={o}")
    truth = [label == "correct" for *_, label in items]
    print(f"disagreements: {sum(differ.values())} {dict(differ)}")
    print(
        f"agreement with construction labels: math_verify {_agree(peer, truth)}, ours "
        f"{_agree(ours, truth)} of {len(items)}"
    )
    print(f"pool counters: {stats}")
    peer_rate, ours_rate = len(items) / min(peer_times), len(items) / min(ours_times)
    print(f"best of {args.repeats} rounds:")
    print(f"math_verify (1 process): {min(peer_times):.2f} s, {peer_rate:.0f} answers/s")
    print(
        f"RewardPool ({args.workers} workers): {min(ours_times):.2f} s, {ours_rate:.0f} answers/s"
    )
    print(f"RewardPool vs math_verify: {ours_rate / peer_rate:.2f}x")


def _pool_round(args, items, warmup):
    """A fresh pool (empty caches): start, score the warm-up set, then time all items."""
    from daro_jax.rewards import RewardPool

    start = time.perf_counter()
    with RewardPool(args.workers, args.timeout) as pool:
        startup_s = time.perf_counter() - start
        pool.score([c for c, _, _ in warmup], [g for _, g, _ in warmup])
        pool.pop_stats()
        start = time.perf_counter()
        ours = pool.score([c for c, _, _ in items], [g for _, g, _ in items])
        seconds = time.perf_counter() - start
        return ours, pool.pop_stats(), startup_s, seconds


def _agree(verdicts, truth) -> int:
    return sum(bool(v) == t for v, t in zip(verdicts, truth, strict=True))


if __name__ == "__main__":
    main()
