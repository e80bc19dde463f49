"""`python -m daro_jax.plan --search`: the mesh, remat and micro-batch the compiler finds
fastest for a recipe's topology.

Candidates (`candidates`): every mesh (data, fsdp, tensor) of the topology's chips with
tensor dividing the model's key/value heads (tensor ≤ MAX_TENSOR) and data ≤ MAX_DATA, on
which the recipe's batch splits (`train.checks.check_config`); and on the recipe's own
mesh, train.block_rows halved and doubled and model.remat switched. Each candidate's whole
step is compiled at two depths and extrapolated to the model's (`report.scaled_plan`). A
candidate the compiler refuses, or whose peak exceeds the usable HBM, is dropped; the
others rank by their estimated step (`report.Plan`'s phases plus the host's measured
seconds, `host.HOST_SECONDS`). Every figure is an estimate.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from daro_jax import models, sharding
from daro_jax.models.config import ModelConfig
from daro_jax.plan import chips, report
from daro_jax.train import checks

MAX_TENSOR = 4  # tensor parallelism beyond 4 chips moves every activation over ICI
MAX_DATA = 4  # data replicas beyond 4 hold 4× the params per chip for rows that fsdp shards
PHASES = ("prefill", "decode", "logprob pass", "update", "host")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting the search compiles: mesh (data, fsdp, tensor), block_rows, remat."""

    mesh: tuple[int, int, int]
    block_rows: int
    remat: bool

    def apply(self, config):
        """A copy of `config` with this candidate's settings."""
        out = copy.deepcopy(config)
        out.mesh.shape = self.mesh
        out.train.block_rows = self.block_rows
        out.model.remat = self.remat
        return out

    def label(self) -> str:
        d, f, t = self.mesh
        return f"{d}×{f}×{t}, block_rows {self.block_rows}, remat {'on' if self.remat else 'off'}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A candidate's step at the model's full depth (module docstring): seconds by phase,
    peak bytes per chip, parameters, update MFU; `error` when the compiler refused it."""

    candidate: Candidate
    phases: dict[str, float]
    peak: float
    usable: int
    update_mfu: float
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.peak <= self.usable

    @property
    def step(self) -> float:
        return sum(self.phases.values())


def candidates(config, devices, cfg: ModelConfig) -> list[Candidate]:
    """The search's candidates on `devices` (module docstring), the recipe's own setting
    first."""
    n_chips = len(devices)
    t, own_mesh = config.train, _shape(config.mesh.shape, n_chips)
    own = Candidate(own_mesh, t.block_rows, bool(config.model.remat))
    found = [own]
    for tensor in (1, 2, 4, 8):
        if tensor > MAX_TENSOR or n_chips % tensor or cfg.num_kv_heads % tensor:
            continue
        for data in (1, 2, 4, 8):
            if data <= MAX_DATA and (n_chips // tensor) % data == 0:
                found.append(
                    dataclasses.replace(own, mesh=(data, n_chips // tensor // data, tensor))
                )
    found += [
        dataclasses.replace(own, block_rows=t.block_rows * 2),
        dataclasses.replace(own, remat=not own.remat),
    ]
    if t.block_rows > 1:
        found.append(dataclasses.replace(own, block_rows=t.block_rows // 2))
    return [c for c in dict.fromkeys(found) if _valid(c.apply(config), devices)]


def _shape(shape, n_chips: int) -> tuple[int, int, int]:
    """mesh.shape with its −1 resolved for `n_chips` chips."""
    known = math.prod(s for s in shape if s != -1)
    return tuple(int(s) if s != -1 else n_chips // known for s in shape)


def _valid(config, devices) -> bool:
    """Whether `config`'s batch splits over its mesh (`checks.check_config`, one process)."""
    try:
        checks.check_config(config, sharding.make_mesh(config.mesh.shape, devices), 1)
    except ValueError:
        return False
    return True


def estimate(config, candidate: Candidate, topology: str) -> Estimate:
    """The candidate's step at the model's depth (`report.scaled_plan`)."""
    p = report.scaled_plan(candidate.apply(config), topology)
    refused = next((c.error for c in p.programs if c.error), "")
    if refused:
        return Estimate(candidate, {}, p.peak_program.peak, p.usable, 0.0, refused)
    return Estimate(candidate, p.step_seconds(), p.peak_program.peak, p.usable, p.update_mfu())


def search(config, topology: str | None = None, among: list[Candidate] | None = None):
    """Every candidate's estimate (`among`, default `candidates`), the fitting ones ranked
    by step time (best last) after those dropped. Raises ValueError (one line) when none
    fits."""
    topology = report.topology(config, topology)
    full, _ = models.architecture(config.model)
    among = among or candidates(config, chips.tpu_devices(topology), full)
    found = [estimate(config, c, topology) for c in among]
    ranked = [e for e in found if not e.fits] + sorted(
        (e for e in found if e.fits), key=lambda e: e.step, reverse=True
    )
    if not any(e.fits for e in found):
        least = min(found, key=lambda e: e.peak)
        raise ValueError(
            f"plan --search: none of the {len(found)} candidates fits {topology} (least peak "
            f"{least.peak / 2**30:.2f} GiB per chip, {least.candidate.label()}, over "
            f"{least.usable / 2**30:.2f} GiB usable); lower train.batch_prompts or raise "
            "train.minibatches."
        )
    return ranked


def format_table(estimates: list[Estimate], topology: str) -> str:
    """The search's table (every figure a compiler estimate but the host's), the best
    candidate last."""
    head = [
        "mesh d×f×t",
        "block_rows",
        "remat",
        "peak GiB",
        *PHASES[:-1],
        "host (CPU, measured)",
        "step (est.)",
        "update MFU",
        "verdict",
    ]
    lines = [
        f"mesh search on {topology} (compiler estimates, not measurements; best last)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for e in estimates:
        c = e.candidate
        phases = [f"{e.phases.get(n, 0.0):.1f} s" for n in PHASES]
        verdict = "fits" if e.fits else (f"refused: {e.error}" if e.error else "does not fit")
        lines.append(
            "| "
            + " | ".join(
                [
                    "×".join(map(str, c.mesh)),
                    str(c.block_rows),
                    "on" if c.remat else "off",
                    f"{e.peak / 2**30:.1f} / {e.usable / 2**30:.1f}",
                    *phases,
                    f"{e.step:.1f} s" if e.fits else "–",
                    f"{e.update_mfu:.1%}" if e.fits else "–",
                    verdict,
                ]
            )
            + " |"
        )
    return "\n".join(lines)
