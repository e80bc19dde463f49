"""The programs of one RL step, built as the RL loop builds them, on abstract arguments.

`step_programs` returns the sampler (`rollout.make_sampler`), the old-policy/reference
logprob pass (`train.update.jit_logprobs`, when the step has one) and the update
(`train.update.jit_update`), each ready to lower with ShapeDtypeStructs that carry their
shardings on a mesh: the params, optimizer state and DARO weights of
`train.state.abstract_state` (`jax.eval_shape`: nothing allocated) and the step's arrays
at their longest (prompts of sampler.max_prompt_tokens, every completion max_new_tokens
long, so every packed chunk slot is filled). `compile_program` compiles one and reads the
compiler's numbers: `memory_analysis()` and the loop-counted costs of `hlo_costs`. The
model's architecture comes from config.json without weights; the paper's models are in
`KNOWN_HF_CONFIGS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from daro_jax import hosts, sharding
from daro_jax.algo import presets
from daro_jax.models import lora, packed
from daro_jax.models import model as model_io
from daro_jax.models.config import ModelConfig
from daro_jax.plan import chips, costs
from daro_jax.train import packing, rollout, update
from daro_jax.train import state as train_state

# config.json fields of the paper's models (huggingface.co/<id>/blob/main/config.json).
_QWEN25_MATH = dict(
    model_type="qwen2",
    hidden_act="silu",
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151643,
    use_sliding_window=False,
)
KNOWN_HF_CONFIGS = {
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_MATH
    | dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-Math-7B": _QWEN25_MATH
    | dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        hidden_act="silu",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        attention_bias=False,
        mlp_bias=False,
    ),
}


def model_config(config) -> ModelConfig:
    """The decoder config of `config.model`, from config.json without loading weights (the
    paper's models from KNOWN_HF_CONFIGS, so that their plans work offline), with its LoRA
    adapters (the base then in the compute dtype, as `models.from_config` loads it)."""
    m = config.model
    overrides = m.arch_overrides.to_dict()
    path = m.path
    if path in KNOWN_HF_CONFIGS and not os.path.exists(path):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(KNOWN_HF_CONFIGS[path], f)
            hf = model_io._hf_config(folder, overrides)
    else:
        local = path == model_io.SMOLLM2_ALIAS or os.path.exists(path)
        hf = model_io._hf_config(model_io._resolve(path) if local else path, overrides)
    param_dtype = m.dtype if m.lora.rank else m.param_dtype
    cfg = ModelConfig.from_hf(hf, dtype=m.dtype, param_dtype=param_dtype)
    return lora.configure(cfg, m.lora).replace(remat=bool(m.remat))


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


def step_programs(config, cfg: ModelConfig, spec: presets.AlgoSpec, mesh, state) -> list:
    """The sampler, the logprob pass (old policy when a step makes several updates, and the
    reference when kl_beta > 0) and the update, as `train.loop.build` builds them, for the
    longest step of `config` (module docstring). With LoRA the programs take the frozen
    base (`train.state.abstract_base`) beside the state, as training does."""
    t, s = config.train, config.sampler
    b, k, p, n = t.batch_prompts, spec.k, s.max_prompt_tokens, s.max_new_tokens
    blocks, rows = sharding.prompt_blocks(b // t.minibatches, t.prompt_blocks, mesh), t.block_rows
    updates = train_state.updates_per_step(t)
    base = train_state.abstract_base(cfg, mesh)
    params = lora.combine(base, state["params"]["model"])
    params_bytes = device_bytes(params)
    sample = rollout.make_sampler(s, cfg, k, p, cfg.eos_token_ids, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    prompts = _rows((b, p), jnp.int32, mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    lower = functools.partial(sample.jitted.lower, params, prompts, prompts, key)
    # No row stops early: the first decode stage runs all N − 1 steps, the others none.
    stages = (n - 1,) + (0,) * (len(sample.stage_sizes(b * k)) - 1)
    programs = [StepProgram("sampler", 1, lower, stages, params_bytes)]
    frozen = tuple(config.optim.frozen)
    settings = update.UpdateSettings(
        cfg, spec, float(s.temperature), on_policy=updates == 1, frozen=frozen
    )
    passes = (updates > 1) + (spec.kl_beta > 0)
    if passes:
        packed = _packed(b, k, p, n, blocks, rows, mesh)
        lower = functools.partial(update.jit_logprobs(mesh).lower, params, packed, s=settings)
        dynamic = (packing.chunk_slots(b // blocks, k, rows),)
        programs.append(StepProgram("logprob pass", passes, lower, dynamic, params_bytes))
    per = b // t.minibatches
    batch = _packed(per, k, p, n, blocks, rows, mesh)
    names = ("loss_mask", "sampler_logp", "sampler_logp_full", "old_logp")
    for name in names + ("ref_logp",) * (spec.kl_beta > 0):
        batch[name] = _rows((per * k, n), jnp.float32, mesh)
    batch |= {"advantages": _rows((per * k,), jnp.float32, mesh)}
    batch |= {"group_ids": _rows((per * k,), jnp.int32, mesh)}
    tx = train_state.optimizer(config, state["params"], spec)
    jitted = update.jit_update(mesh, train_state.shardings(state))
    lower = functools.partial(jitted.lower, state, batch, tx=tx, s=settings, base=base)
    dynamic = (packing.chunk_slots(per // blocks, k, rows),)
    resident = device_bytes(state) + device_bytes(base)
    programs.append(StepProgram("update", updates, lower, dynamic, resident))
    return programs


def _rows(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    """An abstract array with its rows over the mesh's batch shards (`hosts.to_global`)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=hosts.batch_sharding(mesh, shape))


def _packed(b, k, p, n, blocks, rows, mesh) -> dict:
    """The packed arrays of b prompts (`train.update.packed_batch`) with every chunk slot
    filled: prompt tokens and mask [b, P], chunk arrays [G, S, R, N], n_chunks."""
    slots = packing.chunk_slots(b // blocks, k, rows)
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {name: _rows((b, p), jnp.int32, mesh) for name in ("prompt_tokens", "prompt_mask")}
    out |= {name: _rows((blocks, slots, rows, n), jnp.int32, mesh) for name in packed.CHUNK_INPUTS}
    out["n_chunks"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return out


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
    parts = costs.program_parts(compiled.as_text(), program.dynamic_trips)
    return Compiled(program.name, program.runs, seconds, memory, elsewhere, tuple(parts))
