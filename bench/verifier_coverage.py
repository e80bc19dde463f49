"""Verifier coverage on real reference answers: does the reward's gold parser read every
gold of the six evaluation sets and CHAMP, and does each gold, boxed, match itself?

A gold that cannot match itself is a silent 0 for every rollout of its problem. Per
benchmark, for each reference answer g (as `data.load_benchmark` returns it):

- normalized: `rewards.verify.parse_gold(g)` (math-verify's normalization, the reward's
  first step) gives a non-empty text;
- parsed: that text parses to a SymPy object with latex2sympy2_extended
  (`parse_latex_cached`, the parse the reward makes); a gold that does not parse is compared
  as a string only;
- self-match (ours): `score_item("\\boxed{g}", g)` of the reward (fallback none) is 1;
- self-match (peer): plain math-verify, `verify(parse("$g$"), parse("\\boxed{g}"))`.

Writes the table and every failing gold (with the reward's reason) to
bench/verifier_coverage.md; the last line is the self-match ratio ours vs math-verify.

    python bench/verifier_coverage.py [--data-dir /work/shared/data/benchmarks]
"""

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daro_jax import data  # noqa: E402
from daro_jax.rewards import verify  # noqa: E402

DEFAULT_DATA_DIR = "/work/shared/data/benchmarks"
OUTPUT = Path(__file__).resolve().parent / "verifier_coverage.md"
TIMEOUT_S = 5.0


def gold_parses(gold: str) -> tuple[bool, bool]:
    """(normalized text non-empty, normalized text parses to SymPy) for one gold."""
    from math_verify.parser import parse_latex_cached

    text = verify.parse_gold(gold).text
    if not text:
        return False, False
    try:
        with verify.deadline(TIMEOUT_S):
            parse_latex_cached(text)
    except (Exception, verify.ItemTimeout):
        return True, False
    return True, True


def self_match(gold: str) -> tuple[bool, str]:
    """(reward of the boxed gold against itself is 1, the reward's reason)."""
    reward, reason = verify.score_item(
        "\\boxed{" + gold + "}", gold, verify.VerifierConfig(fallback="none", timeout_s=TIMEOUT_S)
    )
    return reward == 1.0, reason


def peer_self_match(gold: str) -> bool:
    """Plain math-verify: the gold in `$…$` against the boxed gold."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    try:
        return bool(mv_verify(parse("$" + gold + "$"), parse("\\boxed{" + gold + "}")))
    except Exception:
        return False


def coverage(name: str, examples: list[dict[str, str]]) -> dict:
    """Counts of one benchmark and its failing golds."""
    counts = Counter()
    failures = []
    start = time.perf_counter()
    for e in examples:
        gold = e["answer"]
        normalized, parsed = gold_parses(gold)
        ours, reason = self_match(gold)
        peer = peer_self_match(gold)
        counts.update(normalized=normalized, parsed=parsed, ours=ours, peer=peer)
        if not (ours and parsed and peer):
            failures.append((gold, parsed, reason, peer))
    return {
        "name": name,
        "n": len(examples),
        "counts": counts,
        "failures": failures,
        "seconds": time.perf_counter() - start,
    }


def markdown(rows: list[dict], data_dir: str) -> str:
    lines = [
        "# Verifier coverage of the reference answers",
        "",
        f"Command: `python bench/verifier_coverage.py --data-dir {data_dir}`",
        "",
        "| benchmark | answers | normalized | parsed (SymPy) | boxed self-match (ours) "
        "| self-match (math-verify) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["counts"]
        lines.append(
            f"| {r['name']} | {r['n']} | {c['normalized']} | {c['parsed']} | {c['ours']} "
            f"| {c['peer']} | {r['seconds']:.1f} |"
        )
    total = {key: sum(r["counts"][key] for r in rows) for key in ("normalized", "parsed")}
    total |= {key: sum(r["counts"][key] for r in rows) for key in ("ours", "peer")}
    lines.append(
        f"| all | {sum(r['n'] for r in rows)} | {total['normalized']} | {total['parsed']} "
        f"| {total['ours']} | {total['peer']} | {sum(r['seconds'] for r in rows):.1f} |"
    )
    lines += ["", "## Golds that do not parse to SymPy or do not match themselves", ""]
    lines += [
        "Parsed = False: compared as a normalized string only (a right answer written "
        "differently scores 0). Reason: the reward's verdict of the boxed gold against itself.",
        "",
        "| benchmark | gold | parsed | reason (ours) | math-verify self-match |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for gold, parsed, reason, peer in r["failures"]:
            shown = gold.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['name']} | `{shown}` | {parsed} | {reason} | {peer} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    rows = []
    for name in (*data.PAPER_BENCHMARKS, "champ"):
        examples = data.load_benchmark(name, args.data_dir)
        if examples is None:
            print(f"{name}: no file in {args.data_dir}, skipped")
            continue
        rows.append(coverage(name, examples))
        c = rows[-1]["counts"]
        print(
            f"{name}: {rows[-1]['n']} answers, {c['normalized']} normalized, {c['parsed']} "
            f"parsed, self-match ours {c['ours']} / math-verify {c['peer']}"
        )
    report = markdown(rows, args.data_dir)
    Path(args.output).write_text(report)
    print(report)
    ours = sum(r["counts"]["ours"] for r in rows)
    peer = sum(r["counts"]["peer"] for r in rows)
    n = sum(r["n"] for r in rows)
    print(
        f"boxed self-match of {n} golds: ours {ours} vs math-verify {peer} "
        f"(ratio {ours / max(peer, 1):.3f})"
    )


if __name__ == "__main__":
    main()
