"""Benchmark evaluation: mean@k accuracy per benchmark, scored by the training verifier.

For a benchmark of n problems with gold answers g_i, k samples o_{i,1..k} are drawn per
problem (temperature T; T = 0 with k = 1 is greedy) and scored by the reward's verifier,
r_{i,j} ∈ {0, 1}, with fallback answer extraction on (a reply without \\boxed{} is judged
by its "answer is …" text or last number). With c_i = Σ_j r_{i,j}:

    mean@k = (1/n) Σ_i c_i / k          (expected accuracy of one sample)
    pass@k = (1/n) Σ_i [c_i > 0]        (at least one of k samples correct)
    s.e.   = std_i(c_i / k) / √n        (standard error of mean@k over problems, ddof 1)

Problems whose prompt is longer than `max_prompt_tokens` are not generated for and count
as wrong (c_i = 0): the denominator is always the whole benchmark, so a tighter prompt
limit cannot raise the score by dropping long problems; their number is reported.

Generation is batched through the jitted sampler: prompts are sorted by length and cut into
batches of `batch_size` problems (× k rows), each padded on the left to the prompt bucket
of its longest prompt (`sampler.prompt_bucket`, a power of two) and a short last batch
filled with copies, so only one shape per bucket is compiled. Batch b draws with key
fold_in(key(seed), b). Scoring goes through `rewards.RewardPool`.

    benchmarks = load_benchmarks(config)                     # {name: [{"problem","answer"}]}
    results = evaluate(model, benchmarks, **eval_options(config))
    print(markdown_table(results))
    write_results(results, directory, "eval_step100", info)  # eval_step100.md / .json
    log_to_tensorboard(writer, step, results)                # eval/<name>/mean_at_<k>, …

Inside training, `PeriodicEval(config, workdir)` loads the benchmarks once and
`.run(model, step)` evaluates, writes eval_step<step>.md/.json and returns the scalars.
The evaluate command (daro_jax/evaluate.py) is `run_evaluation(config, checkpoint)`, whose
`load_policy` reads a training workdir's latest model params (read-only, partial restore),
an HF directory or a .gguf file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from daro_jax import data, models, rewards, sampler, sharding

NO_PROMPT_LIMIT = 1 << 30


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


class Completions(NamedTuple):
    """k samples per prompt, in the prompts' order: texts [n][k], lengths and truncated
    [n, k] (NumPy)."""

    texts: list[list[str]]
    lengths: np.ndarray
    truncated: np.ndarray


def _check_options(k: int, temperature: float, batch_size: int) -> None:
    if k < 1:
        raise ValueError(f"eval.k={k} must be >= 1.")
    if temperature < 0:
        raise ValueError(f"eval.temperature={temperature} must be >= 0 (0 = greedy).")
    if temperature == 0 and k > 1:
        raise ValueError(
            f"eval.k={k} with eval.temperature=0: greedy decoding gives {k} identical "
            "samples. Use k=1 for greedy accuracy, or a temperature > 0 for mean@k."
        )
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size} must be >= 1 (problems per batch).")


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
    docstring), decoded without special tokens; a progress bar counts the prompts.

    `model` has .config, .params, .tokenizer and .mesh (a `models.Model`); the sampler
    stops at `sampler.default_stop_token_ids`.
    """
    _check_options(k, temperature, batch_size)
    n = len(prompt_ids)
    texts: list[list[str]] = [[] for _ in range(n)]
    lengths = np.zeros((n, k), np.int32)
    truncated = np.zeros((n, k), bool)
    stop = sampler.default_stop_token_ids(model.tokenizer, model.config)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    key = jax.random.key(seed)
    with tqdm(total=n, desc=desc, unit="problem", disable=jax.process_index() != 0) as bar:
        for b, start in enumerate(range(0, n, batch_size)):
            rows = order[start : start + batch_size]
            batch = [prompt_ids[i] for i in rows]
            batch += [batch[0]] * (batch_size - len(batch))
            bucket = sampler.prompt_bucket(max(len(ids) for ids in batch))
            tokens, mask = sampler.left_pad(batch, bucket)
            sample = sampler.make_sampler(
                model.config,
                k=k,
                max_new_tokens=max_new_tokens,
                prompt_len=tokens.shape[1],
                temperature=float(temperature),
                top_p=float(top_p),
                stop_token_ids=stop,
                mesh=model.mesh,
            )
            out = sample(model.params, tokens, mask, jax.random.fold_in(key, b))
            out = {name: _to_host(out[name]) for name in ("tokens", "lengths", "truncated")}
            decoded = model.tokenizer.batch_decode(
                [t[:m].tolist() for t, m in zip(out["tokens"], out["lengths"], strict=True)],
                skip_special_tokens=True,
            )
            for j, i in enumerate(rows):
                texts[i] = decoded[j * k : (j + 1) * k]
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
    dropped: int = 0,
    lengths: np.ndarray | None = None,
    truncated: np.ndarray | None = None,
    seconds: float = 0.0,
) -> BenchmarkResult:
    """Score k completions per example (texts[i] answers examples[i]) with `pool`; `dropped`
    more problems (prompts not generated for) count as wrong. The pool's counters are read
    into the result and reset."""
    if len(texts) != len(examples) or any(len(t) != k for t in texts):
        raise ValueError(
            f"benchmark {name}: need k={k} completions for each of {len(examples)} problems, "
            f"got {[len(t) for t in texts]}."
        )
    flat = [text for row in texts for text in row]
    golds = [e["answer"] for e in examples for _ in range(k)]
    scores = pool.score(flat, golds).reshape(len(examples), k) if flat else np.zeros((0, k))
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
    num_workers: int = 2,
    timeout_s: float = 5.0,
) -> dict[str, BenchmarkResult]:
    """mean@k of `model` on each benchmark ({name: [{"problem", "answer"}]}), in order.

    Prompts are built as in training (`data.prepare_prompts` with `instruction`,
    `system_prompt`, `chat_template`); `max_prompt_tokens` 0 = no limit. The verifier pool
    (`num_workers` processes, `timeout_s` per answer, extraction `fallback`) lives for the
    call. Benchmark b samples with seed + b.
    """
    _check_options(k, temperature, batch_size)
    results = {}
    with rewards.RewardPool(num_workers, timeout_s, fallback=fallback) as pool:
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
# Reports: Markdown, JSON, TensorBoard.


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


def log_to_tensorboard(writer, step: int, results: Mapping[str, BenchmarkResult]) -> None:
    """Write `scalars(results)` at `step` with a `metrics.Writer` (no-op off process 0)."""
    writer.write(step, scalars(results))


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
    """Keyword arguments of `evaluate` from a config: the `eval` section, the training
    prompt format (`data.instruction`, `data.system_prompt`, `data.chat_template`) and the
    verifier's worker count and timeout (`reward.*`)."""
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
        "num_workers": config.reward.num_workers,
        "timeout_s": config.reward.timeout_s,
    }


class PeriodicEval:
    """Evaluation every `config.eval.every_steps` training steps (0 = never).

        evaluator = PeriodicEval(config, workdir)      # benchmarks loaded once
        if evaluator.due(step):
            scalars = evaluator.run(model, step)       # also writes eval_step<step>.md/.json
            writer.write(step, scalars)

    `model` is a `models.Model` holding the current policy params (any sharding).
    """

    def __init__(self, config, workdir: str):
        self.every = config.eval.every_steps
        if self.every < 0:
            raise ValueError(f"eval.every_steps={self.every} must be >= 0 (0 = off).")
        self.workdir = workdir
        self.options = eval_options(config)
        if self.every:
            o = self.options
            _check_options(o["k"], o["temperature"], o["batch_size"])
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

    def run(self, model, step: int) -> dict[str, float]:
        """Evaluate, write `<workdir>/eval_step<step>.md/.json` (process 0), return scalars."""
        results = evaluate(model, self.benchmarks, **self.options)
        if jax.process_index() == 0:
            info = {"step": step, **self.options}
            write_results(results, self.workdir, f"eval_step{step}", info)
        return scalars(results)


# ---------------------------------------------------------------------------------------
# The evaluate command: policies from workdirs, HF directories and GGUF files.


def is_workdir(path: str) -> bool:
    """Whether `path` is a training workdir (it has a checkpoints/ folder)."""
    return os.path.isdir(os.path.join(path, "checkpoints"))


def checkpoint_step(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a workdir's checkpoint `step` (default: the latest complete one)."""
    root = epath.Path(workdir) / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(root))
    if not steps:
        raise FileNotFoundError(f"{root} holds no complete checkpoint to evaluate.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {root}; steps: {steps}.")
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(root / str(step) / "meta")
    return step, meta


def restore_model_params(workdir: str, step: int, target) -> dict:
    """The model params of a workdir's checkpoint `step`, read onto `target`'s shardings.

    `target` is the abstract model params (jax.ShapeDtypeStruct with .sharding); only the
    subtree state["params"]["model"] of the saved train state is read (orbax partial
    restore). Read-only: unlike opening a `checkpoint.Checkpointer`, which cleans up
    temporary folders, this never touches a save in flight of a running trainer.
    """
    item = {"params": {"model": target}}
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(path, args=args)["params"]["model"]


def load_policy(config, checkpoint: str | None, mesh, step: int | None = None):
    """(models.Model, label, info) of a policy to evaluate; `checkpoint` is a training
    workdir, a path `models.load` reads, or None for the config's model.path (see
    daro_jax/evaluate.py). label: "step<N>" for a workdir, else the path's last component.

    For a workdir, the model is the one described by the config saved with the checkpoint
    (model.path, param_dtype, arch_overrides) in `config.model.dtype`, with the saved params.
    """
    m = config.model
    if checkpoint is None:
        model = models.load(
            m.path,
            m.dtype,
            mesh,
            param_dtype=m.param_dtype,
            random_init=m.init_random,
            seed=config.seed,
            overrides=m.arch_overrides.to_dict(),
        )
        return model, _label(m.path), {"model": m.path}
    if not is_workdir(checkpoint):
        model = models.load(checkpoint, m.dtype, mesh, param_dtype=m.param_dtype)
        return model, _label(checkpoint), {"model": checkpoint}
    step, meta = checkpoint_step(checkpoint, step)
    saved = meta["config"]["model"]
    shell, target = _abstract_model(
        saved["path"], m.dtype, mesh, saved["param_dtype"], saved["arch_overrides"]
    )
    params = restore_model_params(checkpoint, step, target)
    info = {"model": saved["path"], "workdir": checkpoint, "step": step}
    return dataclasses.replace(shell, params=params), f"step{step}", info


def _abstract_model(path: str, dtype: str, mesh, param_dtype: str, overrides: dict):
    """(Model without params, abstract params with their shardings) of an architecture:
    `models.load(random_init=True)` traced by `jax.eval_shape`, so nothing is allocated or
    compiled (the tokenizer and config are read as usual)."""
    loaded = {}

    def load_params():
        model = models.load(
            path, dtype, mesh, param_dtype=param_dtype, random_init=True, overrides=overrides
        )
        loaded["model"] = dataclasses.replace(model, params=None)
        return model.params

    shapes = jax.eval_shape(load_params)
    shell = loaded["model"]
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        models.param_shardings(shell.config, mesh),
    )
    return shell, target


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
        raise FileNotFoundError(
            f"none of eval.benchmarks={tuple(config.eval.benchmarks)} could be loaded from "
            f"eval.benchmarks_dir={config.eval.benchmarks_dir!r} (see the lines above); set "
            "--config.eval.benchmarks_dir to a folder with <name>.jsonl/.json/.parquet files."
        )
    model, label, info = load_policy(config, checkpoint, mesh, step)
    options = eval_options(config)
    results = evaluate(model, benchmarks, **options)
    if output_dir is None:
        output_dir = checkpoint if checkpoint and is_workdir(checkpoint) else "."
    md_path = os.path.join(output_dir, f"eval_{label}.md")
    if jax.process_index() == 0:
        write_results(results, output_dir, f"eval_{label}", {**info, **options})
    return results, md_path
