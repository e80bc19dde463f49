"""The chips' specs (one table for the plan and the run's MFU), TPU topology names, and
libtpu's description of them.

`topology("v5p-64")` → "v5p:2x4x4", the libtpu name of the chips an accelerator type
names; `tpu_devices(name)` their devices, which `jax.jit(...).lower(...).compile()`
compiles for on a machine without a TPU; `roofline(cost, chip)` the time a program part
takes at the chip's peak FLOP/s, HBM and ICI bandwidth (`CHIPS`, with their sources; and
`GPUS`, the NVIDIA chips the GPU check compares with); `peak_flops(device_kind)` a device's
peak (TPUs from `CHIPS`, GPUs from `GPU_PEAK_FLOPS`) and `mfu`, the model FLOPs utilisation
of the update that the run logs and the plan estimates.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math

from daro_jax.errors import UserError
from daro_jax.plan import costs


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: per-chip HBM (GiB), bf16 peak FLOP/s, HBM and one-way ICI bytes/s,
    TensorCores the accelerator name counts per chip, and the torus rank."""

    hbm_gib: float
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    cores_per_chip: int
    torus_rank: int


# Sources: cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e (system architecture tables);
# v4's ICI: 6 links × 50 GB/s each way (Jouppi et al., "TPU v4", ISCA 2023).
CHIPS = {
    "v4": Chip(32, 275e12, 1200e9, 300e9, 2, 3),
    "v5p": Chip(95, 459e12, 2765e9, 600e9, 2, 3),
    "v5e": Chip(16, 197e12, 819e9, 200e9, 1, 2),
    "v6e": Chip(32, 918e12, 1638e9, 400e9, 1, 2),
}
# The GPUs of `bench.device_check` (no torus: not a TPU topology). Sources: nvidia.com H100
# and H200 SXM datasheets: bf16 dense 989 TFLOP/s, HBM 80 GB at 3.35 TB/s (H100) and 141 GB
# at 4.8 TB/s (H200), NVLink 900 GB/s both ways.
GPUS = {
    "h100": Chip(80e9 / 2**30, 989e12, 3.35e12, 450e9, 1, 0),
    "h200": Chip(141e9 / 2**30, 989e12, 4.8e12, 450e9, 1, 0),
}
ALIASES = {"v5litepod": "v5e"}
# jax's device_kind prefixes of the TPU generations ("TPU v5 lite" before "TPU v5": v5e
# is not v5p), and GPUs' peak dense bf16 FLOP/s (NVIDIA data sheets).
TPU_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5p": "v5p",
    "TPU v5": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}
GPU_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of jax's `device_kind`, or None when unknown
    (e.g. CPU)."""
    for prefix, family in TPU_KINDS.items():
        if device_kind.startswith(prefix):
            return CHIPS[family].peak_flops
    for prefix, flops in GPU_PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def train_flops_per_token(n_params: int, frozen: int = 0) -> float:
    """The model FLOPs of training on one token: 2 · n_params forward, 2 · n_params for the
    activations' gradient and 2 · (n_params − frozen) for the weights' gradient, where
    `frozen` weights (a LoRA base) need none: 6 · n_params − 2 · frozen."""
    return 6.0 * n_params - 2.0 * frozen


def mfu(flops_per_token: float, tokens: float, seconds: float, peak: float, devices: int) -> float:
    """Model FLOPs utilisation of training on `tokens` tokens in `seconds`:
    flops_per_token · tokens / (seconds · peak · devices) (`train_flops_per_token`)."""
    return flops_per_token * tokens / (seconds * peak * devices)


def topology(accelerator: str) -> str:
    """The libtpu topology name of a TPU type: "v4-32" (32 TensorCores, 16 chips) →
    "v4:2x2x4", "v5e-8" → "v5e:2x4". The chips, a power of two, are laid out from 1×…×1
    (2×2×1 for a 3-D torus of ≥ 4) by doubling the smallest side, the last of equals."""
    family, _, count = str(accelerator).partition("-")
    family = ALIASES.get(family, family)
    chip = CHIPS.get(family)
    cores = int(count) if count.isdigit() else 0
    chips = cores // chip.cores_per_chip if chip else 0
    if not chip or chips < 1 or chips & (chips - 1) or cores % chip.cores_per_chip:
        known = ", ".join(f"{name}-N" for name in [*CHIPS, *ALIASES])
        raise UserError(
            f"config.tpu.accelerator={accelerator!r} is not a TPU type the plan knows: use one "
            f"of {known} with N a power of two TensorCores (v4, v5p: 2 per chip), or pass "
            "--topology=FAMILY:AxBxC."
        )
    sides = [2, 2, 1] if chip.torus_rank == 3 and chips >= 4 else [1] * chip.torus_rank
    while math.prod(sides) < chips:
        smallest = min(sides)
        sides[len(sides) - 1 - sides[::-1].index(smallest)] *= 2
    return f"{family}:{'x'.join(map(str, sides))}"


def tpu_devices(name: str) -> list:
    """The devices of libtpu's description of topology `name` ("v4" chips as one megacore
    device each, as on a v4 VM). The same objects at every call: a mesh of them equals one
    made before, so a program cached for that mesh (`sampler.make_sampler`) is placed on the
    very devices its arguments are (two descriptions' devices are equal but incompatible)."""
    chip(name)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            "the TPU plan compiles with libtpu, which is not installed: pip install -r "
            "requirements-test.txt (it pins jax[tpu])."
        )
    return _described_devices(name)


@functools.cache
def _described_devices(name: str) -> list:
    from jax.experimental import topologies

    extra = {"chip_config_name": "megacore"} if name.split(":", 1)[0] == "v4" else {}
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices


def chip(name: str) -> Chip:
    """The chip of a topology name such as "v5p:2x4x4"."""
    family = name.split(":", 1)[0]
    if ALIASES.get(family, family) not in CHIPS:
        raise UserError(f"topology {name!r}: the chip table knows {sorted(CHIPS)}.")
    return CHIPS[ALIASES.get(family, family)]


def roofline(cost: costs.Cost, chip: Chip) -> float:
    """max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth), seconds."""
    return max(
        cost.flops / chip.peak_flops,
        cost.bytes / chip.hbm_bandwidth,
        cost.ici_bytes / chip.ici_bandwidth,
    )
