"""Metric naming, TensorBoard writing (process 0 only) and the run's console lines: the
start-up summary, one line per logged step and the closing line."""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Mapping

import jax
import numpy as np
from tqdm import tqdm

# Peak dense bf16 FLOP/s per chip, for MFU; devices not listed get no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

PER_GROUP = {
    "group_prompts": "prompts",
    "group_tokens": "tokens",
    "group_loss": "L",
    "group_weight": "w",
    "group_weighted_loss": "wL",
}


def peak_flops(device: jax.Device) -> float | None:
    """Peak FLOP/s of one device of this kind, or None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


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
    """TensorBoard scalars under `logdir`; a no-op on processes other than 0."""

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
    return [
        f"model        {m.path}: {n_params / 1e6:.1f} M parameters"
        f"{' (random init)' if m.init_random else ''}, params {m.param_dtype}, "
        f"compute {m.dtype}",
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
