"""The decode step on CPU: one new token per row, weights stored [out, in], keys slot-last.

`decoder.forward` computes the same function for any number of new tokens; this module is
the sampler's inner loop on CPU, where a decode step (a few dozen rows) is bound by
streaming the weights and the KV cache from memory. Two layouts make XLA:CPU stream them
faster (SmolLM2-135M shape, 32 rows, 2 cores; bench/RESULTS.md):

- every matrix is stored 2-D, output axis first and contracted input axis last (x · wᵀ;
  XLA:CPU copies a 3-D weight into a 2-D [in, out] form at every step): the 30 layers'
  projections take 46–48 ms instead of 58 ms for the [in, out]
  layout, and the tied lm head reads the embedding [V, D] as stored (10 vs 15 ms);
- keys are cached [R, KV, Dh, S] (slots last) and attention is two fused multiply-reduce
  loops instead of batched matmuls of G = H/KV query rows each: 24 vs 31 ms at S = 192.

Layout (`decode_params`): {"embed" [V, D], "final_norm" [D], "head" [V, D] (the embedding
itself when tied, lm_headᵀ otherwise), "layers": a list of L dicts} with, per layer,

    wq [H·Dh, D]   wk, wv [KV·Dh, D]   wo [D, H·Dh]   w_gate, w_up [F, D]   w_down [D, F]

and the norms and biases as in `decoder`. Cache (`decode_cache`): {"k": L × [R, KV, Dh, S],
"v": L × [R, KV, S, Dh]}. The layers are a Python loop over separate arrays: slicing a
layer out of stacked arrays inside the decode loop copies it at every step on XLA:CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from daro_jax import sharding
from daro_jax.models import decoder
from daro_jax.models.config import ModelConfig

_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
KEY_LOGICAL_AXES = ("batch", "kv_heads", "head_dim", "cache_length")
VALUE_LOGICAL_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


def decode_params(params: dict, cfg: ModelConfig) -> dict:
    """The decoder's params (stacked layers, [in..., out...] weights) in the decode layout,
    in the compute dtype: one copy of the weights."""
    dt = cfg.compute_dtype
    inputs = {"wo": cfg.num_heads * cfg.head_dim, "w_down": cfg.intermediate_size}  # else D
    layers = []
    for i in range(cfg.num_layers):
        layer = {}
        for name, w in params["layers"].items():
            w = w[i].astype(dt)
            if name in _MATRICES:
                w = w.reshape(inputs.get(name, cfg.hidden_size), -1).T
            layer[name] = w
        layers.append(layer)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T
    return {
        "embed": params["embed"],
        "final_norm": params["final_norm"],
        "head": head.astype(dt),
        "layers": layers,
    }


def decode_cache(cache: dict, copies: int, room: int) -> dict:
    """A prefill cache {"k", "v"} of [L, B, KV, P, Dh] in the decode layout with each row
    repeated `copies` times (row i·copies + j is copy j of row i) and `room` empty slots
    after the P cached ones: k L × [B·copies, KV, Dh, P + room], v L × [.., P + room, Dh]."""
    expand = lambda c: decoder.repeat_cache(c, copies, room)  # noqa: E731
    return constrain_cache(
        {
            "k": [expand(k).swapaxes(-1, -2) for k in cache["k"]],
            "v": [expand(v) for v in cache["v"]],
        }
    )


def constrain_cache(cache: dict) -> dict:
    """Pin a decode-layout cache to the active mesh (rows over batch, heads over tensor)."""
    return {
        "k": [sharding.constrain(k, KEY_LOGICAL_AXES) for k in cache["k"]],
        "v": [sharding.constrain(v, VALUE_LOGICAL_AXES) for v in cache["v"]],
    }


def _dot(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x · wᵀ of x [R, in] and w [out, in]: [R, out]."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def _attend(q: jnp.ndarray, kt: jnp.ndarray, v: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """Attention of one query per head over the cached slots, as multiply-reduce loops:

    q [R, KV, G, Dh], kt [R, KV, Dh, S], v [R, KV, S, Dh], bias [R, S] (0 or −∞);
    s_t = Σ_d q_d · kt_{d,t} / √Dh + bias_t,  e_t = exp(s_t − max s),
    out = Σ_t e_t · v_t / Σ_t e_t   → [R, KV, G, Dh] float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.sum(
        q[..., :, None].astype(jnp.float32) * kt[:, :, None].astype(jnp.float32), axis=-2
    )
    scores = scores * scale + bias[:, None, None, :]
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.sum(e[..., None] * v[:, :, None].astype(jnp.float32), axis=-2)
    return out / jnp.sum(e, axis=-1)[..., None]


def _layer(cfg, inv_freq, positions, bias, slot, x, lp, kt, vc):
    """One decoder layer for one token per row (x [R, D]); returns (x, kt, vc)."""
    h = decoder.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    rows, heads = (x.shape[0], -1, cfg.head_dim), (cfg.num_kv_heads, -1, cfg.head_dim)
    q, k, v = (_dot(h, lp[name]).reshape(rows) for name in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = decoder.rope(q[:, None], positions[:, None], inv_freq)[:, 0]
    k = decoder.rope(k[:, None], positions[:, None], inv_freq)[:, 0]
    kt = lax.dynamic_update_slice(kt, k[..., None].astype(kt.dtype), (0, 0, 0, slot))
    vc = lax.dynamic_update_slice(vc, v[:, :, None].astype(vc.dtype), (0, 0, slot, 0))
    attn = _attend(q.reshape(x.shape[0], *heads), kt, vc, bias).astype(x.dtype)
    out = _dot(attn.reshape(x.shape[0], -1), lp["wo"])
    if cfg.o_bias:
        out = out + lp["bo"]
    x = sharding.constrain(x + out, ("batch", "embed"))
    h = decoder.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    act = jax.nn.silu(_dot(h, lp["w_gate"])) * _dot(h, lp["w_up"])
    x = x + _dot(sharding.constrain(act, ("batch", "mlp")), lp["w_down"])
    return sharding.constrain(x, ("batch", "embed")), kt, vc


def step(
    dparams: dict,
    cfg: ModelConfig,
    tokens: jnp.ndarray,
    positions: jnp.ndarray,
    mask: jnp.ndarray,
    cache: dict,
    slot: jnp.ndarray,
) -> tuple[jnp.ndarray, dict]:
    """One decode step: tokens, positions [R] int; mask [R, S] marks the valid cache slots
    (the new token's `slot` included); the new token's key and value are written at
    `slot` and it attends to the valid slots s ≤ slot. Returns the final hidden states
    [R, D] (after the last RMSNorm) and the updated cache — `decoder.forward` with T = 1.
    """
    allowed = mask.astype(bool) & (jnp.arange(mask.shape[1]) <= slot)
    bias = jnp.where(allowed, 0.0, decoder.NEG_INF).astype(jnp.float32)
    inv_freq = decoder.rope_inv_freq(cfg)
    x = jnp.take(dparams["embed"], tokens, axis=0).astype(cfg.compute_dtype)
    x = sharding.constrain(x, ("batch", "embed"))
    new_k, new_v = [], []
    for lp, kt, v in zip(dparams["layers"], cache["k"], cache["v"], strict=True):
        x, kt, v = _layer(cfg, inv_freq, positions, bias, slot, x, lp, kt, v)
        new_k.append(kt)
        new_v.append(v)
    hidden = decoder.rms_norm(x, dparams["final_norm"], cfg.rms_norm_eps)
    return hidden, constrain_cache({"k": new_k, "v": new_v})


def logits(dparams: dict, hidden: jnp.ndarray) -> jnp.ndarray:
    """Float32 logits hidden · headᵀ of hidden states [R, D] (head [V, D])."""
    return lax.dot_general(
        hidden, dparams["head"], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
