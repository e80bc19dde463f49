"""The metrics of an RL step (its updates, rollouts and throughput; the finite check),
their naming, TensorBoard writing (process 0 only) and the run's console lines: the
start-up summary, one line per logged step and the closing line."""

from __future__ import annotations

import functools
import math
import shlex
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from daro_jax.algo import daro, loss_sums
from daro_jax.plan import chips
from daro_jax.train import update

PER_GROUP = {
    "group_prompts": "prompts",
    "group_tokens": "tokens",
    "group_loss": "L",
    "group_weight": "w",
    "group_weighted_loss": "wL",
}


def flatten(metrics: Mapping[str, object], k: int) -> dict[str, float]:
    """Scalars by name; per-group [K+1] arrays become `group/<name>/<k>of<K>` (μ = k/K)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        arr = np.asarray(value)
        if name in PER_GROUP:
            for g, v in enumerate(arr.reshape(-1)):
                out[f"group/{PER_GROUP[name]}/{g}of{k}"] = float(v)
        elif arr.size == 1:
            out[name] = float(arr.reshape(()))
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{name}/{i}"] = float(v)
    return out


def first_nonfinite(metrics: Mapping[str, float], names: tuple[str, ...]) -> str | None:
    """The first of `names` whose value is NaN or ±Inf."""
    for name in names:
        if name in metrics and not math.isfinite(metrics[name]):
            return name
    return None


class Writer:
    """TensorBoard scalars under `logdir`; a no-op on processes other than 0. A context
    manager: closed on leaving it."""

    def __init__(self, logdir: str):
        self._tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._tb is None:
            return
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# (metric, console label, format) of the figures a researcher watches, then the timings.
FIGURES = (
    ("reward", "reward", ".3f"),
    ("accuracy", "acc", ".3f"),
    ("loss", "loss", "+.4f"),
    ("entropy", "H", ".3f"),
    ("clip_frac_high", "clip_hi", ".3f"),
    ("length_mean", "len", ".1f"),
)
TIMINGS = (
    ("time/sampler_s", "sample", ".1f"),
    ("time/reward_s", "reward_t", ".1f"),
    ("time/update_s", "update", ".1f"),
)


def _figures(m: Mapping[str, float], fields) -> list[str]:
    return [f"{label} {m[key]:{fmt}}" for key, label, fmt in fields if key in m]


def summary_line(step: int, m: Mapping[str, float]) -> str:
    """One console line: the figures a researcher watches and the step's timings."""
    return " | ".join([f"step {step}", *_figures(m, FIGURES + TIMINGS)])


def console(line: str) -> None:
    """Prints one of the run's own lines on process 0, above a tqdm bar if one is shown."""
    if jax.process_index() == 0:
        tqdm.write(line)
        sys.stdout.flush()


def tensorboard_command(logdir: str) -> str:
    return f"tensorboard --logdir {shlex.quote(str(logdir))}"


def startup_lines(
    config, workdir: str, n_params: int, mesh_shape: Mapping[str, int], problems: int
) -> list[str]:
    """The start-up summary of a run: model, devices, mesh, recipe and data, and where its
    checkpoints and TensorBoard scalars go."""
    m, a, t = config.model, config.algo, config.train
    kinds = sorted({d.device_kind for d in jax.devices()})
    every = f"every {t.ckpt_every} steps and " if t.ckpt_every else ""
    lora = m.get("lora")
    params = f"params {m.param_dtype}"
    if lora is not None and lora.rank:
        params = (
            f"base frozen in {m.dtype}, LoRA rank {lora.rank} alpha {lora.alpha:g} on "
            f"{lora.targets} ({lora.dtype})"
        )
    return [
        f"model        {m.path}: {n_params / 1e6:.1f} M parameters"
        f"{' (random init)' if m.init_random else ''}, {params}, compute {m.dtype}",
        f"devices      {jax.device_count()} × {', '.join(kinds)} "
        f"in {jax.process_count()} process(es)",
        "mesh         " + " × ".join(f"{name} {size}" for name, size in mesh_shape.items()),
        f"recipe       {a.name}, K={a.k}, {t.batch_prompts} prompts per step, {t.steps} "
        f"steps, lr {config.optim.lr:g}, {config.sampler.max_new_tokens} new tokens",
        f"data         {config.data.source}: {problems} problems",
        f"checkpoints  {workdir}/checkpoints ({every}at the end; the last "
        f"{t.keep_checkpoints} kept)",
        f"TensorBoard  {tensorboard_command(workdir)}",
    ]


def closing_line(step: int, steps: int, m: Mapping[str, float], workdir: str) -> str:
    """The last console line of a run: where it stopped, its last figures, how to look."""
    return " | ".join(
        [
            f"done: step {step} of {steps}",
            *_figures(m, FIGURES),
            f"checkpoints in {workdir}/checkpoints",
            f"view: {tensorboard_command(workdir)}",
        ]
    )


# ---------------------------------------------------------------------------------------
# The metrics of one RL step.


def check_finite(step: int, updates: Sequence[Mapping[str, object]]) -> None:
    """Raises FloatingPointError naming the first update of `step` whose loss or gradient
    norm is not finite (the update left the state unchanged: `finite` is 0)."""
    for i, u in enumerate(updates):
        if not u["finite"]:
            names = update.UPDATE_SCALARS
            scalars = {name: float(u[name]) for name in names}
            raise FloatingPointError(
                f"step {step} (update {i}): non-finite {first_nonfinite(scalars, names)}; "
                "the update was not applied and nothing was saved for this step (the last "
                "checkpoint is intact). Lower optim.lr, check the data, or use "
                "model.dtype=float32."
            )


def update_metrics(updates: Sequence[Mapping], spec, minibatches: int) -> dict[str, float]:
    """Metrics of a step's updates (host outputs of `train.update.update_step`). The
    per-group metrics and token means cover the whole batch: the metric sums of the first
    epoch's `minibatches` updates (each prompt once), finalized with the DARO weights of the
    first update. loss, grad_norm, grad_norm_daro: the first update's (the on-policy one);
    the last update's under last_update/. With several DARO updates, the weights each used:
    daro/w_update<i>/<k>of<K>."""
    k, first, last = spec.k, updates[0], updates[-1]
    epoch = functools.reduce(loss_sums.accumulate, [u["sums"] for u in updates[:minibatches]])
    out = flatten(loss_sums.finalize(epoch, first["daro"], spec), k)
    last_means = loss_sums.finalize(last["sums"], last["daro"], spec)
    for name in update.UPDATE_SCALARS:
        out[name] = float(first[name])
        out[f"last_update/{name}"] = float(last[name])
    for name in ("ratio_mean", "clip_frac_low", "clip_frac_high"):
        out[f"last_update/{name}"] = float(last_means[name])
    if spec.uses_daro_weights and len(updates) > 1:
        for i, u in enumerate(updates):
            out |= daro_weights(f"daro/w_update{i}", u["daro"], spec)
    return out


def step_metrics(
    updates: Sequence[Mapping],
    stats: Mapping,
    rollouts: Mapping[str, np.ndarray],
    daro_params,
    spec,
    minibatches: int,
    seconds: Mapping[str, float],
    flops_per_token: float,
) -> dict[str, float]:
    """The metrics of a step that updated the policy: `update_metrics` of its updates,
    `rollout_metrics` of this process's rollouts (lengths, truncated), the DARO weights after
    the updates (`daro_params`) as daro/w_after_update/<k>of<K> when the recipe uses them,
    time/<name> of `seconds`, and the `throughput` of all processes' tokens, counted as this
    process's × process_count: the new tokens sampled (lengths) and those plus the prompt
    tokens (prompt_mask) trained on, once per update."""
    out = update_metrics(updates, spec, minibatches)
    out |= rollout_metrics(stats, rollouts["lengths"], rollouts["truncated"])
    if spec.uses_daro_weights:
        out |= daro_weights("daro/w_after_update", daro_params, spec)
    out |= {f"time/{name}": v for name, v in seconds.items()}
    sampled = float(rollouts["lengths"].sum()) * jax.process_count()
    trained = sampled + float(rollouts["prompt_mask"].sum()) * jax.process_count()
    return out | throughput(sampled, trained, seconds, flops_per_token, len(updates))


def daro_weights(prefix: str, daro_params, spec) -> dict[str, float]:
    """w_μ of the DARO parameters as <prefix>/<k>of<K>, k = 1 … K − 1."""
    w = np.asarray(jax.device_get(daro.weights(jnp.asarray(daro_params), spec)))
    return {f"{prefix}/{g}of{spec.k}": float(v) for g, v in enumerate(w, start=1)}


def rollout_metrics(stats: Mapping, lengths: np.ndarray, truncated: np.ndarray) -> dict:
    """The step's reward, accuracy and lengths (`stats` of `advantages.group_advantages`
    over the global batch, and kl_penalty with the KL in the reward); length_mean and
    truncated_frac over this process's rollouts with a completion (padding rows of dynamic
    sampling have length 0)."""
    real = lengths > 0
    return {
        "reward": float(stats["reward"]),
        "accuracy": float(stats["accuracy"]),
        "length_mean": float(lengths[real].mean()) if real.any() else 0.0,
        "length_correct": float(stats["length_correct"]),
        "length_incorrect": float(stats["length_incorrect"]),
        "truncated_frac": float(truncated[real].mean()) if real.any() else 0.0,
    } | {name: float(stats[name]) for name in ("kl_penalty",) if name in stats}


def throughput(
    sampled: float,
    trained: float,
    seconds: Mapping[str, float],
    flops_per_token: float,
    updates: int,
) -> dict[str, float]:
    """Tokens per second of the sampler (`sampled` new tokens in seconds["sampler_s"]) and
    of the update (`trained` prompt and completion tokens, `updates` times, in
    seconds["update_s"]); the update's MFU (`chips.mfu` at `flops_per_token`,
    `chips.train_flops_per_token`) where the device's peak is known."""
    update_s = seconds["update_s"]
    out = {
        "throughput/sampler_tokens_per_s": sampled / max(seconds["sampler_s"], 1e-9),
        "throughput/update_tokens_per_s": trained * updates / update_s,
    }
    peak = chips.peak_flops(jax.devices()[0].device_kind)
    if peak:
        tokens = trained * updates
        devices = jax.device_count()
        out["throughput/update_mfu"] = chips.mfu(flops_per_token, tokens, update_s, peak, devices)
    return out
