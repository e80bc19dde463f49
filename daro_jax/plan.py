"""The memory plan: per-device HBM bytes of a recipe on its TPU type, nothing allocated.

    python -m daro_jax.plan --config=configs/X.py [--config.a.b=v ...]

Out-of-memory is the most common failure of RL runs, so before renting a pod this prints,
for one device of the mesh `config.mesh.shape` laid over the chips of
`config.tpu.accelerator`, what a run of `daro_jax.trainer` holds:

resident for the whole run
    params            `jax.eval_shape` of the decoder's init in `model.param_dtype`, each
                      leaf's shard shape under its logical-axis NamedSharding
    optimizer state   `jax.eval_shape` of the optax init (`optim.make_optimizer`); every
                      moment has its parameter's sharding, counters are replicated
    DARO weights      [K − 1] float32, replicated
    reference model   a second copy of the params when algo.kl_beta > 0 (the GRPO preset)
sampling: prefill (the B prompts once)
    prompt cache      k and v of [L, B, KV, P, Dh], twice: the layer scan's input and output
    layer forward     one layer's forward working set (below) on the [B, P] prompts
    gathered weights  one layer's weights all-gathered over fsdp, in the compute dtype
sampling: decode (the B·K rollouts, one token at a time)
    KV cache          k and v of [L, B·K, KV, P + N, Dh] in the compute dtype, rows over
                      data × fsdp (decoder.CACHE_LOGICAL_AXES), held 2 + 1.5/L times: the
                      sampler's decode step scans the stacked layers with the cache as the
                      scan's input and output inside a while loop, so XLA keeps the loop
                      carry and the scan output (and per-layer slices). Measured: the
                      compiled sampler's temp bytes grow by 2.375 × the cache for L = 4 and
                      2.19 × for L = 8 (XLA:CPU with the accelerator path forced; the CPU
                      path, models/decode.py, holds less: the prompt part once per prompt,
                      [B, KV, P, Dh], beside [B·K, KV, N, Dh])
    logits            [B·K, V] float32 ×4 (logits, scaled, exp, block sums)
    gathered weights  as in the prefill
update (one optimizer update on a minibatch of b = B / train.minibatches prompts,
        trainer.update_gradients: the b prompts [b, P] are forwarded once under jax.vjp,
        in G blocks of g = b / G (G, R = sharding.update_blocks); then a loop over
        micro-batches of R packed rows of N positions per block, [G, R, N], accumulates
        each one's gradient; then the prompts' part is pulled back through their forward.
        Sized for the worst step, every completion N tokens long and one per row, so all
        S = ⌈g·K / R⌉ slots of the packed arrays are filled), two phases:
  update: micro-batch loop
    gradients         the float32 accumulator of the params + one micro-batch's gradient
                      (param dtype)
    gathered weights  the largest weight block used at once (one layer, or the output matrix
                      for the logprob chunks), all-gathered over fsdp, in the compute dtype,
                      plus its unsharded float32 gradient before the reduce-scatter
    prompts' residuals  what the prompts' forward keeps for the pull-back: with remat the L
                      saved layer inputs b × P × D; without, L layers' working sets (below)
                      on the [b, P] prompts
    prompt caches     k and v of [L, G, KV, g·P, Dh] (a block's g prompts side by side) and
                      the last hidden states [G, g, D], in the compute dtype; and the loop's
                      float32 accumulators of their cotangents, of the same shapes
    micro-batch cache k and v of [L, G·R, KV, g·P + N, Dh] (each block's cache repeated for
                      its R rows, with room for them) and its cotangent, in the compute dtype
    activations       with remat the L saved layer inputs G·R × N × D; without, L layers'
                      working sets (below)
    layer working set recompute and backward of one layer: 3 × the float32 attention scores
                      G·R × H × pairs, 6 × the MLP intermediates G·R × N × F, 4 × float32
                      q/k/v (rope), 10 × the residual stream G·R × N × D, the bool mask
                      G·R × N × (g·P + N). pairs = `causal_pairs`(N, g·P): the queries of
                      decoder._causal_attention in blocks of max(64, ⌈N/8⌉) rows, each block
                      scoring the keys up to its own last one, about N × (g·P + N/2)
    logprob chunk     3 × the float32 logits of G·R rows × min(128, N) positions × V
    per-token arrays  the loss on the rollout layout (trainer.to_rows): [b·K, N] float32 ×8
                      (the micro-batch's logp, entropy and mask scattered there, the loss's
                      terms, their gradients) and 2 unsharded [b·K·N] 4-byte buffers of the
                      differentiated scatter
    batch arrays      the update's arguments: prompt tokens and mask [b, P] int32, chunk
                      tokens, segments and offsets [G, S, R, N] int32, n_chunks, loss_mask
                      and sampler_logp [b·K, N] float32 (+ old_logp off-policy, when
                      ppo_epochs × minibatches > 1; + ref_logp when kl_beta > 0), advantages
                      [b·K] float32 and group_ids [b·K] int32
  update: prompts' backward (after the loop)
    gradients         the float32 accumulator + the prompts' gradient (param dtype)
    gathered weights, prompts' residuals, batch arrays: as in the loop
    cache cotangent   k and v of [L, G, KV, g·P, Dh] in the compute dtype, twice: side by side
                      per block, and per prompt [L, b, KV, P, Dh]
    layer working set recompute and backward of one layer (as above) on the [b, P] prompts,
                      pairs = `causal_pairs`(P, 0)

Every activation is sized by its shard shape under the same logical-axis rules as the
arrays of the run (`sharding.logical_spec`, as `sharding.constrain` pins them when the
update is traced under `sharding.use_mesh`), so a micro-batch of G·R rows that the data ×
fsdp shards do not divide counts whole on every device, exactly as the run would replicate
it (and so do prompt blocks when G is not a multiple of the shards).
P = sampler.max_prompt_tokens and N = sampler.max_new_tokens (the longest step). With
several minibatches the step's own per-rollout arrays ([B·K, N] float32 ×3, a few MiB) stay
alive beside the update's; they are not counted. The old-policy and reference logprob
passes (trainer.batch_logprobs) run forward only over the whole step's packed arrays: the
same G blocks with B / G prompts each, so longer block caches and keys, but no gradients,
residuals or cotangents; by the same formulas they come to about 0.6–0.75 × the update's
phase for the paper recipes, so they are not a phase of their own.

Checked on XLA:CPU (tests/test_plan.py): params and optimizer bytes equal the real arrays',
the update's argument bytes equal the state's plus its batch arrays, and the larger update
phase came to 1.07–1.30 × the compiled update's temp bytes where the caches and attention
dominate (4 layers, V = 512; g = 2 or 4 prompts per block, one block per device, R = 1 or
2, remat on and off), 1.54–1.58 × for configs/tiny.py (its 49k vocabulary dominates; 4
blocks replicated over 8 devices, where XLA computes the logits from the fsdp-sharded
output matrix instead of gathering it) and 0.77–0.78 × for tiny with one block per device
(XLA:CPU also keeps a transposed copy of the tied embedding); the decode phase came to
about 1.0 × the compiled sampler's. No TPU measurement has been made.

peak = resident + the largest phase; the verdict is "fits" when the peak is at most
(1 − RESERVE) of the chip's HBM (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB), leaving
RESERVE for XLA's own buffers and fragmentation.

The model's architecture comes from config.json: a local checkpoint directory, the .gguf
file or the SmolLM2 alias, read by the loader's own code; the three paper models are in
`KNOWN_HF_CONFIGS`, so their plans work offline; any other hub id fetches config.json only
(never weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from daro_jax import losses, optim, packing, sharding
from daro_jax.models import decoder
from daro_jax.models import model as model_io
from daro_jax.models.config import ModelConfig

GIB = 1 << 30
RESERVE = 0.10  # share of HBM kept free for XLA's own buffers and fragmentation
LOGPROB_CHUNK = 128  # positions per chunk in decoder.token_logprobs
PER_TOKEN_ARRAYS = 8  # [b·K, N] float32 arrays of one micro-batch's loss (module docstring)


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    """A TPU generation: HBM per chip and how many TensorCores the type's number counts."""

    hbm_gib: float
    cores_per_chip: int  # v4-16 names 16 TensorCores = 8 chips; v5e-8 names 8 chips


TPU_FAMILIES = {
    "v4": TpuFamily(32.0, 2),
    "v5p": TpuFamily(95.0, 2),
    "v5e": TpuFamily(16.0, 1),
    "v5litepod": TpuFamily(16.0, 1),
    "v6e": TpuFamily(32.0, 1),
}

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


# ---------------------------------------------------------------------------------------
# Inputs: TPU type, mesh, model architecture.


def tpu_chips(accelerator: str) -> tuple[int, float]:
    """(chips, HBM GiB per chip) of a TPU type such as "v4-16" (8 chips) or "v5e-8"."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", str(accelerator))
    family = TPU_FAMILIES.get(match.group(1)) if match else None
    if family is None:
        known = ", ".join(f"{name}-N" for name in TPU_FAMILIES)
        raise ValueError(
            f"config.tpu.accelerator={accelerator!r} is not a TPU type the plan knows; "
            f"use one of {known} (e.g. v4-16, v5p-64, v5e-8)."
        )
    cores = int(match.group(2))
    if cores < family.cores_per_chip or cores % family.cores_per_chip:
        raise ValueError(
            f"config.tpu.accelerator={accelerator!r}: {match.group(1)} types count "
            f"{family.cores_per_chip} TensorCores per chip, so N must be a multiple of "
            f"{family.cores_per_chip}."
        )
    return cores // family.cores_per_chip, family.hbm_gib


def abstract_mesh(shape, devices: int) -> AbstractMesh:
    """The ("data", "fsdp", "tensor") mesh of `shape` (one −1 allowed) over `devices`."""
    shape = [int(s) for s in shape]
    if len(shape) != len(sharding.MESH_AXES) or shape.count(-1) > 1:
        raise ValueError(
            f"config.mesh.shape={tuple(shape)} needs 3 sizes for {sharding.MESH_AXES}, "
            "at most one of them −1."
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape and known > 0 and devices % known == 0:
        shape[shape.index(-1)] = devices // known
    if any(s < 1 for s in shape) or math.prod(shape) != devices:
        raise ValueError(
            f"config.mesh.shape={tuple(shape)} does not lay out the {devices} chips of "
            "config.tpu.accelerator; make the sizes multiply to the chip count (or use −1)."
        )
    return AbstractMesh(tuple(shape), sharding.MESH_AXES)


def model_config(config) -> ModelConfig:
    """The decoder config of `config.model`, from config.json without loading weights."""
    m = config.model
    overrides = m.arch_overrides.to_dict()
    path = m.path
    local = path == model_io.SMOLLM2_ALIAS or os.path.exists(path)
    if local:
        hf = model_io._hf_config(model_io._resolve(path), overrides)
    elif path in KNOWN_HF_CONFIGS:
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(KNOWN_HF_CONFIGS[path], f)
            hf = model_io._hf_config(folder, overrides)
    else:
        try:
            hf = model_io._hf_config(path, overrides)
        except OSError as e:
            raise FileNotFoundError(
                f"config.model.path={path!r}: no local checkpoint there and its config.json "
                f"could not be fetched ({type(e).__name__}); point it at a directory holding "
                f"config.json, or use one of {sorted(KNOWN_HF_CONFIGS)}."
            ) from e
    cfg = ModelConfig.from_hf(hf, dtype=m.dtype, param_dtype=m.param_dtype)
    return cfg.replace(remat=bool(m.remat))


# ---------------------------------------------------------------------------------------
# Bytes per device.


def shard_bytes(names, shape, dtype, mesh) -> int:
    """Bytes on one device of an array of `shape` with logical axis `names` on `mesh`."""
    spec = sharding.logical_spec(names, shape, mesh)
    local = NamedSharding(mesh, spec).shard_shape(tuple(shape))
    return math.prod(local) * jnp.dtype(dtype).itemsize


def causal_pairs(t: int, offset: int) -> int:
    """Query-key pairs per row and head of `decoder._causal_attention` on t queries after
    `offset` cached slots: the queries in blocks of max(64, ⌈t/8⌉) rows, each reading the
    keys up to its last row, Σ_blocks rows × (offset + end of the block)."""
    block = max(64, -(-t // 8))
    return sum((min(i + block, t) - i) * (offset + min(i + block, t)) for i in range(0, t, block))


@dataclasses.dataclass(frozen=True)
class Activations:
    """Per-device activation bytes of one layer on b rows × t queries × s keys."""

    scores: int  # float32 attention scores [b, H, t, s] (or [b, H, pairs], `causal_pairs`)
    mlp: int  # one MLP intermediate [b, t, F] in the compute dtype
    qkv: int  # float32 q + k + v [b, t, H + 2 KV, Dh] (rope runs in float32)
    stream: int  # one residual-stream tensor [b, t, D] in the compute dtype
    mask: int  # the [b, t, s] bool attention mask

    @classmethod
    def of(
        cls, cfg: ModelConfig, rows: int, t: int, s: int, mesh, pairs: int | None = None
    ) -> Activations:
        """`pairs`: the query-key pairs each row and head scores, t × s when None."""
        dt = cfg.compute_dtype
        heads = cfg.num_heads + 2 * cfg.num_kv_heads
        pairs = t * s if pairs is None else pairs
        return cls(
            scores=shard_bytes(
                ("batch", "heads", None), (rows, cfg.num_heads, pairs), jnp.float32, mesh
            ),
            mlp=shard_bytes(("batch", "length", "mlp"), (rows, t, cfg.intermediate_size), dt, mesh),
            qkv=shard_bytes(
                ("batch", "length", "heads", "head_dim"),
                (rows, t, heads, cfg.head_dim),
                jnp.float32,
                mesh,
            ),
            stream=shard_bytes(("batch", "length", "embed"), (rows, t, cfg.hidden_size), dt, mesh),
            mask=shard_bytes(("batch", "length", None), (rows, t, s), jnp.bool_, mesh),
        )

    def forward(self) -> int:
        """One layer's forward: scores and probabilities, gate/up/act, q/k/v, the stream."""
        return 2 * self.scores + 3 * self.mlp + 2 * self.qkv + 4 * self.stream + self.mask

    def backward(self) -> int:
        """One layer's recomputed forward and its backward (module docstring)."""
        return 3 * self.scores + 6 * self.mlp + 4 * self.qkv + 10 * self.stream + self.mask


@dataclasses.dataclass(frozen=True)
class Plan:
    """The per-device bytes of a run (module docstring): `resident` for the whole run, and
    `phases`, each a table of what one step holds at once on top of it."""

    title: str
    accelerator: str
    chips: int
    hbm_bytes: int
    mesh_shape: dict
    resident: dict[str, int]
    phases: dict[str, dict[str, int]]
    notes: tuple[str, ...]

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + sum(self.phases[self.peak_phase].values())

    @property
    def usable_bytes(self) -> int:
        return int(self.hbm_bytes * (1 - RESERVE))

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable_bytes

    def format(self) -> str:
        """The table the CLI prints."""
        tables = {"resident": self.resident, **self.phases}
        width = max(len(name) for table in tables.values() for name in table) + 2
        mesh = " × ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"memory plan: {self.title}",
            f"TPU {self.accelerator}: {self.chips} chips × {_gib(self.hbm_bytes)} HBM; "
            f"mesh {mesh}; bytes per device",
            *self.notes,
        ]
        for title, table in tables.items():
            lines.append(title)
            lines += [f"  {name:<{width}} {_gib(n):>10}" for name, n in table.items()]
            lines.append(f"  {'= ' + title:<{width}} {_gib(sum(table.values())):>10}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines += [
            f"peak = resident + {self.peak_phase}: {_gib(self.peak)} of "
            f"{_gib(self.hbm_bytes)} HBM ({100 * self.peak / self.hbm_bytes:.0f}%); usable "
            f"{_gib(self.usable_bytes)} after a {RESERVE:.0%} reserve",
            f"verdict: {verdict} on {self.accelerator}, headroom "
            f"{_gib(self.usable_bytes - self.peak)}",
        ]
        return "\n".join(lines)


def _gib(n: int) -> str:
    """Bytes in GiB, or MiB / KiB for small amounts; "-" for none."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n} B" if n else "-"


def train_state(config, cfg: ModelConfig, spec: losses.AlgoSpec, mesh) -> dict:
    """The trainer's {"params": {"model", "daro"}, "opt"} as ShapeDtypeStructs carrying their
    shardings on `mesh` (abstract or concrete): params by the decoder's logical axes, the
    DARO weights replicated, the optimizer state by `optim.mirror_shardings`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
    state = {"model": params, "daro": jax.eval_shape(lambda: losses.init_daro_weights(spec))}
    shardings = {
        "model": sharding.tree_shardings(
            decoder.param_logical_axes(cfg), decoder.param_shapes(cfg), mesh
        ),
        "daro": replicated,
    }
    t = config.train
    tx = optim.make_optimizer(config.optim, state, t.steps * t.ppo_epochs * t.minibatches, spec)
    opt_state = jax.eval_shape(tx.init, state)
    tree = {"params": state, "opt": opt_state}
    shardings = {
        "params": shardings,
        "opt": optim.mirror_shardings(opt_state, state, shardings, replicated),
    }
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def device_bytes(tree, dtype=None) -> int:
    """Bytes on one device of a pytree of ShapeDtypeStructs with shardings (in `dtype` when
    given, else each leaf's own)."""
    sizes = [
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    ]
    return int(sum(sizes))


def make_plan(config, cfg: ModelConfig | None = None, title: str = "") -> Plan:
    """The memory plan of `config` on config.tpu.accelerator (`cfg`: its decoder config,
    read from config.model when None)."""
    chips, hbm_gib = tpu_chips(config.tpu.accelerator)
    mesh = abstract_mesh(config.mesh.shape, chips)
    cfg = model_config(config) if cfg is None else cfg
    spec = losses.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    state = train_state(config, cfg, spec, mesh)
    model_bytes = device_bytes(state["params"]["model"])
    resident = {
        f"params ({cfg.param_dtype})": model_bytes,
        "optimizer state": device_bytes(state["opt"]),
        "DARO weights": device_bytes(state["params"]["daro"]),
        f"reference model (kl_beta={spec.kl_beta:g})": model_bytes if spec.kl_beta > 0 else 0,
    }
    t, s = config.train, config.sampler
    b, k, p, n = t.batch_prompts, spec.k, s.max_prompt_tokens, s.max_new_tokens
    per = b // t.minibatches
    blocks, r = sharding.update_blocks(t, mesh)
    gathered = _gathered_weights(cfg, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    notes = [
        f"model: {cfg.num_layers} layers, D={cfg.hidden_size}, F={cfg.intermediate_size}, "
        f"H={cfg.num_heads}, KV={cfg.num_kv_heads}, V={cfg.vocab_size}; "
        f"{_count(state['params']['model']) / 1e9:.2f} B params; "
        f"compute {cfg.dtype}, remat {'on' if cfg.remat else 'off'}",
        f"step: B={b} prompts × K={k}; P={p} prompt + N={n} new tokens; an update of b={per} "
        f"prompts in G={blocks} blocks of g={per // blocks}, micro-batches of G×R = "
        f"{blocks}×{r} packed rows (at most S={packing.chunk_slots(per // blocks, k, r)})",
    ]
    if (blocks * r) % shards:
        step = math.lcm(blocks, shards)
        notes.append(
            f"warning: the micro-batch of {blocks * r} packed rows is not divisible by the "
            f"{shards} data × fsdp shards, so every device holds (and computes) all of it; "
            f"make train.prompt_blocks × train.block_rows a multiple of {step}."
        )
    return Plan(
        title=title or str(config.model.path),
        accelerator=str(config.tpu.accelerator),
        chips=chips,
        hbm_bytes=int(hbm_gib * GIB),
        mesh_shape=dict(mesh.shape),
        resident=resident,
        phases={
            **_sampling(cfg, b, k, p, n, gathered, mesh),
            **_update(cfg, state, config, spec, gathered, mesh),
        },
        notes=tuple(notes),
    )


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _sampling(cfg: ModelConfig, b, k, p, n, gathered, mesh) -> dict[str, dict[str, int]]:
    """Rollouts of B prompts of P tokens, K samples of N new tokens each: the prefill, then
    the decode loop, which holds the cache `decode_cache_copies` times (module docstring)."""
    dt = cfg.compute_dtype
    kv = (cfg.num_layers, b * k, cfg.num_kv_heads, p + n, cfg.head_dim)
    prompt_kv = (cfg.num_layers, b, cfg.num_kv_heads, p, cfg.head_dim)
    cache = 2 * shard_bytes(decoder.CACHE_LOGICAL_AXES, kv, dt, mesh)
    logits = shard_bytes(("batch", None), (b * k, cfg.vocab_size), jnp.float32, mesh)
    extra = decode_cache_copies(cfg.num_layers) - 1
    return {
        "sampling: prefill": {
            "prompt cache k, v ×2 (layer scan in, out)": 2
            * 2
            * shard_bytes(decoder.CACHE_LOGICAL_AXES, prompt_kv, dt, mesh),
            "one layer's forward on the prompts": Activations.of(cfg, b, p, p, mesh).forward(),
            "gathered layer weights": gathered["layer"],
        },
        "sampling: decode": {
            f"KV cache k, v {list(kv)}": cache,
            f"its copies in the decode loop (×{extra:.2f})": int(extra * cache),
            "logits ×4 (logits, scaled, exp, blocks)": 4 * logits,
            "gathered layer weights": gathered["layer"],
        },
    }


def decode_cache_copies(layers: int) -> float:
    """KV caches alive at once in the sampler's decode loop with stacked layers (the
    accelerator path): 2 + 1.5/L, fitted to XLA's compiled temp bytes (module docstring)."""
    return 2.0 + 1.5 / layers


def _update(cfg: ModelConfig, state, config, spec, gathered, mesh) -> dict[str, dict[str, int]]:
    """The update of one minibatch of b prompts (trainer.update_gradients) at its two
    moments: inside the loop over the packed micro-batches [G, R, N], and the pull-back
    through the prompts' forward after it. Every term, its shape and its formula are in the
    module docstring."""
    t, smp = config.train, config.sampler
    b, k = t.batch_prompts // t.minibatches, spec.k
    p, n = smp.max_prompt_tokens, smp.max_new_tokens
    blocks, r = sharding.update_blocks(t, mesh)
    if b % blocks or r < 1:
        raise ValueError(
            f"train.prompt_blocks={blocks} must divide the {b} prompts of a minibatch, and "
            f"train.block_rows={r} must be ≥ 1."
        )
    g = b // blocks
    rows, keys, layers = blocks * r, g * p + n, cfg.num_layers
    dt, f32 = cfg.compute_dtype, jnp.float32
    block_kv = (layers, blocks, cfg.num_kv_heads, g * p, cfg.head_dim)
    chunk_kv = (layers, rows, cfg.num_kv_heads, keys, cfg.head_dim)

    def cache_bytes(shape, dtype):  # k and v
        return 2 * shard_bytes(decoder.CACHE_LOGICAL_AXES, shape, dtype, mesh)

    def last_hidden(dtype):
        return shard_bytes(("batch", None, "embed"), (blocks, g, cfg.hidden_size), dtype, mesh)

    chunk_act = Activations.of(cfg, rows, n, keys, mesh, causal_pairs(n, g * p))
    prompt_act = Activations.of(cfg, b, p, p, mesh, causal_pairs(p, 0))
    if cfg.remat:
        residuals = ("prompts' residuals: saved layer inputs (remat)", prompt_act.stream)
        saved = ("micro-batch activations: saved layer inputs (remat)", chunk_act.stream)
    else:
        residuals = ("prompts' residuals: all layers (no remat)", prompt_act.backward())
        saved = ("micro-batch activations: all layers (no remat)", chunk_act.backward())
    chunk = min(LOGPROB_CHUNK, n)
    logits = shard_bytes(("batch", None, "vocab"), (rows, chunk, cfg.vocab_size), f32, mesh)
    per_token = shard_bytes(("batch", None), (b * k, n), f32, mesh)
    scatter = shard_bytes((None,), (b * k * n,), f32, mesh)  # unsharded
    loss_arrays = PER_TOKEN_ARRAYS * per_token + 2 * scatter
    on_policy = t.ppo_epochs * t.minibatches == 1
    batch = 2 * shard_bytes(("batch", None), (b, p), jnp.int32, mesh)
    slots = packing.chunk_slots(g, k, r)
    batch += 3 * shard_bytes(("batch", None, None, None), (blocks, slots, r, n), jnp.int32, mesh)
    batch += shard_bytes((), (), jnp.int32, mesh)  # n_chunks
    batch += (2 + (not on_policy) + (spec.kl_beta > 0)) * per_token
    batch += shard_bytes(("batch",), (b * k,), f32, mesh) + shard_bytes(
        ("batch",), (b * k,), jnp.int32, mesh
    )
    gradients = device_bytes(state["params"], f32) + device_bytes(state["params"])
    weights = max(gathered["layer"], gathered["output"]) + gathered["f32 grad"]
    loop = {
        "gradients: float32 accumulator + one micro-batch's": gradients,
        "gathered weights + their gradient": weights,
        residuals[0]: layers * residuals[1],
        f"prompt caches k, v {list(block_kv)} + last hidden": cache_bytes(block_kv, dt)
        + last_hidden(dt),
        "their float32 cotangent accumulators": cache_bytes(block_kv, f32) + last_hidden(f32),
        f"micro-batch cache k, v {list(chunk_kv)} + its cotangent": 2 * cache_bytes(chunk_kv, dt),
        saved[0]: layers * saved[1],
        "one layer's working set (micro-batch)": chunk_act.backward(),
        f"logprob chunk ×3 ({chunk} positions × V)": 3 * logits,
        f"per-token loss arrays [b·K, N] ×{PER_TOKEN_ARRAYS} + scatters ×2": loss_arrays,
        "batch arrays": batch,
    }
    pull_back = {
        "gradients: float32 accumulator + the prompts'": gradients,
        "gathered weights + their gradient": weights,
        residuals[0]: layers * residuals[1],
        "prompt caches' cotangent ×2 (blocks, prompts)": 2 * cache_bytes(block_kv, dt),
        "one layer's working set (prompts)": prompt_act.backward(),
        "batch arrays": batch,
    }
    return {"update: micro-batch loop": loop, "update: prompts' backward": pull_back}


def _gathered_weights(cfg: ModelConfig, mesh) -> dict[str, int]:
    """Per-device bytes of weights all-gathered over data × fsdp for use (tensor sharding
    kept): "layer" (one decoder layer) and "output" (the [D, V] output matrix) in the compute
    dtype, and "f32 grad", the larger of the two in float32 (its gradient before the
    reduce-scatter)."""
    gathered = AbstractMesh((1, 1, mesh.shape["tensor"]), sharding.MESH_AXES)
    shapes = decoder.param_shapes(cfg)["layers"]
    axes = decoder.param_logical_axes(cfg)["layers"]

    def sizes(dtype) -> tuple[int, int]:
        layer = sum(shard_bytes(axes[w][1:], shapes[w][1:], dtype, gathered) for w in shapes)
        output = (cfg.hidden_size, cfg.vocab_size)
        return layer, shard_bytes(("embed", "vocab"), output, dtype, gathered)

    layer, output = sizes(cfg.compute_dtype)
    return {"layer": layer, "output": output, "f32 grad": max(sizes(jnp.float32))}


# ---------------------------------------------------------------------------------------
# CLI.


def main() -> None:
    """`python -m daro_jax.plan --config=configs/X.py [--config.a.b=v]`: print the plan;
    exit status 0 whether or not it fits (the verdict is in the output). The flags are
    defined here, not at import, so that importing this module next to daro_jax.main does
    not define --config twice. A local model.path is made absolute first (`cli`)."""
    from absl import app, flags
    from ml_collections import config_flags

    from daro_jax import cli

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Recipe file with get_config().", lock_config=True
    )

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if config_flag.value is None:
            raise app.UsageError("--config=configs/<recipe>.py is required.")
        config = cli.with_local_paths(config_flag.value)
        print(make_plan(config, title=flags.FLAGS["config"].config_filename).format())

    cli.run(run)


if __name__ == "__main__":
    main()
