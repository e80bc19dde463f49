"""Metric naming, TensorBoard writing (process 0 only) and the one-line console summary."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np

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
            out[name] = float(arr)
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


def summary_line(step: int, m: Mapping[str, float]) -> str:
    """One console line: the figures a researcher watches."""
    parts = [f"step {step}"]
    for key, label, fmt in (
        ("reward", "reward", ".3f"),
        ("accuracy", "acc", ".3f"),
        ("loss", "loss", "+.4f"),
        ("entropy", "H", ".3f"),
        ("clip_frac_high", "clip_hi", ".3f"),
        ("length_mean", "len", ".1f"),
        ("time/sampler_s", "sample", ".1f"),
        ("time/reward_s", "reward_t", ".1f"),
        ("time/update_s", "update", ".1f"),
    ):
        if key in m:
            parts.append(f"{label} {m[key]:{fmt}}")
    return " | ".join(parts)
