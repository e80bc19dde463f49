"""The TPU plan: one RL step of a recipe compiled ahead of time for its TPU topology.

    python -m daro_jax.plan --config=configs/X.py [--config.a.b=v] [--topology=v5p:2x4x4]
        [--json=FILE] [--search] [--scaled] [--verbose]

(The command: daro_jax/plan/__main__.py.) `--search` compiles the candidate meshes, remat
and micro-batch sizes instead and prints them ranked, the best last (`daro_jax.plan.search`).
`--scaled` compiles the model at SCALE_LAYERS = (a, b) layers and extrapolates every count
to its L layers (`scaled_plan`): a compile of all L layers needs more memory and time than a
small machine has.

No TPU is needed: libtpu (jax[tpu]) describes the chips of `config.tpu.accelerator`
(`topology`; `--topology` or `config.plan.topology` overrides it) and compiles for them.
Over the mesh `config.mesh.shape` of those chips, with abstract params, optimizer state and
DARO weights (ShapeDtypeStructs with their shardings: nothing allocated) and the recipe's
longest shapes (prompts of sampler.max_prompt_tokens, every completion max_new_tokens
long), it compiles every program one RL step runs, as the trainer jits them: the sampler
(prefill and decode loop), the old-policy/reference logprob pass (when the step has one)
and the update. From each compiled program: its per-device bytes (`memory_analysis()`:
arguments, outputs, temp, generated code) and its FLOPs, HBM bytes and bytes exchanged
between chips with loop trip counts counted (`hlo_costs`).

The peak per device is the largest program's arguments + outputs − aliased + temp + code,
plus the run's resident state that the program does not take (e.g. the optimizer state
while sampling). It fits when at most (1 − RESERVE) of the chip's HBM, RESERVE being what
the compiler cannot know: the runtime's own buffers and fragmentation.

Times are a roofline per program part (the code outside its loops, one iteration of each
loop): max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth) from the
`chips.CHIPS` table, times the trip count. The step = sampler (prefill + N − 1 decode steps) +
logprob passes + updates; the update's MFU is `chips.mfu` of its estimated time;
the decode's share of the HBM roofline = the bytes its steps must read (`decode_floor`:
valid cache slots only) / HBM bandwidth, over the estimated time of its loops. All of
these are compiler estimates, not measurements: no overlap, no launch overheads,
collectives at the chips' full ICI bandwidth. The step adds one line that is measured, not
estimated: the host's share (decoding, scoring and packing one host's completions;
`plan.host`), measured on this project's CPU machine.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from daro_jax import models, sharding
from daro_jax.algo import presets
from daro_jax.models.config import ModelConfig
from daro_jax.plan import chips, costs, host, programs
from daro_jax.plan.chips import Chip, roofline
from daro_jax.plan.programs import Compiled

GIB = 1 << 30
RESERVE = 0.10  # share of HBM left to the runtime's buffers and fragmentation
SCALE_LAYERS = (2, 4)  # the depths `scaled_plan` compiles


@dataclasses.dataclass(frozen=True)
class Plan:
    """A recipe's compiled step on a topology (module docstring)."""

    title: str
    topology: str
    chips: int
    chip: Chip
    mesh_shape: dict
    resident: dict[str, int]
    programs: tuple[Compiled, ...]
    n_params: int
    frozen_params: int  # of n_params, the LoRA base (no weight gradient)
    update_tokens: int  # tokens of one update: b·P + b·K·N
    decode_floor: int  # bytes per device a decode step reads at the least, on average
    knobs: dict[str, str]  # program → the setting that shrinks it
    host_seconds: float = 0.0  # one host's measured CPU seconds a step (`plan.host`)

    @property
    def peak_program(self) -> Compiled:
        return max(self.programs, key=lambda c: c.peak)

    @property
    def usable(self) -> int:
        return int(self.chip.hbm_gib * GIB * (1 - RESERVE))

    @property
    def fits(self) -> bool:
        return self.peak_program.peak <= self.usable and self.compiled

    @property
    def compiled(self) -> bool:
        """Whether the compiler accepted every program (times need all of them)."""
        return not any(c.error for c in self.programs)

    def program(self, name: str) -> Compiled | None:
        return next((c for c in self.programs if c.name == name), None)

    def step_seconds(self) -> dict[str, float]:
        """Seconds of one step by phase: prefill, decode, logprob pass, update (compiler
        estimates) and host (measured on a CPU, `plan.host`: the chips wait for it)."""
        sampler, passes, update = (self.program(n) for n in ("sampler", "logprob pass", "update"))
        return {
            "prefill": sampler.seconds(self.chip, dynamic=False),
            "decode": sampler.seconds(self.chip, dynamic=True),
            "logprob pass": passes.runs * passes.seconds(self.chip) if passes else 0.0,
            "update": update.runs * update.seconds(self.chip),
            "host": self.host_seconds,
        }

    def update_mfu(self) -> float:
        """`chips.mfu` of one update's tokens in its estimated time on the plan's chips."""
        seconds = self.program("update").seconds(self.chip)
        flops = chips.train_flops_per_token(self.n_params, self.frozen_params)
        return chips.mfu(flops, self.update_tokens, seconds, self.chip.peak_flops, self.chips)

    def decode_share(self) -> float:
        """The decode loop's share of the step's estimated time."""
        phases = self.step_seconds()
        return phases["decode"] / sum(phases.values())

    def decode_roofline_share(self) -> float:
        """The decode's HBM roofline (its average floor of bytes per step / HBM bandwidth,
        `decode_floor`, times its steps) over the estimated time of its loops: 1 when the
        steps move no more than they must."""
        loops = [p for p in self.program("sampler").parts if p.dynamic]
        steps = sum(p.trips for p in loops)
        floor = steps * self.decode_floor / self.chip.hbm_bandwidth
        return floor / sum(p.trips * roofline(p.per_trip, self.chip) for p in loops)

    def verdict(self) -> str:
        peak, hbm = self.peak_program.peak / GIB, self.chip.hbm_gib
        if self.fits:
            return f"plan: fits (peak {peak:.2f} of {hbm:g} GiB per device)"
        return (
            f"plan: does not fit (peak {peak:.2f} GiB per device in the "
            f"{self.peak_program.name}, over {self.usable / GIB:.2f} GiB usable of {hbm:g} "
            f"GiB); change {self.knobs[self.peak_program.name]}"
        )

    def estimates(self) -> dict:
        """Step time by phase, update MFU and the decode loop's shares (all programs
        compiled), else {}."""
        if not self.compiled:
            return {}
        return {
            "step_seconds": self.step_seconds(),
            "update_mfu": self.update_mfu(),
            "decode_share_of_step": self.decode_share(),
            "decode_floor_bytes": self.decode_floor,
            "decode_share_of_hbm_roofline": self.decode_roofline_share(),
        }

    def to_json(self) -> dict:
        programs = [
            dataclasses.asdict(c) | {"peak": c.peak, "seconds_per_run": c.seconds(self.chip)}
            for c in self.programs
        ]
        return {
            "note": "compiler estimates, not measurements; bytes per device",
            **{k: getattr(self, k) for k in ("title", "topology", "chips", "n_params")},
            "chip": dataclasses.asdict(self.chip),
            "mesh": self.mesh_shape,
            "resident": self.resident,
            "programs": programs,
            "peak": self.peak_program.peak,
            "usable": self.usable,
            "fits": self.fits,
            **self.estimates(),
            "verdict": self.verdict(),
        }

    def breakdown(self) -> str:
        """`--verbose`: each program's largest HBM byte counts by op (`costs.byte_breakdown`:
        one packed chunk of the update and the logprob pass; compiler-estimate shapes)."""
        lines = []
        for c in self.programs:
            where = "per packed chunk" if any(p.dynamic for p in c.parts) else "per run"
            lines.append(f"{c.name}: HBM bytes by op, {where} (estimates from the HLO's shapes)")
            lines += [f"  {_gib(nbytes):>10}  {label[:110]}" for label, nbytes in c.breakdown]
        return "\n".join(lines)

    def format(self) -> str:
        """The report the CLI prints (every number a compiler estimate)."""
        mesh = " × ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"TPU plan (compiler estimates, not measurements): {self.title}",
            f"{self.topology}: {self.chips} chips × {self.chip.hbm_gib:g} GiB HBM; mesh {mesh}; "
            f"{self.n_params / 1e9:.2f} B params",
            "resident: " + ", ".join(f"{k} {_gib(v)}" for k, v in self.resident.items()),
        ]
        for c in self.programs:
            lines += _program_lines(c, self.chip)
        if self.compiled:
            phases = self.step_seconds()
            lines += [
                f"step: {sum(phases.values()):.2f} s = "
                + " + ".join(f"{name} {s:.2f}" for name, s in phases.items()),
                f"host: {self.host_seconds:.2f} s, measured on a CPU, not estimated "
                f"({host.where()})",
                f"update MFU {self.update_mfu():.1%}; decode loop {self.decode_share():.0%} of "
                f"the step, at {self.decode_roofline_share():.0%} of its HBM roofline (a step "
                f"must read {_gib(self.decode_floor)} on average)",
            ]
        lines += [
            f"peak per device: {_gib(self.peak_program.peak)} ({self.peak_program.name}) of "
            f"{self.chip.hbm_gib:g} GiB, usable {_gib(self.usable)} after a {RESERVE:.0%} reserve",
            self.verdict(),
        ]
        return "\n".join(lines)


def _program_lines(c: Compiled, chip: Chip) -> list[str]:
    """A compiled program's lines of the report: memory, costs, and its parts."""
    m, total = c.memory, c.total()
    head = f"{c.name} (×{c.runs} per step, compiled in {c.compile_s:.0f} s here): "
    if c.error:
        return [
            head + f"refused by the compiler: {c.error}",
            f"  arguments {_gib(m['arguments'])} + resident elsewhere "
            f"{_gib(c.resident_elsewhere)} + temp {_gib(m['temp'])} = peak {_gib(c.peak)}",
        ]
    lines = [
        head + f"arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} (aliased "
        f"{_gib(m['aliased'])}), temp {_gib(m['temp'])}, code {_gib(m['code'])}; + resident "
        f"elsewhere {_gib(c.resident_elsewhere)} = peak {_gib(c.peak)}",
        f"  {total.flops / 1e12:.2f} TFLOP, {total.bytes / GIB:.2f} GiB HBM, "
        f"{total.ici_bytes / GIB:.2f} GiB ICI per device per run → {c.seconds(chip):.3f} s",
    ]
    for part in c.parts:
        cost = part.per_trip
        lines.append(
            f"    {part.name}{' (data-dependent)' * part.dynamic}: {part.trips} × "
            f"({cost.flops / 1e9:.2f} GFLOP, {cost.bytes / 2**20:.1f} MiB HBM, "
            f"{cost.ici_bytes / 2**20:.1f} MiB ICI) = {part.trips * roofline(cost, chip):.3f} s"
        )
    return lines


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def knobs(config) -> dict[str, str]:
    """Per program, the one setting to change when it does not fit."""
    t = config.train
    rows = f"train.block_rows={t.block_rows // 2}" if t.block_rows > 1 else None
    return {
        "sampler": f"train.batch_prompts={t.batch_prompts // 2} (the decode cache is B·K rows)",
        "logprob pass": rows or f"train.batch_prompts={t.batch_prompts // 2}",
        "update": rows or f"train.minibatches={t.minibatches * 2}",
    }


def decode_floor(config, cfg: ModelConfig, spec: presets.AlgoSpec, mesh, n_params: int) -> int:
    """Bytes on one device that a decode step must read, on average over the N − 1 steps of
    a decode that no row stops early: every weight in the compute dtype (each chip applies
    every layer to its rows; split over "tensor") and the keys and values of its rows' valid
    slots, L × 2 × KV × Dh × (B·P + B·K·N/2) (each prompt's once; step i reads a row's i own
    slots, N/2 on average) over the data × fsdp shards."""
    s, b = config.sampler, config.train.batch_prompts
    item = jnp.dtype(cfg.compute_dtype).itemsize
    slots = b * s.max_prompt_tokens + b * spec.k * s.max_new_tokens // 2
    cache = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * slots * item
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return n_params * item // mesh.shape["tensor"] + cache // shards


def topology(config, name: str | None = None) -> str:
    """`name`, else config.plan.topology, else the topology of config.tpu.accelerator."""
    return name or config.plan.topology or chips.topology(config.tpu.accelerator)


def make_plan(config, topology_name: str | None = None, title: str = "", layers: int = 0) -> Plan:
    """Compile one RL step of `config` for `topology_name` (default: config.plan.topology,
    else the topology of config.tpu.accelerator); of the model's first `layers` layers
    only when given (`search`)."""
    name = topology(config, topology_name)
    devices = chips.tpu_devices(name)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    built = programs.build(config, mesh, spec, layers=layers)
    device_bytes = programs.device_bytes
    trained = device_bytes(built.abstract["params"]["model"])
    resident = {
        "params": trained + device_bytes(built.base),
        "optimizer state": device_bytes(built.abstract["opt"]),
        "DARO weights": device_bytes(built.abstract["params"]["daro"]),
        "reference params": trained if spec.kl_beta > 0 else 0,  # LoRA: the base is shared
    }
    step = programs.step_programs(config, built, mesh)
    total = sum(resident.values())
    t, s = config.train, config.sampler
    per = t.batch_prompts // t.minibatches
    frozen = sum(x.size for x in jax.tree.leaves(built.base))
    n_params = frozen + sum(x.size for x in jax.tree.leaves(built.abstract["params"]["model"]))
    return Plan(
        title=title or str(config.model.path),
        topology=name,
        chips=len(devices),
        chip=chips.chip(name),
        mesh_shape=dict(mesh.shape),
        resident=resident,
        programs=tuple(programs.compile_program(p, total) for p in step),
        n_params=n_params,
        frozen_params=frozen,
        update_tokens=per * s.max_prompt_tokens + per * spec.k * s.max_new_tokens,
        decode_floor=decode_floor(config, built.cfg, spec, mesh, n_params),
        knobs=knobs(config),
        host_seconds=host.seconds(
            t.batch_prompts * spec.k, s.max_new_tokens, name.split(":")[0], len(devices)
        ),
    )


def compile_only(accelerator: str) -> None:
    """Set up a process that only plans: JAX on the CPU; libtpu told it has no TPU workers
    of its own (else it prints start-up errors) and that other processes may load it too
    (it holds no chip; else a second one fails on libtpu's lockfile). Settings already
    made, such as a TPU VM's, are kept."""
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", str(accelerator))
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def check(config) -> Plan:
    """The start-up check of `daro_jax.main` (config.plan.check): prints the plan of
    `config`; raises SystemExit with its verdict when the compiled step does not fit. The
    run's own backend starts first (on a TPU VM it, not the plan, brings libtpu up)."""
    jax.devices()
    result = make_plan(config)
    print(result.format(), flush=True)
    if not result.fits:
        raise SystemExit(result.verdict())
    return result


def scaled_plan(config, topology_name: str | None = None, title: str = "") -> Plan:
    """The plan of `config` at its model's L layers from two compiles of its first a and b
    layers (SCALE_LAYERS; a model of at most b layers is compiled whole): every count —
    each program part's FLOPs and bytes (its trips too: the prefill's scan runs once per
    layer), each memory figure, the parameters, the resident state, the decode floor — is
    x(L) = x(a) + (x(b) − x(a)) · (L − a) / (b − a). The layers are one scan in training and
    identical unrolled copies in the decode, each costing the same, so the counts are
    linear in L; the times follow from the counts as in a whole compile. When a program is
    refused at b layers, that plan is returned: it does not fit at L either."""
    low, high = SCALE_LAYERS
    layers = models.architecture(config.model)[0].num_layers
    if layers <= high:
        return make_plan(config, topology_name, title=title)
    a, b = (make_plan(config, topology_name, title=title, layers=n) for n in SCALE_LAYERS)
    if not (a.compiled and b.compiled):
        return b
    scale = (layers - low) / (high - low)

    def lin(x, y):
        return x + (y - x) * scale

    def cost(x: costs.Cost, y: costs.Cost) -> costs.Cost:
        return costs.Cost(
            lin(x.flops, y.flops), lin(x.bytes, y.bytes), lin(x.ici_bytes, y.ici_bytes)
        )

    def part(x: costs.Part, y: costs.Part) -> costs.Part:
        trips = round(lin(x.trips, y.trips))
        total = cost(x.total, y.total)
        per_trip = total * (1 / trips) if trips else cost(x.per_trip, y.per_trip)
        return dataclasses.replace(x, trips=trips, per_trip=per_trip)

    def program(x: Compiled, y: Compiled) -> Compiled:
        if [(p.name, p.dynamic) for p in x.parts] != [(p.name, p.dynamic) for p in y.parts]:
            raise ValueError(
                f"plan --scaled: the {x.name}'s loops differ at {low} and {high} layers"
            )
        return dataclasses.replace(
            y,
            compile_s=x.compile_s + y.compile_s,
            memory={k: round(lin(x.memory[k], v)) for k, v in y.memory.items()},
            resident_elsewhere=round(lin(x.resident_elsewhere, y.resident_elsewhere)),
            parts=tuple(part(p, q) for p, q in zip(x.parts, y.parts, strict=True)),
        )

    return dataclasses.replace(
        b,
        title=f"{b.title} (scaled from {low} and {high} layers to {layers})",
        resident={k: round(lin(a.resident[k], v)) for k, v in b.resident.items()},
        programs=tuple(program(x, y) for x, y in zip(a.programs, b.programs, strict=True)),
        n_params=round(lin(a.n_params, b.n_params)),
        frozen_params=round(lin(a.frozen_params, b.frozen_params)),
        decode_floor=round(lin(a.decode_floor, b.decode_floor)),
    )
