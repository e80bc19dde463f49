"""The outcome of a benchmark evaluation (`BenchmarkResult`) and its reports: a Markdown
table, JSON and JSONL files, TensorBoard scalars.

For a benchmark of n problems, k samples each, c_i of problem i's samples judged correct:

    mean@k = (1/n) Σ_i c_i / k          (expected accuracy of one sample)
    pass@k = (1/n) Σ_i [c_i > 0]        (at least one of k samples correct)
    s.e.   = std_i(c_i / k) / √n        (standard error of mean@k over problems, ddof 1)

and the average over benchmarks is the unweighted mean of their mean@k.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """The outcome of one benchmark: per-problem correct counts and summary figures.

    correct[i] = number of the k samples of problem i judged correct (0 for a problem whose
    prompt was dropped); mean_length and truncated are over the generated samples;
    verifier: the pool's counters over them (`rewards.REASONS`: correct, wrong, no_answer, …);
    samples: the first sample of each generated problem, for reading what was judged:
    {"problem", "answer", "completion", "reward"}.
    """

    name: str
    k: int
    correct: np.ndarray
    dropped: int
    mean_length: float
    truncated: float
    seconds: float
    verifier: Mapping[str, int] = dataclasses.field(default_factory=dict)
    samples: Sequence[Mapping[str, Any]] = ()

    @property
    def problems(self) -> int:
        return len(self.correct)

    @property
    def mean_at_k(self) -> float:
        """(1/n) Σ_i c_i / k."""
        return float(np.mean(self.correct / self.k)) if self.problems else 0.0

    @property
    def pass_at_k(self) -> float:
        """(1/n) Σ_i [c_i > 0]."""
        return float(np.mean(self.correct > 0)) if self.problems else 0.0

    @property
    def stderr(self) -> float:
        """Standard error of mean@k over problems: std(c_i / k, ddof=1) / √n (0 if n < 2)."""
        if self.problems < 2:
            return 0.0
        return float(np.std(self.correct / self.k, ddof=1) / math.sqrt(self.problems))

    @property
    def no_answer(self) -> float:
        """Fraction of the generated samples in which no final answer was found."""
        return self.verifier.get("no_answer", 0) / max(self.verifier.get("items", 0), 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "problems": self.problems,
            "k": self.k,
            f"mean@{self.k}": self.mean_at_k,
            f"pass@{self.k}": self.pass_at_k,
            "stderr": self.stderr,
            "dropped_prompts": self.dropped,
            "mean_length": self.mean_length,
            "truncated": self.truncated,
            "seconds": self.seconds,
            "verifier": dict(self.verifier),
            "correct": [int(c) for c in self.correct],
        }


def average_mean_at_k(results: Mapping[str, BenchmarkResult]) -> float:
    """Unweighted mean over benchmarks of their mean@k (the paper's "Avg." column)."""
    return float(np.mean([r.mean_at_k for r in results.values()])) if results else 0.0


def markdown_table(results: Mapping[str, BenchmarkResult]) -> str:
    """One row per benchmark and an average row (unweighted over benchmarks)."""
    lines = [
        "| benchmark | problems | k | mean@k | ± s.e. | pass@k | dropped prompts "
        "| mean length | truncated | no answer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r.name} | {r.problems} | {r.k} | {r.mean_at_k:.4f} | {r.stderr:.4f} "
            f"| {r.pass_at_k:.4f} | {r.dropped} | {r.mean_length:.1f} | {r.truncated:.3f} "
            f"| {r.no_answer:.3f} |"
        )
    if len(results) > 1:
        lines.append(
            f"| average | {sum(r.problems for r in results.values())} | | "
            f"{average_mean_at_k(results):.4f} | | | | | | |"
        )
    return "\n".join(lines)


def write_results(
    results: Mapping[str, BenchmarkResult],
    directory: str,
    name: str,
    info: Mapping[str, Any],
) -> tuple[str, str, str]:
    """Write `<directory>/<name>.md` (a header of `info` then the table), `<name>.json`
    ({"info", "benchmarks", "average_mean_at_k"}) and `<name>_samples.jsonl` (one line per
    generated problem: its benchmark and `BenchmarkResult.samples` entry); returns the paths."""
    os.makedirs(directory, exist_ok=True)
    md_path = os.path.join(directory, name + ".md")
    json_path = os.path.join(directory, name + ".json")
    header = "\n".join(f"- {key}: {value}" for key, value in info.items())
    with open(md_path, "w") as f:
        f.write(f"# {name}\n\n{header}\n\n{markdown_table(results)}\n")
    payload = {
        "info": dict(info),
        "benchmarks": {n: r.to_json() for n, r in results.items()},
        "average_mean_at_k": average_mean_at_k(results),
    }
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    samples_path = os.path.join(directory, name + "_samples.jsonl")
    with open(samples_path, "w") as f:
        for benchmark, r in results.items():
            for sample in r.samples:
                f.write(json.dumps({"benchmark": benchmark, **sample}) + "\n")
    return md_path, json_path, samples_path


def scalars(results: Mapping[str, BenchmarkResult]) -> dict[str, float]:
    """TensorBoard scalars: eval/<name>/mean_at_<k>, pass_at_<k>, stderr and no_answer per
    benchmark, and eval/average/mean_at_<k> (TensorBoard names allow no "@")."""
    out: dict[str, float] = {}
    for name, r in results.items():
        out[f"eval/{name}/mean_at_{r.k}"] = r.mean_at_k
        out[f"eval/{name}/pass_at_{r.k}"] = r.pass_at_k
        out[f"eval/{name}/stderr"] = r.stderr
        out[f"eval/{name}/no_answer"] = r.no_answer
    if results:
        k = next(iter(results.values())).k
        out[f"eval/average/mean_at_{k}"] = average_mean_at_k(results)
    return out
