"""Evaluation: exact mean@k from known completions, batched generation against one prompt at
a time, the evaluate command end to end, workdir checkpoints, missing files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import largest_array_file, load_config_file, truncate_half

from daro_jax import checkpoint, data, evaluation, models, rewards
from daro_jax.train import loop

ROOT = Path(__file__).resolve().parents[1]


CONFIG_FILE = """from ml_collections import config_dict

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model.path = {model_dir!r}
    c.model.init_random = False
    c.model.arch_overrides = config_dict.ConfigDict()
    c.mesh.shape = (1, -1, 1)
    c.reward.num_workers = 1
    c.data.generated_size = 64
    c.sampler.max_prompt_tokens = 128
    c.eval.benchmarks_dir = {benchmarks_dir!r}
    c.eval.benchmarks = ("aime24", "amc23")
    c.eval.k = 2
    c.eval.temperature = 1.0
    c.eval.max_new_tokens = 6
    c.eval.batch_size = 4
    c.eval.top_p = 1.0
    c.eval.max_prompt_tokens = 0
    c.eval.fallback = "last_number"
    return c
"""


def tiny_config(path: Path, model_dir: str, benchmarks_dir: str):
    """Write a config file (configs/tiny.py on a tiny HF checkpoint, every eval field set)
    to `path` and load it."""
    path.write_text(CONFIG_FILE.format(model_dir=model_dir, benchmarks_dir=benchmarks_dir))
    return load_config_file(path)


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


FIVE = [
    {"problem": f"What is {a} + {b}?", "answer": str(a + b)}
    for a, b in [(1, 2), (30, 4), (5, 66), (7, 8), (123, 456)]
]


def test_mean_at_k_is_exact_with_known_completions():
    """3 problems, k = 4, known verdicts (mean@4 and its kin: test_eval_results); the
    call's fallback (not the pool's) reads unboxed answers, and a box wins over a later
    number."""
    examples = [
        {"problem": p, "answer": a}
        for p, a in (("2+3", "5"), ("1/2", "\\frac{1}{2}"), ("3*4", "12"))
    ]
    texts = [
        ["\\boxed{5}", "so the answer is 5.", "2 + 3 = 5", "\\boxed{5.0}"],  # 4 correct
        ["0.5", "\\boxed{1/3}", "\\boxed{2}", "no idea"],  # "0.5" = 1/2: 1 correct
        ["\\boxed{11} and then 12", "13", "", "twelve"],  # 0 correct
    ]
    with rewards.RewardPool(1, 5.0, fallback="none") as pool:
        result = evaluation.score_benchmark(
            "toy", examples, texts, pool, k=4, fallback="last_number", dropped=2
        )
    # Two dropped prompts count as wrong: n = 5.
    np.testing.assert_array_equal(result.correct, [4, 1, 0, 0, 0])
    assert result.problems == 5 and result.mean_at_k == pytest.approx((1 + 0.25) / 5)
    # "no idea", "" and "twelve" hold no number: 3 of the 12 samples have no answer.
    assert result.verifier["items"] == 12 and result.verifier["correct"] == 5
    assert result.no_answer == pytest.approx(3 / 12)
    assert [(x["problem"], x["completion"], x["reward"]) for x in result.samples] == [
        ("2+3", "\\boxed{5}", 1.0),
        ("1/2", "0.5", 1.0),
        ("3*4", "\\boxed{11} and then 12", 0.0),
    ]
    with pytest.raises(ValueError, match="need k=4 completions"):
        evaluation.score_benchmark(
            "toy", examples, [t[:3] for t in texts], None, k=4, fallback="none"
        )


def test_options_are_checked():
    with pytest.raises(ValueError, match="greedy decoding gives 4 identical"):
        evaluation.check_options(k=4, temperature=0.0, batch_size=2)
    with pytest.raises(ValueError, match="eval.batch_size=0"):
        evaluation.evaluate(
            None, {}, None, k=1, temperature=0.0, max_new_tokens=4, batch_size=0, instruction=""
        )


def test_batched_generation_matches_one_prompt_at_a_time(tiny_hf_dirs):
    """Greedy completions do not depend on the batch a prompt lands in, its padding, or the
    order: 5 prompts of different lengths in batches of 3 (last one padded) = one by one."""
    model = models.load(tiny_hf_dirs["llama31"])
    examples, dropped = data.prepare_prompts(
        model.tokenizer,
        FIVE + [{"problem": "x" * 40, "answer": "0"}],
        instruction="Be brief and give only the final number.",
        max_prompt_tokens=10**6,
    )
    ids = [e["prompt_ids"] for e in examples]
    assert dropped == 0 and len({len(i) for i in ids}) > 3
    assert len({evaluation.completions.prompt_bucket(len(i)) for i in ids}) == 1  # one compile each
    options = dict(k=1, temperature=0.0, max_new_tokens=6, seed=3)
    batched = evaluation.generate_completions(model, ids, batch_size=4, **options)
    alone = evaluation.generate_completions(model, ids, batch_size=1, **options)
    assert batched.texts == alone.texts
    np.testing.assert_array_equal(batched.lengths, alone.lengths)
    assert all(len(t) == 1 for t in batched.texts) and batched.lengths.shape == (6, 1)
    assert any(t[0] for t in batched.texts)


def test_missing_benchmark_file_is_skipped_with_a_message(tmp_path, caplog):
    write_jsonl(tmp_path / "aime24.jsonl", FIVE)
    config = tiny_config(tmp_path / "config.py", "unused", str(tmp_path))
    config.eval.benchmarks = ("aime24", "amc23", "math500")
    with caplog.at_level("WARNING"):
        loaded = evaluation.load_benchmarks(config)
    assert list(loaded) == ["aime24"] and loaded["aime24"] == FIVE
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert "benchmark amc23 skipped" in skipped[0] and "benchmark math500 skipped" in skipped[1]


def test_evaluate_command_on_a_tiny_model(tiny_hf_dirs, tmp_path):
    """`python -m daro_jax.evaluate` on an HF directory and a 5-problem local benchmark:
    the table is printed and saved with the right counts; a missing set is skipped."""
    bench = tmp_path / "bench"
    bench.mkdir()
    write_jsonl(bench / "aime24.jsonl", FIVE)
    config_file = tmp_path / "eval_config.py"
    tiny_config(config_file, tiny_hf_dirs["qwen2_tied"], str(bench))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daro_jax.evaluate",
            f"--config={config_file}",
            f"--checkpoint={tiny_hf_dirs['qwen2_tied']}",
            "--config.eval.k=3",
            f"--output_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "benchmark amc23 skipped" in proc.stderr
    assert "| aime24 | 5 | 3 |" in proc.stdout
    report = json.loads((out / "eval_qwen2_tied.json").read_text())
    assert list(report["benchmarks"]) == ["aime24"]
    aime = report["benchmarks"]["aime24"]
    assert aime["problems"] == 5 and aime["k"] == 3 and len(aime["correct"]) == 5
    assert all(0 <= c <= 3 for c in aime["correct"])
    assert aime["mean@3"] == pytest.approx(sum(aime["correct"]) / 15)
    assert 1 <= aime["mean_length"] <= 6
    assert report["info"]["k"] == 3 and report["info"]["fallback"] == "last_number"
    assert "| aime24 | 5 | 3 |" in (out / "eval_qwen2_tied.md").read_text()
    samples = (out / "eval_qwen2_tied_samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["problem"] for line in samples) == sorted(
        e["problem"] for e in FIVE
    )


def test_workdir_checkpoint_and_periodic_eval(tiny_hf_dirs, tmp_path):
    """A training workdir: the model params of the latest checkpoint are restored exactly
    (not the optimizer state, not the base weights), past a newer one whose arrays cannot
    be read; PeriodicEval writes eval_step<N>."""
    bench = tmp_path / "bench"
    bench.mkdir()
    write_jsonl(bench / "aime24.jsonl", FIVE[:3])
    workdir = str(tmp_path / "run")
    config = tiny_config(tmp_path / "config.py", tiny_hf_dirs["llama31"], str(bench))
    config.eval.every_steps = 2
    t = loop.build(config)
    state = t.state | {
        "params": t.state["params"]
        | {"model": jax.tree.map(lambda x: x * 1.5, t.state["params"]["model"])}
    }
    with checkpoint.Checkpointer(workdir, keep=2, every=0) as ckpt:
        ckpt.save(4, state, {"step": 4, "config": json.loads(config.to_json())}, force=True)
        ckpt.save(6, t.state, {"step": 6, "config": json.loads(config.to_json())}, force=True)
    truncate_half(largest_array_file(Path(workdir, "checkpoints"), 6))
    model, label, info = evaluation.load_policy(config, workdir, t.mesh)
    assert label == "step4" and info["step"] == 4
    want = jax.device_get(state["params"]["model"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params), want)
    same = jax.tree.map(
        lambda x, y: x.sharding == y.sharding, model.params, t.state["params"]["model"]
    )
    assert all(jax.tree.leaves(same))  # read straight onto the training shardings
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
        evaluation.load_policy(config, workdir, t.mesh, step=3)

    periodic = evaluation.PeriodicEval(config, workdir)
    assert [s for s in range(1, 6) if periodic.due(s)] == [2, 4]
    with rewards.RewardPool(1, 5.0, fallback="none") as pool:
        out = periodic.run(model, 4, pool)
    assert set(out) == {
        "eval/aime24/mean_at_2",
        "eval/aime24/pass_at_2",
        "eval/aime24/stderr",
        "eval/aime24/no_answer",
        "eval/average/mean_at_2",
    }
    report = json.loads(Path(workdir, "eval_step4.json").read_text())
    assert report["info"]["step"] == 4 and report["benchmarks"]["aime24"]["problems"] == 3
    assert out["eval/aime24/mean_at_2"] == report["benchmarks"]["aime24"]["mean@2"]
