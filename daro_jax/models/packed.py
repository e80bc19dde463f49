"""The update's packed forward: prompts once per block, completions packed into rows.

The b = G·g left-padded prompts [b, P] of a minibatch are forwarded once (`prompt_blocks`);
the keys and values of block j's g prompts are laid side by side, keys [G, KV, Dh, g·P] and
values [G, KV, g·P, Dh] per layer. Its completions are packed back to back into rows of C
positions (`daro_jax.train.packing`: chunk_tokens, chunk_segments, chunk_offsets [G, R, C]); in
`chunk_logprobs` the R rows of a block read its prompts' keys once (`layers.attend`'s shared
key set; the masks are segment ids, so that a TPU runs the fused kernel), a token attends
to its own prompt's real tokens and to the earlier tokens of its own completion, so each
token gets the logits of the forward of its [prompt | completion] alone.

Entry points: `prompt_blocks`, `chunk_logprobs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from daro_jax.models import decoder
from daro_jax.models.attention_kernel import Segments
from daro_jax.models.config import ModelConfig

CHUNK_INPUTS = ("chunk_tokens", "chunk_segments", "chunk_offsets")  # train.packing.pack_blocks


def prompt_blocks(params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, blocks: int):
    """The b = G·g left-padded prompts [b, P] forwarded once: the hidden state of each
    prompt's last position [G, g, D] (it predicts the first completion token) and the keys
    and values of each block, its g prompts side by side: keys [L, G, KV, Dh, g·P] and
    values [L, G, KV, g·P, Dh] (`layers.attend`'s layout)."""
    hidden, (k, v) = decoder.prefill(params, cfg, tokens, mask)
    b, p = tokens.shape
    g = b // blocks

    def side_by_side(values):  # [L, b, KV, P, Dh] -> [L, G, KV, g·P, Dh]
        layers, _, heads, _, dh = values.shape
        values = values.reshape(layers, blocks, g, heads, p, dh).transpose(0, 1, 3, 2, 4, 5)
        return values.reshape(layers, blocks, heads, g * p, dh)

    keys = side_by_side(k.swapaxes(-1, -2)).swapaxes(-1, -2)
    return hidden[:, -1].reshape(blocks, g, -1), (keys, side_by_side(v))


def chunk_logprobs(
    params,
    cfg: ModelConfig,
    last_hidden,
    prompt_kv,
    prompt_mask,
    chunk: dict,
    k: int,
    temperature: float,
):
    """log π(o_t | prompt, o_<t) and the entropy of softmax(logits / T) of every token of one
    packed chunk: chunk_tokens, chunk_segments, chunk_offsets [G, R, C].

    last_hidden [G, g, D] and prompt_kv from `prompt_blocks`; prompt_mask [b, P]. Token i
    of completion j = segments_i (prompt j // k of its block) sits at position len(prompt)
    + offset_i; it attends to its prompt's real slots and to the tokens of completion j
    before it, and is predicted by the hidden state before it in its row, or by its
    prompt's last one for offset 0. Returns two [G, R, C] arrays (meaningless on padding).
    """
    tokens, segments, offsets = (chunk[n] for n in CHUNK_INPUTS)
    blocks, r, c = tokens.shape
    g = last_hidden.shape[1]
    p = prompt_mask.shape[1]
    rows = lambda x: x.reshape(blocks * r, *x.shape[2:])  # noqa: E731
    seg = rows(segments)
    prompt = jnp.where(seg >= 0, seg // k, -1)  # [G·R, C]: the token's prompt in its block
    lengths = jnp.repeat(prompt_mask.sum(-1).reshape(blocks, g), r, axis=0)
    positions = jnp.take_along_axis(lengths, jnp.maximum(prompt, 0), axis=1) + rows(offsets)
    slot_prompt = jnp.arange(g * p) // p  # key slot of the block's g prompts side by side
    key_prompt = jnp.where(prompt_mask.reshape(blocks, g * p).astype(bool), slot_prompt, -1)
    masks = {
        "own": Segments(seg, seg, causal=True),
        "shared": Segments(prompt, key_prompt),
    }
    hidden, _ = decoder.forward(params, cfg, rows(tokens), positions, masks, shared=prompt_kv)
    previous = jnp.pad(hidden[:, :-1], ((0, 0), (1, 0), (0, 0)))
    start = jnp.repeat(last_hidden, r, axis=0)
    start = jnp.take_along_axis(start, jnp.maximum(prompt, 0)[..., None], axis=1)
    hidden = jnp.where(rows(offsets)[..., None] > 0, previous, start)
    logp, entropy = decoder.token_logprobs(params, cfg, hidden, rows(tokens), temperature)
    return logp.reshape(blocks, r, c), entropy.reshape(blocks, r, c)
