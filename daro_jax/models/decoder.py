"""The decoder: `Decoder`, a Flax linen module used pure-functionally, and its entry points.

Parameters (`init_params`: a plain nested dict; HF's [out, in] order; the layers stacked on
a leading axis L and run by `nn.scan`, each under `nn.remat` when `cfg.remat`):

    embed/embedding [V, D]                  final_norm/scale [D]      lm_head [V, D] (untied)
    layers/attn_norm/scale [L, D]           layers/mlp_norm/scale [L, D]
    layers/attn/q/kernel [L, H, Dh, D]      layers/attn/q/bias [L, H, Dh]     (qkv_bias)
    layers/attn/k|v/kernel [L, KV, Dh, D]   layers/attn/k|v/bias [L, KV, Dh]  (qkv_bias)
    layers/attn/o/kernel [L, D, H, Dh]      layers/attn/o/bias [L, D]         (o_bias)
    layers/mlp/gate|up/kernel [L, F, D]     layers/mlp/down/kernel [L, D, F]

Every leaf carries logical axis names (`param_specs`, from `nn.with_logical_partitioning`).
`Decoder(cfg).apply({"params": params}, tokens, positions, masks, shared, own, slot)`
returns the final hidden states (after the last RMSNorm) and every layer's keys and values;
nothing is kept between calls, a KV cache is an input and an output (`layers.DecoderLayer`
says what `masks`, `shared`, `own` and `slot` mean). `Decoder(cfg, scan_layers=False)`
runs the same layers as a Python loop over `unstack_layers(params)`: the sampler's decode
step, whose weights are then separate arrays read in place at every step (a slice of the
stacked weights taken inside a loop is copied at every step).

Entry points: `Decoder`, `init_params`, `abstract_params`, `param_specs`, `param_shapes`,
`forward`, `prefill`, `causal_masks`, `causal_segments`, `positions_from_mask`, `lm_logits`,
`token_logprobs`, `unstack_layers`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from daro_jax import sharding
from daro_jax.models.attention_kernel import Segments
from daro_jax.models.config import ModelConfig
from daro_jax.models.layers import INIT_STD, STREAM_AXES, DecoderLayer, RMSNorm
from daro_jax.sharding import constrain

LOGITS_TOKENS = 1024  # tokens per device in one chunk of `token_logprobs` (f32 logits: ×V×4 B)


class Decoder(nn.Module):
    """Embedding, L decoder layers, final RMSNorm; `logits` applies the output matrix."""

    cfg: ModelConfig
    scan_layers: bool = True

    def setup(self):
        cfg = self.cfg
        table = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed"))
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=cfg.weight_dtype, embedding_init=table
        )
        if self.scan_layers:
            layer = DecoderLayer
            if cfg.remat:
                policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
                layer = nn.remat(layer, prevent_cse=False, policy=policy)
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", table, (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype
            )

    def __call__(self, tokens, positions, masks, shared=None, own=None, slot=0):
        """tokens, positions [R, T] int. Scanned: shared and own are (k, v) stacked over the
        layers [L, ...] (or None); unscanned: lists of L per-layer (k, v). Returns (hidden
        [R, T, D], keys and values in the same form)."""
        x = jnp.take(self.embed.embedding, tokens, axis=0).astype(self.cfg.compute_dtype)
        x = constrain(x, STREAM_AXES)
        slot = jnp.asarray(slot, jnp.int32)
        if self.scan_layers:
            x, kv = self.layers(x, positions, masks, slot, shared, own)
        else:
            kv = []
            for i, layer in enumerate(self.layers):
                x, layer_kv = layer(
                    x,
                    positions,
                    masks,
                    slot,
                    None if shared is None else shared[i],
                    None if own is None else own[i],
                )
                kv.append(layer_kv)
        return self.final_norm(x), kv

    def logits(self, hidden):
        """Float32 logits hidden · Wᵀ of [..., D] hidden states (W [V, D]: the embedding when
        tied, lm_head otherwise)."""
        w = self.embed.embedding if self.cfg.tie_word_embeddings else self.lm_head
        contract = (((hidden.ndim - 1,), (1,)), ((), ()))
        return lax.dot_general(
            hidden, w.astype(hidden.dtype), contract, preferred_element_type=jnp.float32
        )


def positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Position ids for left-padded rows: cumsum(mask) − 1, 0 on padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_masks(mask: jnp.ndarray) -> dict:
    """{"own": [B, T, T]}: query t attends to key s ≤ t with mask[b, s] = 1 (mask [B, T])."""
    t = mask.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    return {"own": causal[None] & mask[:, None, :].astype(bool)}


def causal_segments(mask: jnp.ndarray) -> dict:
    """`causal_masks` as `Segments` (what the attention kernel takes): {"own": query t reads
    key s ≤ t with mask[b, s] = 1}."""
    zeros = jnp.zeros(mask.shape, jnp.int32)
    return {"own": Segments(zeros, jnp.where(mask.astype(bool), 0, -1), causal=True)}


def _init_boxed(cfg: ModelConfig, key: jax.Array) -> dict:
    one = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init(key, one, one, causal_masks(one + 1))["params"]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random params (N(0, 0.02²) matrices, zero biases, unit norm weights), unboxed."""
    return nn.meta.unbox(_init_boxed(cfg, key))


@functools.lru_cache(maxsize=16)
def _abstract(cfg: ModelConfig) -> dict:
    return jax.eval_shape(lambda: _init_boxed(cfg, jax.random.key(0)))


def param_specs(cfg: ModelConfig) -> dict:
    """The params pytree with, at each leaf, its logical PartitionSpec (axis names)."""
    return nn.get_partition_spec(_abstract(cfg))


def abstract_params(cfg: ModelConfig) -> dict:
    """The params as `jax.ShapeDtypeStruct`s (`jax.eval_shape` of `init_params`, unboxed):
    nothing is allocated."""
    return nn.meta.unbox(_abstract(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
    """The params pytree with, at each leaf, its shape."""
    return jax.tree.map(lambda x: tuple(x.shape), abstract_params(cfg))


def forward(params, cfg: ModelConfig, tokens, positions, masks, shared=None, own=None, slot=0):
    """`Decoder(cfg).apply` on the params: (hidden [R, T, D], keys and values)."""
    return Decoder(cfg).apply({"params": params}, tokens, positions, masks, shared, own, slot)


def prefill(params, cfg: ModelConfig, tokens: jnp.ndarray, mask: jnp.ndarray):
    """Left-padded prompts [B, P] forwarded once: (hidden [B, P, D], (keys [L, B, KV, Dh, P],
    values [L, B, KV, P, Dh]))."""
    return forward(params, cfg, tokens, positions_from_mask(mask), causal_segments(mask))


def lm_logits(params, cfg: ModelConfig, hidden: jnp.ndarray) -> jnp.ndarray:
    """Float32 logits [..., V] of hidden states [..., D] (`Decoder.logits`)."""
    return Decoder(cfg).apply({"params": params}, hidden, method=Decoder.logits)


def unstack_layers(params, cfg: ModelConfig) -> dict:
    """The params of `Decoder(cfg, scan_layers=False)` in the compute dtype: layer i of the
    stacked leaves as "layers_{i}" (one copy of the weights), each weight whole along its
    "embed" axis on every device (split over "tensor" only). Under a mesh that is one
    all-gather over "fsdp" per call, where fsdp-split weights would be gathered again at
    every decode step: libtpu's programs gathered the whole embedding at every step, up to
    dozens of times on v5e (bench/RESULTS.md)."""
    specs = param_specs(cfg)

    def gathered(w, spec):  # spec: the names of w's axes (after "layers" for a layer's w)
        names = tuple(None if name == "embed" else name for name in spec[len(spec) - w.ndim :])
        return constrain(w.astype(cfg.compute_dtype), names)

    out = {
        name: jax.tree.map(gathered, value, specs[name])
        for name, value in params.items()
        if name != "layers"
    }
    for i in range(cfg.num_layers):
        out[f"layers_{i}"] = jax.tree.map(
            lambda w, spec, i=i: gathered(w[i], spec), params["layers"], specs["layers"]
        )
    return out


def token_logprobs(
    params,
    cfg: ModelConfig,
    hidden: jnp.ndarray,
    targets: jnp.ndarray,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """log π(target | ·) and the entropy H = −Σ_v p_v log p_v of p = softmax(logits / T).

    hidden [B, T, D], targets [B, T] → two [B, T] float32 arrays. The [B, T, V] logits are
    never materialised: the sequence is processed in chunks of `chunk` positions, each
    rematerialised in the backward pass, so memory is O(B · chunk · V). By default a chunk
    holds LOGITS_TOKENS tokens per device (B / batch shards rows × chunk positions, at least
    128): each chunk gathers the fsdp-split output matrix and, in the backward, reduces
    its [V, D] gradient across chips, so at 128 positions a chunk those two moved most of
    the update's HBM bytes (bench/RESULTS.md, issue 24).
    """
    b, t, d = hidden.shape
    if chunk is None:
        mesh = sharding.active_mesh()
        shards = 1 if mesh is None else sharding.batch_shards(mesh)
        chunk = max(128, LOGITS_TOKENS * shards // b)
    chunk = min(chunk, t)
    pad = -t % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk)

    @jax.checkpoint
    def one(args):
        h_c, y_c = args
        logp_all = jax.nn.log_softmax(lm_logits(params, cfg, h_c) / temperature, axis=-1)
        logp = jnp.take_along_axis(logp_all, y_c[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return logp, entropy

    logp, entropy = lax.map(one, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))
    logp = jnp.moveaxis(logp, 0, 1).reshape(b, -1)[:, :t]
    entropy = jnp.moveaxis(entropy, 0, 1).reshape(b, -1)[:, :t]
    return logp, entropy
