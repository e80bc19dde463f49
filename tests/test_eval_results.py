"""eval_results: mean@k, pass@k and the standard error against NumPy on known counts; the
TensorBoard scalars, the Markdown table and the files written, read back."""

import json
from pathlib import Path

import numpy as np
import pytest

from daro_jax.eval_results import BenchmarkResult, markdown_table, scalars, write_results

SAMPLE = {"problem": "2+3", "answer": "5", "completion": "\\boxed{5}", "reward": 1.0}


def _results() -> dict[str, BenchmarkResult]:
    toy = BenchmarkResult(
        "toy",
        4,
        np.array([4, 1, 0, 0, 0]),
        dropped=2,
        mean_length=12.5,
        truncated=0.25,
        seconds=1.0,
        verifier={"items": 12, "correct": 5, "no_answer": 3},
        samples=[SAMPLE],
    )
    other = BenchmarkResult("b", 4, np.array([2, 2]), 0, 0.0, 0.0, 0.0)
    return {"toy": toy, "b": other}


def test_figures_against_numpy():
    results = _results()
    toy, other = results["toy"], results["b"]
    c = np.array([4, 1, 0, 0, 0])
    assert toy.problems == 5
    assert toy.mean_at_k == pytest.approx(np.mean(c / 4))
    assert toy.pass_at_k == pytest.approx(np.mean(c > 0))
    assert toy.stderr == pytest.approx(np.std(c / 4, ddof=1) / np.sqrt(5))
    assert toy.no_answer == pytest.approx(3 / 12)
    assert other.stderr == 0.0 and other.no_answer == 0.0
    one = BenchmarkResult("one", 2, np.array([1]), 0, 0.0, 0.0, 0.0)
    assert one.stderr == 0.0  # n < 2
    out = scalars(results)
    assert out == {
        "eval/toy/mean_at_4": pytest.approx(0.25),
        "eval/toy/pass_at_4": pytest.approx(0.4),
        "eval/toy/stderr": pytest.approx(toy.stderr),
        "eval/toy/no_answer": pytest.approx(0.25),
        "eval/b/mean_at_4": pytest.approx(0.5),
        "eval/b/pass_at_4": 1.0,
        "eval/b/stderr": 0.0,
        "eval/b/no_answer": 0.0,
        "eval/average/mean_at_4": pytest.approx((0.25 + 0.5) / 2),
    }
    table = markdown_table(results)
    assert "| toy | 5 | 4 | 0.2500 | 0.1936 | 0.4000 | 2 | 12.5 | 0.250 | 0.250 |" in table
    assert "| average | 7 | | 0.3750 |" in table
    assert "average" not in markdown_table({"toy": toy})


def test_written_files_read_back(tmp_path):
    results = _results()
    md, js, samples = write_results(results, str(tmp_path / "out"), "eval_step4", {"step": 4})
    report = json.loads(Path(js).read_text())
    assert report["info"] == {"step": 4}
    assert report["average_mean_at_k"] == pytest.approx(0.375)
    assert report["benchmarks"]["toy"]["correct"] == [4, 1, 0, 0, 0]
    assert report["benchmarks"]["toy"]["mean@4"] == pytest.approx(0.25)
    assert Path(md).read_text().startswith("# eval_step4\n\n- step: 4\n\n| benchmark |")
    lines = Path(samples).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"benchmark": "toy", **SAMPLE}]
