"""Benchmark evaluation: mean@k accuracy per benchmark, scored by the training verifier.

For a benchmark of n problems with gold answers g_i, k samples o_{i,1..k} are drawn per
problem (temperature T; T = 0 with k = 1 is greedy) and scored by the reward's verifier,
r_{i,j} ∈ {0, 1}, with fallback answer extraction on (a reply without \\boxed{} is judged
by its "answer is …" text or last number). With c_i = Σ_j r_{i,j}:

    mean@k = (1/n) Σ_i c_i / k          (expected accuracy of one sample)

with pass@k and the standard error beside it (`eval_results.BenchmarkResult`).

Problems whose prompt is longer than `max_prompt_tokens` are not generated for and count
as wrong (c_i = 0): the denominator is always the whole benchmark, so a tighter prompt
limit cannot raise the score by dropping long problems; their number is reported.

Generation is batched through the jitted sampler: prompts are sorted by length and cut into
batches of `batch_size` problems (× k rows), each padded on the left to the prompt bucket
of its longest prompt (`completions.prompt_bucket`, a power of two) and a short last batch
filled with copies, so only one shape per bucket is compiled. Batch b draws with key
fold_in(key(seed), b). Scoring goes through a `rewards.RewardPool` the caller owns.

    benchmarks = load_benchmarks(config)                     # {name: [{"problem","answer"}]}
    results = evaluate(model, benchmarks, pool, **eval_options(config))
    print(markdown_table(results))
    write_results(results, directory, "eval_step100", info)  # eval_step100.md / .json
    scalars(results)                                         # eval/<name>/mean_at_<k>, …

Inside training, `PeriodicEval(config, workdir)` loads the benchmarks once and
`.run(model, step, pool)` evaluates with training's verifier pool, writes
eval_step<step>.md/.json and returns the scalars. The evaluate command, policies from
workdirs, HF directories and GGUF files, is daro_jax/evaluate.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from daro_jax import checkpoint as ckpt
from daro_jax import data, models, rewards, sharding
from daro_jax.errors import PathError, UserError
from daro_jax.eval_results import BenchmarkResult, scalars, write_results
from daro_jax.models import lora
from daro_jax.models.from_config import lora_rank
from daro_jax.sampling import completions

NO_PROMPT_LIMIT = 1 << 30


class Completions(NamedTuple):
    """k samples per prompt, in the prompts' order: texts [n][k], lengths and truncated
    [n, k] (NumPy)."""

    texts: list[list[str]]
    lengths: np.ndarray
    truncated: np.ndarray


def check_options(k: int, temperature: float, batch_size: int) -> None:
    """A ValueError naming the first of the eval options (config.eval) out of range."""
    if k < 1:
        raise UserError(f"eval.k={k} must be >= 1.")
    if temperature < 0:
        raise UserError(f"eval.temperature={temperature} must be >= 0 (0 = greedy).")
    if temperature == 0 and k > 1:
        raise UserError(
            f"eval.k={k} with eval.temperature=0: greedy decoding gives {k} identical "
            "samples. Use k=1 for greedy accuracy, or a temperature > 0 for mean@k."
        )
    if batch_size < 1:
        raise UserError(f"eval.batch_size={batch_size} must be >= 1 (problems per batch).")


def generate_completions(
    model,
    prompt_ids: Sequence[np.ndarray],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "eval",
) -> Completions:
    """k completions of each tokenized prompt, generated in batches (see the module
    docstring) by `completions.sample_prompts`; a progress bar counts the prompts.

    `model` has .config, .params, .tokenizer and .mesh (a `models.Model`); the sampler
    stops at `completions.default_stop_token_ids`. The options are `evaluate`'s, checked
    there.
    """
    n = len(prompt_ids)
    texts: list[list[str]] = [[] for _ in range(n)]
    lengths = np.zeros((n, k), np.int32)
    truncated = np.zeros((n, k), bool)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    key = jax.random.key(seed)
    settings = dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    with tqdm(total=n, desc=desc, unit="problem", disable=jax.process_index() != 0) as bar:
        for b, start in enumerate(range(0, n, batch_size)):
            rows = order[start : start + batch_size]
            batch = [prompt_ids[i] for i in rows]
            batch += [batch[0]] * (batch_size - len(batch))
            out, _, _ = completions.sample_prompts(
                model, batch, jax.random.fold_in(key, b), **settings
            )
            for j, i in enumerate(rows):
                texts[i] = out["texts"][j * k : (j + 1) * k]
                lengths[i] = out["lengths"][j * k : (j + 1) * k]
                truncated[i] = out["truncated"][j * k : (j + 1) * k]
            bar.update(len(rows))
    return Completions(texts, lengths, truncated)


def score_benchmark(
    name: str,
    examples: Sequence[Mapping[str, str]],
    texts: Sequence[Sequence[str]],
    pool: rewards.RewardPool,
    *,
    k: int,
    fallback: str,
    dropped: int = 0,
    lengths: np.ndarray | None = None,
    truncated: np.ndarray | None = None,
    seconds: float = 0.0,
) -> BenchmarkResult:
    """Score k completions per example (texts[i] answers examples[i]) with `pool`, answers
    extracted with `fallback`; `dropped` more problems (prompts not generated for) count as
    wrong. The pool's counters are read into the result and reset."""
    if len(texts) != len(examples) or any(len(t) != k for t in texts):
        raise UserError(
            f"benchmark {name}: need k={k} completions for each of {len(examples)} problems, "
            f"got {[len(t) for t in texts]}."
        )
    flat = [text for row in texts for text in row]
    golds = [e["answer"] for e in examples for _ in range(k)]
    scores = (
        pool.score(flat, golds, fallback=fallback).reshape(len(examples), k)
        if flat
        else np.zeros((0, k))
    )
    correct = np.concatenate([scores.sum(axis=1), np.zeros(dropped)]).astype(np.int64)
    return BenchmarkResult(
        name=name,
        k=k,
        correct=correct,
        dropped=dropped,
        mean_length=float(np.mean(lengths)) if lengths is not None and lengths.size else 0.0,
        truncated=float(np.mean(truncated)) if truncated is not None and truncated.size else 0.0,
        seconds=seconds,
        verifier=pool.pop_stats(),
        samples=[
            {"problem": e["problem"], "answer": e["answer"], "completion": t[0], "reward": s[0]}
            for e, t, s in zip(examples, texts, scores.tolist(), strict=True)
        ],
    )


def evaluate(
    model,
    benchmarks: Mapping[str, Sequence[Mapping[str, str]]],
    pool: rewards.RewardPool,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    instruction: str,
    system_prompt: str | None = None,
    chat_template: bool = True,
    top_p: float = 1.0,
    max_prompt_tokens: int = 0,
    fallback: str = "last_number",
    seed: int = 0,
) -> dict[str, BenchmarkResult]:
    """mean@k of `model` on each benchmark ({name: [{"problem", "answer"}]}), in order.

    Prompts are built as in training (`data.prepare_prompts` with `instruction`,
    `system_prompt`, `chat_template`); `max_prompt_tokens` 0 = no limit. The answers are
    scored by `pool` (training's own during training) with extraction `fallback`.
    Benchmark b samples with seed + b. The options are checked here (`check_options`;
    training checks its config's before anything loads, `train.checks`).
    """
    check_options(k, temperature, batch_size)
    results = {}
    for b, (name, examples) in enumerate(benchmarks.items()):
        t0 = time.perf_counter()
        prepared, dropped = data.prepare_prompts(
            model.tokenizer,
            examples,
            instruction=instruction,
            max_prompt_tokens=max_prompt_tokens or NO_PROMPT_LIMIT,
            system_prompt=system_prompt,
            chat_template=chat_template,
        )
        done = generate_completions(
            model,
            [e["prompt_ids"] for e in prepared],
            k=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            top_p=top_p,
            seed=seed + b,
            desc=f"eval {name}",
        )
        result = score_benchmark(
            name,
            prepared,
            done.texts,
            pool,
            k=k,
            fallback=fallback,
            dropped=dropped,
            lengths=done.lengths,
            truncated=done.truncated,
            seconds=time.perf_counter() - t0,
        )
        logging.info(
            "eval %s: mean@%d %.4f ± %.4f over %d problems (%d prompts dropped), %.1f s",
            name,
            k,
            result.mean_at_k,
            result.stderr,
            result.problems,
            dropped,
            result.seconds,
        )
        results[name] = result
    return results


# ---------------------------------------------------------------------------------------
# From a config.


def load_benchmarks(config) -> dict[str, list[dict[str, str]]]:
    """The benchmarks named in `config.eval.benchmarks`, read from `config.eval.benchmarks_dir`
    ("" = none: only "champ" and "generated_heldout" load), each cut to
    `config.eval.max_problems` (0 = all); a missing file is skipped with one logged line.
    The generated held-out split uses the training data's kind, difficulty and seed."""
    out = {}
    for name in config.eval.benchmarks:
        examples = data.load_benchmark(
            name,
            config.eval.benchmarks_dir or None,
            max_problems=config.eval.max_problems,
            seed=config.seed,
            generated_kind=config.data.generated_kind,
            generated_difficulty=config.data.generated_difficulty,
        )
        if examples:
            out[name] = examples
    return out


def eval_options(config) -> dict[str, Any]:
    """Keyword arguments of `evaluate` from a config: the `eval` section and the training
    prompt format (`data.instruction`, `data.system_prompt`, `data.chat_template`)."""
    e = config.eval
    return {
        "k": e.k,
        "temperature": float(e.temperature),
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "top_p": float(e.top_p),
        "max_prompt_tokens": e.max_prompt_tokens,
        "fallback": e.fallback,
        "instruction": config.data.instruction,
        "system_prompt": config.data.system_prompt,
        "chat_template": config.data.chat_template,
        "seed": config.seed,
    }


class PeriodicEval:
    """Evaluation every `config.eval.every_steps` training steps (0 = never).

        evaluator = PeriodicEval(config, workdir)        # benchmarks loaded once
        if evaluator.due(step):
            scalars = evaluator.run(model, step, pool)   # also writes eval_step<step>.md/.json
            writer.write(step, scalars)

    `model` is a `models.Model` holding the current policy params (any sharding); `pool`
    is training's `rewards.RewardPool`.
    """

    def __init__(self, config, workdir: str):
        self.every = config.eval.every_steps
        if self.every < 0:
            raise UserError(f"eval.every_steps={self.every} must be >= 0 (0 = off).")
        self.workdir = workdir
        self.options = eval_options(config)
        self.benchmarks = load_benchmarks(config) if self.every else {}
        if self.every and not self.benchmarks:
            logging.warning(
                "eval.every_steps=%d but none of eval.benchmarks=%s loaded (see the lines "
                "above): periodic evaluation does nothing",
                self.every,
                tuple(config.eval.benchmarks),
            )

    def due(self, step: int) -> bool:
        return bool(self.every and self.benchmarks and step % self.every == 0)

    def run(self, model, step: int, pool: rewards.RewardPool) -> dict[str, float]:
        """Evaluate, write `<workdir>/eval_step<step>.md/.json` (process 0), return scalars."""
        results = evaluate(model, self.benchmarks, pool, **self.options)
        if jax.process_index() == 0:
            info = {"step": step, **self.options}
            write_results(results, self.workdir, f"eval_step{step}", info)
        return scalars(results)


# ---------------------------------------------------------------------------------------
# The evaluate command (daro_jax/evaluate.py): policies from workdirs, HF directories and
# GGUF files.


def load_policy(config, checkpoint: str | None, mesh, step: int | None = None):
    """(models.Model, label, info) of a policy to evaluate; `checkpoint` is a training
    workdir, a path `models.load` reads, or None for the config's model. label: "step<N>"
    for a workdir, else the path's last component.

    For a workdir, the model is the one described by the config saved with the checkpoint
    (model.path, param_dtype, arch_overrides) in `config.model.dtype`, with the model params
    of checkpoint `step` (default: the newest that can be read, `checkpoint.read_newest`),
    read-only (`checkpoint.restore_part`). With
    LoRA (the saved model.lora.rank > 0) the base is loaded from model.path, checked against
    the base the checkpoint names (`checkpoint.check_base`), and the adapters restored on it.
    """
    m = config.model
    if checkpoint is None:
        model = models.from_config(m, mesh, seed=config.seed)
        return model, _label(m.path), {"model": m.path}
    if not ckpt.has_checkpoints(checkpoint):
        model = models.load(checkpoint, m.dtype, mesh, param_dtype=m.param_dtype)
        return model, _label(checkpoint), {"model": checkpoint}

    def restore(step: int) -> tuple[models.Model, str]:
        meta = ckpt.meta_at(checkpoint, step)
        saved = meta["config"]["model"] | {"dtype": m.dtype}
        adapted = lora_rank(saved) > 0
        shell = models.from_config(saved, mesh, seed=config.seed, abstract=not adapted)
        base, trained = lora.split(shell.params) if adapted else (None, shell.params)
        if adapted:
            ckpt.check_base(meta, lora.base_meta(saved["path"], base))
            trained = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trained
            )
        params = ckpt.restore_part(checkpoint, step, {"params": {"model": trained}})
        policy = lora.combine(base, params["params"]["model"])
        return dataclasses.replace(shell, params=policy), saved["path"]

    step, (model, path) = ckpt.read_newest(checkpoint, restore, step)
    return model, f"step{step}", {"model": path, "workdir": checkpoint, "step": step}


def _label(path: str) -> str:
    """A file-name-safe label from a checkpoint path's last component."""
    return re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(path)))


def run_evaluation(
    config, checkpoint: str | None, output_dir: str | None = None, step: int | None = None
):
    """The evaluate command: evaluate the policy of `checkpoint` (see `load_policy`) on
    `load_benchmarks(config)` and write eval_<label>.md/.json (process 0) into `output_dir`
    (default: the workdir for a workdir, else "."); returns (results, path of the .md)."""
    mesh = sharding.make_mesh(config.mesh.shape)
    benchmarks = load_benchmarks(config)
    if not benchmarks:
        raise PathError(
            f"none of eval.benchmarks={tuple(config.eval.benchmarks)} could be loaded from "
            f"eval.benchmarks_dir={config.eval.benchmarks_dir!r} (see the lines above); set "
            "--config.eval.benchmarks_dir to a folder with <name>.jsonl/.json/.parquet files."
        )
    model, label, info = load_policy(config, checkpoint, mesh, step)
    options = eval_options(config)
    r = config.reward
    with rewards.RewardPool(r.num_workers, r.timeout_s, fallback=r.fallback) as pool:
        results = evaluate(model, benchmarks, pool, **options)
    if output_dir is None:
        output_dir = checkpoint if checkpoint and ckpt.has_checkpoints(checkpoint) else "."
    md_path = os.path.join(output_dir, f"eval_{label}.md")
    if jax.process_index() == 0:
        write_results(results, output_dir, f"eval_{label}", {**info, **options})
    return results, md_path
