"""FLOPs and bytes of a compiled XLA program with its loops' trip counts counted.

XLA's cost analysis (`compiled.cost_analysis()`) walks each `while` body once, whatever
its trip count, so a decode loop of N steps, a scan over L layers or the windows of a
collective matmul count as one iteration. This module reads the optimized HLO text of a
compiled program (`compiled.as_text()`), costs every loop body on its own with XLA's own
cost analysis (the module re-entered at that body), and counts each computation c as

    T(c) = cost(c) − Σ_w [cost(body_w) + cost(cond_w)] + Σ_w n_w · T(body_w)

over the loops w that c runs (directly or through a call). n_w is the loop's trip count:
XLA's `known_trip_count` when annotated, else ⌈(C − c0) / s⌉ for a condition `i < C` on
an induction variable that starts at the constant c0 and steps by the constant s, else
(any other condition) "dynamic": counts the caller supplies, for decode loops that may
stop early or a loop over a traced number of chunks.

A custom call (a Pallas kernel) is opaque to XLA's cost analysis: it is counted from the
analytic cost its op_name carries, or as its operands' and results' bytes
(`custom_call_cost`). Bytes between chips, which XLA's cost analysis does not separate,
are counted per collective (all-gather, reduce-scatter, all-reduce ×2, all-to-all,
collective-permute) as the largest array it reads or writes, with the same trip counts.
Array sizes here are logical (no TPU tile padding). Uses jaxlib's HLO parser and cost
analysis (jaxlib._hlo, jaxlib._jax), pinned with jax in requirements.txt.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
from jaxlib import _hlo, _jax

DYNAMIC = -1  # trip count of a loop whose condition is data-dependent

_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*|c64|c128|token)\[([\d,]*)\]")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|[a-z_]*computations?)=\{?([^}\s]*)")
_COLLECTIVES = {  # opcode → factor on its largest array
    "all-gather": 1,
    "all-gather-start": 1,
    "reduce-scatter": 1,
    "all-reduce": 2,
    "all-reduce-start": 2,
    "all-to-all": 1,
    "collective-permute": 1,
    "collective-permute-start": 1,
}
_KERNEL_COST = re.compile(r"kernel_cost\[flops=(\d+),bytes=(\d+),calls=(\d+)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128, "token": 0}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device FLOPs, HBM bytes accessed and bytes exchanged with other chips (ICI)."""

    flops: float = 0.0
    bytes: float = 0.0
    ici_bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops, self.bytes + other.bytes, self.ici_bytes + other.ici_bytes
        )

    def __sub__(self, other: Cost) -> Cost:
        return self + other * -1.0

    def __mul__(self, n: float) -> Cost:
        return Cost(self.flops * n, self.bytes * n, self.ici_bytes * n)


@dataclasses.dataclass(frozen=True)
class Part:
    """A piece of a program: the code outside its loops (trips 1), or one of its top-level
    loops (`name`: the loop's JAX op name) run `trips` times at `per_trip` each (its
    nested loops counted with their own trip counts); `dynamic` when the trip count is the
    caller's."""

    name: str
    trips: int
    per_trip: Cost
    dynamic: bool = False

    @property
    def total(self) -> Cost:
        return self.per_trip * self.trips


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result's shape text: an array or a tuple of them
    opcode: str
    text: str  # from the opcode on

    def operands(self) -> list[str]:
        """Names of the operands (inside the opcode's parentheses)."""
        return _NAME.findall(self.text.split("(", 1)[1].split(")", 1)[0])

    def called(self) -> list[str]:
        """Computations it calls (fusions, reductions, loop bodies and conditions, branches)."""
        return [
            n.strip().lstrip("%")
            for g in _CALLED.findall(self.text)
            for n in g.split(",")
            if n.strip()
        ]


Module = dict[str, dict[str, Instruction]]  # computation → {instruction name: instruction}


def parse_module(text: str) -> tuple[str, Module]:
    """(entry name, computations) of an HLO module's text; each computation's instructions
    in order (its last one is its ROOT)."""
    computations: Module = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            computations[current] = {}
            entry = current if header.group(1) else entry
            continue
        match = _INSTRUCTION.match(line) if current else None
        if match:
            shape, tail = _split_shape(match.group(2))
            opcode = tail.split("(", 1)[0].strip()
            last = Instruction(match.group(1), shape, opcode, tail)
            computations[current][last.name] = last
        elif current and computations[current] and line.strip() not in ("}", ""):
            # an attribute that spans lines (a custom call's kernel_metadata): the rest of
            # the instruction, up to its metadata
            last = dataclasses.replace(last, text=last.text + " " + line.strip())
            computations[current][last.name] = last
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, computations


def _split_shape(rest: str) -> tuple[str, str]:
    """(shape, the rest) of an instruction's text after "= ": a tuple shape runs to its
    matching parenthesis, an array shape to the first space."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 2 :]
    raise ValueError(f"unbalanced tuple shape in HLO: {rest[:200]}")


def array_bytes(shape: str) -> list[int]:
    """Bytes of each array in an HLO shape text (logical: layouts and tiling ignored)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype) or 8)
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        sizes.append(count * bits // 8)
    return sizes


def _source(name: str, insts: dict[str, Instruction]) -> Instruction | None:
    """Instruction `name`, or what it copies, bitcasts or converts (repeatedly)."""
    inst = insts.get(name)
    while inst is not None and inst.opcode in ("copy", "bitcast", "convert"):
        inst = insts.get(inst.operands()[0])
    return inst


def _constant(name: str, insts: dict[str, Instruction]) -> int | None:
    """The integer value of instruction `name` when it is (a copy of) a constant."""
    inst = _source(name, insts)
    value = re.match(r"constant\((-?\d+)\)", inst.text) if inst else None
    return int(value.group(1)) if value else None


def _element(inst: Instruction | None) -> int | None:
    """The tuple index a get-tuple-element reads (None for any other instruction)."""
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    return int(re.search(r"index=(\d+)", inst.text).group(1))


def trip_count(loop: Instruction, caller: dict[str, Instruction], module: Module) -> int:
    """A while loop's trip count (module docstring), or DYNAMIC when its condition is not
    `i < constant`. Raises ValueError when it is, but i's start or step is not a constant."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.text)
    if known:
        return int(known.group(1))
    body, cond = module[body_of(loop)], module[condition_of(loop)]
    root = list(cond.values())[-1]
    operands = root.operands() if root.opcode == "compare" else []
    if "direction=LT" not in root.text or len(operands) != 2:
        return DYNAMIC
    element, bound = _element(_source(operands[0], cond)), _constant(operands[1], cond)
    if element is None or bound is None:
        return DYNAMIC
    init = caller.get(loop.operands()[0])
    start = _constant(init.operands()[element], caller) if init and init.opcode == "tuple" else None
    update = body.get(list(body.values())[-1].operands()[element])
    step = None
    if update is not None and update.opcode == "add":
        a, b = update.operands()
        step = _constant(b, body) if _element(_source(a, body)) == element else _constant(a, body)
    if start is None or not step:
        raise ValueError(f"loop {loop.name}: condition i < {bound}, but no constant start or step")
    return max(0, -(-(bound - start) // step))


def body_of(loop: Instruction) -> str:
    return re.search(r"body=%([\w.\-]+)", loop.text).group(1)


def condition_of(loop: Instruction) -> str:
    return re.search(r"condition=%([\w.\-]+)", loop.text).group(1)


def _reentered(text: str, entry: str, target: str) -> str:
    """The module text with computation `target` as its ENTRY (the header's attributes,
    which describe the old entry's signature, dropped)."""
    if target == entry:
        return text
    lines = text.splitlines()
    lines[0] = lines[0].split(",", 1)[0]
    for i, line in enumerate(lines):
        if line.startswith(f"ENTRY %{entry} "):
            lines[i] = line[len("ENTRY ") :]
        elif line.startswith(f"%{target} "):
            lines[i] = "ENTRY " + line
    return "\n".join(lines)


def xla_cost(text: str, platform: str = "cpu") -> Cost:
    """XLA's cost analysis of an HLO module text and its collectives' bytes (module
    docstring), every loop body counted once; by the cost analysis of `platform`'s client
    (a GPU program's library calls, such as cuBLAS matmuls, are only known to the GPU's)."""
    entry, module = parse_module(text)
    client = jax.devices(platform)[0].client
    costs = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
    seen, todo, ici, kernels = set(), [entry], 0.0, Cost()
    while todo:
        name = todo.pop()
        if name in seen or name not in module:
            continue
        seen.add(name)
        ici += sum(_collective_bytes(inst, module[name]) for inst in module[name].values())
        kernels += sum((custom_call_cost(i, module[name]) for i in module[name].values()), Cost())
        todo += [c for inst in module[name].values() for c in inst.called()]
    return Cost(costs.get("flops", 0.0), costs.get("bytes accessed", 0.0), ici) + kernels


def custom_call_cost(inst: Instruction, insts: dict[str, Instruction]) -> Cost:
    """What XLA's cost analysis leaves out of a custom call (it counts none of its FLOPs
    or bytes): the analytic cost its op_name carries (`attention_kernel.cost_scope`:
    FLOPs and bytes shared by the `calls` custom calls under that scope), else no FLOPs
    and its operands' and results' bytes, each read or written once (a floor); 0 for
    other instructions."""
    if inst.opcode != "custom-call":
        return Cost()
    tagged = _KERNEL_COST.search(inst.text)
    if tagged:
        flops, nbytes, calls = (float(x) for x in tagged.groups())
        return Cost(flops / calls, nbytes / calls)
    shapes = [inst.shape] + [insts[n].shape for n in inst.operands() if n in insts]
    return Cost(0.0, float(sum(sum(array_bytes(s)) for s in shapes)))


def _collective_bytes(inst: Instruction, insts: dict[str, Instruction]) -> float:
    """The largest array among a collective's result and operands, ×2 for an all-reduce
    (a reduce-scatter and an all-gather); 0 for other instructions."""
    factor = _COLLECTIVES.get(inst.opcode)
    if factor is None:
        return 0.0
    shapes = [inst.shape] + [insts[n].shape for n in inst.operands() if n in insts]
    return factor * max(size for s in shapes for size in [0, *array_bytes(s)])


def program_parts(text: str, dynamic_trips: Sequence[int], platform: str = "cpu") -> list[Part]:
    """The parts (`Part`) of a compiled program's HLO text: "outside loops" and each
    top-level loop. Its loops of DYNAMIC trip count, in the order the program runs them,
    run `dynamic_trips` times each; such a loop inside another one is a ValueError. Costed
    by `platform`'s cost analysis (`xla_cost`)."""
    entry, module = parse_module(text)

    @functools.cache
    def once(name: str) -> Cost:  # computation `name` as ENTRY, loops counted once
        return xla_cost(_reentered(text, entry, name), platform)

    def loops(name: str) -> list[tuple[Instruction, dict[str, Instruction]]]:
        """The while loops computation `name` runs, directly or through a call."""
        found = []
        for inst in module[name].values():
            if inst.opcode == "while":
                found.append((inst, module[name]))
            elif inst.opcode in ("call", "conditional", "async-start"):
                found += [w for c in inst.called() for w in loops(c)]
        return found

    @functools.cache
    def weighted(name: str) -> Cost:  # T(name)
        total = once(name)
        for loop, caller in loops(name):
            n = trip_count(loop, caller, module)
            if n == DYNAMIC:
                raise ValueError(f"loop {loop.name}: a data-dependent loop inside a loop")
            total += weighted(body_of(loop)) * n - once(body_of(loop)) - once(condition_of(loop))
        return total

    parts, outside, dynamic = [], once(entry), list(dynamic_trips)
    for loop, caller in loops(entry):
        outside -= once(body_of(loop)) + once(condition_of(loop))
        n = trip_count(loop, caller, module)
        if n == DYNAMIC and not dynamic:
            raise ValueError(f"more data-dependent loops than the {len(dynamic_trips)} given")
        trips = dynamic.pop(0) if n == DYNAMIC else n
        parts.append(Part(_op_name(loop), trips, weighted(body_of(loop)), n == DYNAMIC))
    if dynamic:
        raise ValueError(f"{len(dynamic)} of the {len(dynamic_trips)} data-dependent loops missing")
    return [Part("outside loops", 1, outside), *parts]


def _op_name(loop: Instruction) -> str:
    """The loop's JAX op name from its metadata (e.g. "jit(f)/while"), else its HLO name."""
    op = re.search(r'op_name="([^"]+)"', loop.text)
    return op.group(1) if op else loop.name


_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}


def byte_breakdown(text: str, per_trip_of_dynamic_loop: bool = True) -> list[tuple[str, float]]:
    """HBM bytes by op, largest first: [(label, bytes)], label = opcode and the JAX op it
    was lowered from (its op_name, wrappers such as jit(…)/jvp(…) kept, the program's
    name dropped). Each instruction outside fusions (a fusion, copy, collective, custom
    call, …) counts its operands' and results' bytes, × the trip counts of the loops it
    is in; a custom call its `custom_call_cost`. With `per_trip_of_dynamic_loop`, only
    one trip of the program's first data-dependent loop (the update's or the logprob
    pass' packed chunk); else the whole program with data-dependent loops run once.
    A per-op estimate from shapes, beside XLA's own total (`program_parts`)."""
    entry, module = parse_module(text)
    totals: dict[str, float] = {}

    def first_dynamic(name):
        for inst in module[name].values():
            if inst.opcode == "while" and trip_count(inst, module[name], module) == DYNAMIC:
                return body_of(inst)
            for c in inst.called() if inst.opcode in ("call", "conditional") else []:
                found = first_dynamic(c)
                if found:
                    return found
        return None

    def walk(name: str, weight: float) -> None:
        insts = module[name]
        for inst in insts.values():
            if inst.opcode == "while":
                n = trip_count(inst, insts, module)
                walk(body_of(inst), weight * (1 if n == DYNAMIC else n))
            elif inst.opcode in ("call", "conditional"):
                for c in inst.called():
                    walk(c, weight)
            elif inst.opcode not in _NO_TRAFFIC and not inst.opcode.endswith("-done"):
                if inst.opcode == "custom-call":
                    nbytes = custom_call_cost(inst, insts).bytes
                else:
                    shapes = [inst.shape] + [insts[n].shape for n in inst.operands() if n in insts]
                    nbytes = sum(sum(array_bytes(s)) for s in shapes)
                label = f"{inst.opcode} {_op_label(inst)}"
                totals[label] = totals.get(label, 0.0) + weight * nbytes

    root = first_dynamic(entry) if per_trip_of_dynamic_loop else None
    walk(root or entry, 1.0)
    return sorted(totals.items(), key=lambda item: -item[1])


def _op_label(inst: Instruction) -> str:
    """The op_name of an instruction without its program's jit(…) prefix, or its name."""
    op = re.search(r'op_name="([^"]+)"', inst.text)
    if not op:
        return re.sub(r"\.\d+$", "", inst.name)
    return re.sub(r"^jit\([^)]*\)/", "", op.group(1))
