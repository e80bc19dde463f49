"""One decoder layer as Flax linen modules (Llama 3.x, Qwen2/2.5, SmolLM2).

    h = x + Attn(RMSNorm(x));   y = h + W_down(silu(W_gate n) ⊙ W_up n),   n = RMSNorm(h)

RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + eps), statistics in float32. Attention is
grouped-query (H query heads, KV key/value heads, G = H / KV queries per key/value head)
with rotary position embeddings in HF's rotate-half layout. Every weight is stored as HF
stores it, output axes first and input axes last (q [H, Dh, D], o [D, H, Dh], gate
[F, D]), each axis with its logical name, and applied as one 2-D matmul x · Wᵀ over all
rows (`Linear`).

What a layer's queries attend to (`attend`): an optional shared key set read by groups of
consecutive rows (a prompt's KV cache, read once by its samples or packed rows) and the
rows' own keys (their cache with the new tokens written in, or the new tokens alone), under
one softmax. Keys are laid out slots last, [.., KV, Dh, S], and values [.., KV, S, Dh], so
both products are plain matrix products (q [G, Dh] · k [Dh, S], e [G, S] · v [S, Dh]):
XLA:CPU ran q·kᵀ on an [S, Dh] cache at half the speed (bench/RESULTS.md).

Entry points: `DecoderLayer`, `attend`, `rms_norm`, `rope`, `rope_inv_freq`, `INIT_STD`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from daro_jax.models import attention_kernel
from daro_jax.models.attention_kernel import KEY_AXES, VALUE_AXES, Segments
from daro_jax.models.config import ModelConfig
from daro_jax.sharding import constrain

NEG_INF = -1e30
INIT_STD = 0.02  # N(0, INIT_STD²) matrices (HF's init); zero biases, unit norm weights
STREAM_AXES = ("batch", "length", "embed")


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies θ^(−2i/Dh), i < Dh/2, with Llama 3.1's piecewise scaling.

    llama3 scaling (factor s, low/high frequency factors l, h, original context C): for
    wavelength λ = 2π/f, keep f if λ < C/h, use f/s if λ > C/l, and in between blend
    (1 − a)·f/s + a·f with a = (C/λ − l)/(h − l).
    """
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_scaling is None:
        return inv
    p = dict(cfg.rope_scaling)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    context = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    a = (context / wavelen - low) / (high - low)
    blended = (1 - a) * inv / factor + a * inv
    return jnp.where(
        wavelen < context / high, inv, jnp.where(wavelen > context / low, inv / factor, blended)
    )


def rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half RoPE: x·cos + rotate_half(x)·sin, angles = position × inv_freq.

    x [R, T, N, Dh], positions [R, T]; rotate_half(x) = concat(−x₂, x₁) of the two halves.
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [R, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """w ⊙ x / sqrt(mean(x²) + eps), the statistics in float32 (as HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def attend(q, k, v, allowed, shared=None, shared_allowed=None) -> jnp.ndarray:
    """`einsum_attend`'s attention, its masks dense booleans or `Segments`.

    With `Segments` whose shapes the splash kernels take (`attention_kernel.kernel_fits`),
    the TPU runs `attention_kernel.fused_attend` (scores kept in VMEM) and every other
    backend `einsum_attend` on the same masks made dense, chosen per backend by
    `lax.platform_dependent`: a GPU has no Mosaic TPU kernel, and Pallas' interpreter, which
    runs the TPU kernel anywhere, is orders of magnitude slower than XLA's einsums on a CPU
    (the tests run it to check the kernel against `einsum_attend`, values and gradients).
    Query rows with no allowed key get a meaningless output on either path.
    """
    if not isinstance(allowed, Segments):
        return einsum_attend(q, k, v, allowed, shared, shared_allowed)

    def einsum(q, k, v, allowed, shared, shared_allowed):
        dense = None if shared is None else shared_allowed.allowed()
        return einsum_attend(q, k, v, allowed.allowed(), shared, dense)

    shared_shape = None if shared is None else shared[0].shape
    if not attention_kernel.kernel_fits(q.shape, k.shape[3], shared_shape, allowed.causal):
        return einsum(q, k, v, allowed, shared, shared_allowed)
    return lax.platform_dependent(
        q, k, v, allowed, shared, shared_allowed, tpu=attention_kernel.fused_attend, default=einsum
    )


def einsum_attend(q, k, v, allowed, shared=None, shared_allowed=None) -> jnp.ndarray:
    """softmax(q·kᵀ/√Dh masked)·v over the rows' own keys and an optional shared key set.

    q [R, T, KV, G, Dh]; own keys k [R, KV, Dh, S] and values v [R, KV, S, Dh] with
    `allowed` [R, T, S] booleans; shared: None or (k [Bp, KV, Dh, P], v [Bp, KV, P, Dh])
    read by the J = R / Bp consecutive rows of each group, with `shared_allowed` [R, T, P].
    Over the union of the allowed slots u: e_u = exp(s_u − max s), out = Σ_u e_u v_u / Σ_u e_u
    (a masked slot has s = −10³⁰, so a query with no allowed slot gets a finite mean).
    Returns [R, T, KV, G, Dh].
    """
    r, t, kv, g, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    f32 = jnp.float32
    s_own = jnp.einsum("rtkgd,rkds->rktgs", q, k, preferred_element_type=f32) * scale
    s_own = jnp.where(allowed[:, None, :, None, :], s_own, NEG_INF)
    top = s_own.max(-1)  # [R, KV, T, G]
    if shared is not None:
        bp = shared[0].shape[0]
        j, p = r // bp, shared[0].shape[3]
        by_group = q.reshape(bp, j, t, kv, g, dh)
        s_sh = jnp.einsum("bjtkgd,bkdp->bkjtgp", by_group, shared[0], preferred_element_type=f32)
        mask = shared_allowed.reshape(bp, j, t, p)[:, None, :, :, None, :]
        s_sh = jnp.where(mask, s_sh * scale, NEG_INF)
        to_rows = lambda a: jnp.swapaxes(a, 1, 2).reshape(r, kv, *a.shape[3:])  # noqa: E731
        top = jnp.maximum(top, to_rows(s_sh.max(-1)))
    e_own = jnp.exp(s_own - top[..., None])
    out = jnp.einsum("rktgs,rksd->rktgd", e_own.astype(v.dtype), v, preferred_element_type=f32)
    total = e_own.sum(-1)
    if shared is not None:
        by_group = jnp.swapaxes(top.reshape(bp, j, kv, t, g), 1, 2)
        e_sh = jnp.exp(s_sh - by_group[..., None])
        out_sh = jnp.einsum(
            "bkjtgp,bkpd->bkjtgd", e_sh.astype(v.dtype), shared[1], preferred_element_type=f32
        )
        out = out + to_rows(out_sh)
        total = total + to_rows(e_sh.sum(-1))
    out = out / total[..., None]
    return out.transpose(0, 2, 1, 3, 4).astype(q.dtype)


def lora_a_init(key, shape, dtype):
    """U(−1/√fan_in, 1/√fan_in) for A [r, *in] (PEFT's default for lora_A)."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _matmul_t(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [rows, in] · wᵀ for w [out, in]."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())))


class Linear(nn.Module):
    """y = x · Wᵀ + b over the trailing len(in_axes) axes of x; W [*out_shape, *in] (HF's
    [out, in] with each side split into named axes), computed as one 2-D matmul of the
    [rows, in] view of x and the [out, in] view of W.

    lora_rank r > 0 adds LoRA's low-rank path: y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ + b with
    A "lora_a" [r, *in] (`lora_a_init`) and B "lora_b" [*out_shape, r] (zeros, so the layer
    starts as the base layer exactly), in `lora_dtype`, computed in `dtype`; s = lora_scale.
    """

    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]
    in_axes: tuple[str, ...]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    lora_rank: int = 0
    lora_scale: float = 1.0
    lora_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        lead = x.shape[: x.ndim - len(self.in_axes)]
        in_shape = x.shape[len(lead) :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(INIT_STD), self.out_axes + self.in_axes
            ),
            self.out_shape + in_shape,
            self.param_dtype,
        )
        w = kernel.astype(self.dtype).reshape(math.prod(self.out_shape), -1)
        rows = x.reshape(-1, w.shape[1])
        y = _matmul_t(rows, w)
        if self.lora_rank:
            r = self.lora_rank
            a_init = nn.with_logical_partitioning(lora_a_init, ("lora_rank",) + self.in_axes)
            b_init = nn.with_logical_partitioning(
                nn.initializers.zeros, self.out_axes + ("lora_rank",)
            )
            a = self.param("lora_a", a_init, (r,) + in_shape, self.lora_dtype)
            b = self.param("lora_b", b_init, self.out_shape + (r,), self.lora_dtype)
            low = _matmul_t(rows, a.astype(self.dtype).reshape(r, -1)) * self.lora_scale
            y = y + _matmul_t(low.astype(self.dtype), b.astype(self.dtype).reshape(-1, r))
        y = y.reshape(*lead, *self.out_shape)
        if self.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes)
            y = y + self.param("bias", init, self.out_shape, self.param_dtype).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """`rms_norm` with its weight "scale" [D] (initialised to ones)."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        return rms_norm(x, self.param("scale", init, (x.shape[-1],), self.param_dtype), self.eps)


def _linear(cfg: ModelConfig, name: str, **kwargs) -> Linear:
    """The projection `name` (q, k, v, o, gate, up, down), with LoRA adapters when `cfg`
    targets it."""
    lora = {}
    if cfg.lora_rank and name in cfg.lora_targets:
        lora = dict(
            lora_rank=cfg.lora_rank,
            lora_scale=cfg.lora_scale,
            lora_dtype=jnp.dtype(cfg.lora_dtype),
        )
    return Linear(
        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name, **kwargs, **lora
    )


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; see `DecoderLayer` for the arguments."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, masks, slot, shared, own):
        cfg = self.cfg
        r, t = x.shape[:2]
        kv, dh = cfg.num_kv_heads, cfg.head_dim
        proj = functools.partial(_linear, cfg, in_axes=("embed",), use_bias=cfg.qkv_bias)
        q = proj(out_shape=(cfg.num_heads, dh), out_axes=("heads", "head_dim"), name="q")(x)
        k = proj(out_shape=(kv, dh), out_axes=("kv_heads", "head_dim"), name="k")(x)
        v = proj(out_shape=(kv, dh), out_axes=("kv_heads", "head_dim"), name="v")(x)
        inv_freq = rope_inv_freq(cfg)
        q = constrain(rope(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
        k = rope(k, positions, inv_freq).transpose(0, 2, 3, 1)  # [R, KV, Dh, T]
        v = v.swapaxes(1, 2)  # [R, KV, T, Dh]
        if own is not None:
            k = lax.dynamic_update_slice_in_dim(own[0], k.astype(own[0].dtype), slot, axis=3)
            v = lax.dynamic_update_slice_in_dim(own[1], v.astype(own[1].dtype), slot, axis=2)
        k, v = constrain(k, KEY_AXES), constrain(v, VALUE_AXES)
        grouped = q.reshape(r, t, kv, cfg.num_heads // kv, dh)
        keys, values = k, v
        if own is not None:  # a cache: only its first masks["own"].shape[-1] slots are read
            read = masks["own"].shape[-1]
            keys, values = k[..., :read], v[:, :, :read]
        out = attend(grouped, keys, values, masks["own"], shared, masks.get("shared"))
        o = _linear(
            cfg,
            out_shape=(cfg.hidden_size,),
            out_axes=("embed",),
            in_axes=("heads", "head_dim"),
            use_bias=cfg.o_bias,
            name="o",
        )
        return o(out.reshape(r, t, cfg.num_heads, dh)), (k, v)


class Mlp(nn.Module):
    """W_down(silu(W_gate x) ⊙ W_up x)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        up = functools.partial(
            _linear, cfg, out_shape=(cfg.intermediate_size,), out_axes=("mlp",), use_bias=False
        )
        gate, up = up(in_axes=("embed",), name="gate")(x), up(in_axes=("embed",), name="up")(x)
        act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        down = _linear(
            cfg,
            out_shape=(cfg.hidden_size,),
            out_axes=("embed",),
            in_axes=("mlp",),
            use_bias=False,
            name="down",
        )
        return down(act)


class DecoderLayer(nn.Module):
    """One pre-norm layer on x [R, T, D] (T new tokens per row at `positions` [R, T]).

    own: None (the T tokens attend to each other: masks["own"] [R, T, T]) or the rows' own
    cache (k [R, KV, Dh, S], v [R, KV, S, Dh]), into which the T new keys and values are
    written at slots [slot, slot + T) before attending to its first S' slots with
    masks["own"] [R, T, S'], S' ≤ S (static slices: a decode step reads only the slots
    that can be valid, the rest of the cache is not read).
    shared: None or a key set in the same layout (k [Bp, KV, Dh, P], v [Bp, KV, P, Dh]) read
    by J = R / Bp consecutive rows each, with masks["shared"] [R, T, P]. Returns (new x,
    (k, v)): the updated own cache, or the new tokens' keys [R, KV, Dh, T] and values
    [R, KV, T, Dh] (a prefill's cache).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, masks, slot, shared, own):
        cfg = self.cfg
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.weight_dtype)
        h, kv = Attention(cfg, name="attn")(
            norm(name="attn_norm")(x), positions, masks, slot, shared, own
        )
        x = constrain(x + h, STREAM_AXES)
        x = x + Mlp(cfg, name="mlp")(norm(name="mlp_norm")(x))
        return constrain(x, STREAM_AXES), kv
