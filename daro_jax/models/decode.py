"""The decode step on CPU: one new token per row, weights stored [out, in], keys slot-last.

`decoder.forward` computes the same function for any number of new tokens; this module is
the sampler's inner loop on CPU, where a decode step (a few dozen rows) is bound by
streaming the weights and the KV cache from memory. Two layouts make XLA:CPU stream them
faster (SmolLM2-135M shape, 32 rows, 2 cores; bench/RESULTS.md):

- every matrix is stored 2-D, output axis first and contracted input axis last (x · wᵀ;
  XLA:CPU copies a 3-D weight into a 2-D [in, out] form at every step): the 30 layers'
  projections take 46–48 ms instead of 58 ms for the [in, out]
  layout, and the tied lm head reads the embedding [V, D] as stored (10 vs 15 ms);
- keys are cached [.., KV, Dh, S] (slots last) and attention is fused multiply-reduce
  loops instead of batched matmuls of G = H/KV query rows each: 24 vs 31 ms at S = 192;
- the prompt's keys and values are held once per prompt and read once for its J samples
  (J consecutive rows), beside each row's own cache of the N new tokens: the K copies of
  the prompt's cache are neither made nor streamed.

Layout (`decode_params`): {"embed" [V, D], "final_norm" [D], "head" [V, D] (the embedding
itself when tied, lm_headᵀ otherwise), "layers": a list of L dicts} with, per layer,

    wq [H·Dh, D]   wk, wv [KV·Dh, D]   wo [D, H·Dh]   w_gate, w_up [F, D]   w_down [D, F]

and the norms and biases as in `decoder`. Cache (`decode_cache`), for R rows in groups of
J = R / Bp consecutive rows sharing a prompt:

    prompt_k L × [Bp, KV, Dh, P]   prompt_v L × [Bp, KV, P, Dh]   prompt_bias [Bp, P]
    k        L × [R, KV, Dh, N]    v        L × [R, KV, N, Dh]

(prompt_bias: 0 on real prompt tokens, −∞ on padding). The layers are a Python loop over
separate arrays: slicing a layer out of stacked arrays inside the decode loop copies it at
every step on XLA:CPU.
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
_PROMPT_PART = ("prompt_k", "prompt_v", "prompt_bias")
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
    return {
        "embed": params["embed"],
        "final_norm": params["final_norm"],
        "head": decoder.output_matrix(params, cfg).T.astype(dt),
        "layers": layers,
    }


def decode_cache(cache: dict, prompt_mask: jnp.ndarray, copies: int, room: int) -> dict:
    """The decode cache of B prompts, each sampled `copies` times (row i·copies + j is copy
    j of prompt i), from their prefill cache {"k", "v"} [L, B, KV, P, Dh] and prompt_mask
    [B, P]: the prompt part as is (keys slot-last) and `room` empty slots per row."""
    b, kv, _, dh = cache["k"].shape[1:]
    own = jnp.zeros((b * copies, kv, room, dh), cache["k"].dtype)
    return constrain_cache(
        {
            "prompt_k": [k.swapaxes(-1, -2) for k in cache["k"]],
            "prompt_v": list(cache["v"]),
            "prompt_bias": jnp.where(prompt_mask.astype(bool), 0.0, decoder.NEG_INF),
            "k": [own.swapaxes(-1, -2)] * len(cache["k"]),
            "v": [own] * len(cache["v"]),
        }
    )


def take_rows(cache: dict, rows: jnp.ndarray) -> dict:
    """The decode cache of the rows `rows` (indices into the cache's R rows), each with its
    own copy of its prompt's part (J = 1): row i's prompt is group i // J."""
    group = rows // (cache["k"][0].shape[0] // cache["prompt_k"][0].shape[0])
    take = lambda x, index: jnp.take(x, index, axis=0)  # noqa: E731
    return constrain_cache(
        {name: jax.tree.map(lambda x: take(x, group), cache[name]) for name in _PROMPT_PART}
        | {name: [take(x, rows) for x in cache[name]] for name in ("k", "v")}
    )


def constrain_cache(cache: dict) -> dict:
    """Pin a decode-layout cache to the active mesh (rows over batch, heads over tensor)."""
    keys = lambda xs: [sharding.constrain(x, KEY_LOGICAL_AXES) for x in xs]  # noqa: E731
    values = lambda xs: [sharding.constrain(x, VALUE_LOGICAL_AXES) for x in xs]  # noqa: E731
    return {
        "prompt_k": keys(cache["prompt_k"]),
        "prompt_v": values(cache["prompt_v"]),
        "prompt_bias": sharding.constrain(cache["prompt_bias"], ("batch", "cache_length")),
        "k": keys(cache["k"]),
        "v": values(cache["v"]),
    }


def _dot(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x · wᵀ of x [R, in] and w [out, in]: [R, out]."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def _attend(q, prompt_kt, prompt_v, prompt_bias, kt, v, bias) -> jnp.ndarray:
    """Attention of one query per head over its prompt's slots and its row's own slots,
    as multiply-reduce loops in float32; the J = R / Bp rows of a prompt read its part once.

    q [R, KV, G, Dh]; prompt_kt [Bp, KV, Dh, P], prompt_v [Bp, KV, P, Dh], prompt_bias
    [Bp, P]; kt [R, KV, Dh, N], v [R, KV, N, Dh], bias [N] (0 or −∞ per slot). Over the
    P + N slots t: s_t = Σ_d q_d · k_{d,t} / √Dh + bias_t, e_t = exp(s_t − max s),
    out = Σ_t e_t · v_t / Σ_t e_t → [R, KV, G, Dh].
    """
    r, kv, groups, dh = q.shape
    bp = prompt_kt.shape[0]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q = f32(q) / math.sqrt(dh)
    by_prompt = q.reshape(bp, r // bp, kv, groups, dh)
    s_prompt = jnp.sum(by_prompt[..., None] * f32(prompt_kt)[:, None, :, None], axis=-2)
    s_prompt = s_prompt + prompt_bias[:, None, None, None, :]  # [Bp, J, KV, G, P]
    s_own = jnp.sum(q[..., None] * f32(kt)[:, :, None], axis=-2) + bias  # [R, KV, G, N]
    top = jnp.maximum(jnp.max(s_prompt, axis=-1).reshape(r, kv, groups), jnp.max(s_own, -1))
    e_prompt = jnp.exp(s_prompt - top.reshape(bp, -1, kv, groups)[..., None])
    e_own = jnp.exp(s_own - top[..., None])
    out = jnp.sum(e_prompt[..., None] * f32(prompt_v)[:, None, :, None], axis=-2)
    out = out.reshape(q.shape) + jnp.sum(e_own[..., None] * f32(v)[:, :, None], axis=-2)
    total = jnp.sum(e_prompt, axis=-1).reshape(r, kv, groups) + jnp.sum(e_own, axis=-1)
    return out / total[..., None]


def _layer(cfg, inv_freq, positions, bias, slot, x, lp, prompt, kt, vc):
    """One decoder layer for one token per row (x [R, D]) whose key and value go to slot
    `slot` of the rows' own cache (kt, vc); `prompt` is the layer's (prompt_kt, prompt_v,
    prompt_bias). Returns (x, kt, vc)."""
    h = decoder.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    rows, heads = (x.shape[0], -1, cfg.head_dim), (cfg.num_kv_heads, -1, cfg.head_dim)
    q, k, v = (_dot(h, lp[name]).reshape(rows) for name in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = decoder.rope(q[:, None], positions[:, None], inv_freq)[:, 0]
    k = decoder.rope(k[:, None], positions[:, None], inv_freq)[:, 0]
    kt = lax.dynamic_update_slice(kt, k[..., None].astype(kt.dtype), (0, 0, 0, slot))
    vc = lax.dynamic_update_slice(vc, v[:, :, None].astype(vc.dtype), (0, 0, slot, 0))
    attn = _attend(q.reshape(x.shape[0], *heads), *prompt, kt, vc, bias).astype(x.dtype)
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
    cache: dict,
    slot: jnp.ndarray,
) -> tuple[jnp.ndarray, dict]:
    """One decode step: tokens, positions [R] int; the new token's key and value are
    written at `slot` of each row's own cache, and it attends to its prompt's real tokens
    and the row's own slots s ≤ slot. Returns the final hidden states [R, D] (after the
    last RMSNorm) and the updated cache — `decoder.forward` with T = 1.
    """
    bias = jnp.where(jnp.arange(cache["k"][0].shape[-1]) <= slot, 0.0, decoder.NEG_INF)
    inv_freq = decoder.rope_inv_freq(cfg)
    x = jnp.take(dparams["embed"], tokens, axis=0).astype(cfg.compute_dtype)
    x = sharding.constrain(x, ("batch", "embed"))
    new_k, new_v = [], []
    names = ("prompt_k", "prompt_v", "k", "v")
    for lp, prompt_kt, prompt_v, kt, v in zip(
        dparams["layers"], *(cache[name] for name in names), strict=True
    ):
        prompt = (prompt_kt, prompt_v, cache["prompt_bias"])
        x, kt, v = _layer(cfg, inv_freq, positions, bias, slot, x, lp, prompt, kt, v)
        new_k.append(kt)
        new_v.append(v)
    hidden = decoder.rms_norm(x, dparams["final_norm"], cfg.rms_norm_eps)
    return hidden, constrain_cache(cache | {"k": new_k, "v": new_v})


def logits(dparams: dict, hidden: jnp.ndarray) -> jnp.ndarray:
    """Float32 logits hidden · headᵀ of hidden states [R, D] (head [V, D])."""
    return lax.dot_general(
        hidden, dparams["head"], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
