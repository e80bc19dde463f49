"""The programs of one RL step, built by training's own builder, on abstract arguments.

`step_programs` takes the sampler, the logprob pass (when the step has one) and the update
from `train.jitted.build`, the function the RL loop builds them with, and lowers them on
`train.jitted.longest_inputs`: the params, optimizer state and DARO weights of the abstract
train state (ShapeDtypeStructs with their shardings: nothing allocated) and the step's
arrays at their longest (prompts of sampler.max_prompt_tokens, every completion
max_new_tokens long, so every packed chunk slot is filled). `compile_program` compiles one
and reads the compiler's numbers: `memory_analysis()` and the loop-counted costs of
`hlo_costs`. The model's architecture comes without weights (`models.architecture`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax

from daro_jax import models
from daro_jax.algo import presets
from daro_jax.plan import chips, costs
from daro_jax.train import jitted, packing
from daro_jax.train import state as train_state


def build(
    config, mesh, spec: presets.AlgoSpec, prompt_len: int | None = None, layers: int = 0
) -> jitted.StepPrograms:
    """Training's programs of `config` on `mesh` (`train.jitted.build`) for prompts of
    `prompt_len` (default sampler.max_prompt_tokens), from the model's architecture
    without its weights; with its first `layers` layers only when given (the search)."""
    cfg, tokenizer = models.architecture(config.model, layers)
    stop_ids = jitted.stop_token_ids(config.model.path, cfg, tokenizer)
    prompt_len = prompt_len or config.sampler.max_prompt_tokens
    return jitted.build(config, cfg, spec, mesh, prompt_len, stop_ids)


BREAKDOWN_ITEMS = 15  # ops listed by `python -m daro_jax.plan --verbose`


def device_bytes(tree) -> int:
    """Bytes on one device of a pytree of ShapeDtypeStructs with shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A jitted program of the RL step: `lower()` traces it on abstract arguments; it runs
    `runs` times a step, its data-dependent loops `dynamic_trips` times each, in order (the
    decode stages' steps, or the packed chunks), and `resident_args` of its argument bytes
    are resident state."""

    name: str
    runs: int
    lower: functools.partial
    dynamic_trips: tuple[int, ...]
    resident_args: int


def step_programs(config, p: jitted.StepPrograms, mesh) -> list[StepProgram]:
    """The sampler, the logprob passes (old policy when a step makes several updates, the
    reference when kl_beta > 0; one program) and the update of `p` on their longest
    inputs (module docstring), with how often each runs in a step. With LoRA the programs
    take the frozen base beside the state, as training does."""
    t, k = config.train, p.settings.spec.k
    inputs = jitted.longest_inputs(p, config, mesh)
    params_bytes = device_bytes(inputs["sampler"][0][0])

    def lower(name, fn):
        args, kwargs = inputs[name]
        return functools.partial(fn.lower, *args, **kwargs)

    # No row stops early: the first row stage's loops run all N − 1 steps, the others none.
    stages = p.sample.decode_trips(t.batch_prompts * k)
    programs = [StepProgram("sampler", 1, lower("sampler", p.sample.jitted), stages, params_bytes)]
    if p.passes:
        chunks = (packing.chunk_slots(t.batch_prompts // p.blocks, k, p.block_rows),)
        logprobs = lower("logprob pass", p.logprobs)
        programs.append(StepProgram("logprob pass", len(p.passes), logprobs, chunks, params_bytes))
    per = t.batch_prompts // t.minibatches
    chunks = (packing.chunk_slots(per // p.blocks, k, p.block_rows),)
    updates = train_state.updates_per_step(t)
    state_bytes = device_bytes(p.abstract) + device_bytes(p.base)
    programs.append(StepProgram("update", updates, lower("update", p.update), chunks, state_bytes))
    return programs


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program: its per-device memory (bytes), compile seconds on this machine,
    runs per step, resident state it does not take as arguments, and its parts; or, when
    the compiler refused it for want of HBM, its message (`error`), the temp bytes it named
    and no parts."""

    name: str
    runs: int
    compile_s: float
    memory: dict[str, int]
    resident_elsewhere: int
    parts: tuple[costs.Part, ...]
    error: str = ""
    breakdown: tuple[tuple[str, float], ...] = ()  # top HBM bytes by op, `costs.byte_breakdown`

    @property
    def peak(self) -> int:
        """Arguments + outputs − aliased + temp + code, + the resident state elsewhere."""
        m = self.memory
        used = m["arguments"] + m["outputs"] - m["aliased"] + m["temp"] + m["code"]
        return used + self.resident_elsewhere

    def seconds(self, chip: chips.Chip, dynamic: bool | None = None) -> float:
        """One run's roofline time (module docstring); only the parts with (True) or
        without (False) a data-dependent trip count when `dynamic` is given."""
        return sum(
            part.trips * chips.roofline(part.per_trip, chip)
            for part in self.parts
            if dynamic is None or part.dynamic == dynamic
        )

    def total(self) -> costs.Cost:
        return sum((part.total for part in self.parts), costs.Cost())


def compile_program(program: StepProgram, resident: int) -> Compiled:
    """Compile `program` for its topology and read the compiler's numbers."""
    start = time.perf_counter()
    elsewhere = resident - program.resident_args
    try:
        compiled = program.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
        if not need:
            raise
        temp = int(float(need.group(1)) * 1024 ** ("KMGT".index(need.group(2)) + 1))
        args = device_bytes(program.lower.args)
        memory = {"arguments": args, "outputs": 0, "aliased": 0, "temp": temp, "code": 0}
        seconds, message = time.perf_counter() - start, str(e).strip().splitlines()[-1]
        return Compiled(program.name, program.runs, seconds, memory, elsewhere, (), message)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
    }
    text = compiled.as_text()
    parts = costs.program_parts(text, program.dynamic_trips)
    top = tuple(costs.byte_breakdown(text)[:BREAKDOWN_ITEMS])
    return Compiled(program.name, program.runs, seconds, memory, elsewhere, tuple(parts), "", top)
