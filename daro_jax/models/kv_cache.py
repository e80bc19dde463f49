"""The sampler's KV cache and decode step: each prompt's keys and values are held once and
read by its samples, beside each row's own cache of its new tokens.

After the prefill (`decoder.prefill`: B prompts of P slots once), rows r = b·J + j (sample
j of prompt b) decode one token per step. Per layer the cache holds

    shared  k [Bp, KV, Dh, P], v [Bp, KV, P, Dh]   the prompts' keys and values, read by
                                                   J = R / Bp rows each
    own     k [R, KV, Dh, N],  v [R, KV, N, Dh]    each row's new tokens, slot i = token i

(keys slots last, `layers.attend`) with shared_mask [Bp, P] (real prompt tokens): B·P + R·N
slots instead of R·(P + N) for a cache repeated per row. Layers and caches are lists of
separate arrays (`Decoder(cfg, scan_layers=False)` on `decoder.unstack_layers`), so a step
updates its slot in place and reads every weight where it lies. `take_rows` keeps some rows
of each data shard (the sampler's stages), each then with its own copy of its prompt's part
(J = 1).

Entry points: `start`, `step`, `take_rows`, `take_local`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from daro_jax.models import decoder
from daro_jax.models.config import ModelConfig
from daro_jax.models.layers import KEY_AXES, VALUE_AXES
from daro_jax.sharding import constrain


def _constrain(cache: dict) -> dict:
    pin = lambda kv: (constrain(kv[0], KEY_AXES), constrain(kv[1], VALUE_AXES))  # noqa: E731
    return {
        "shared": [pin(kv) for kv in cache["shared"]],
        "shared_mask": constrain(cache["shared_mask"], ("batch", "cache_length")),
        "own": [pin(kv) for kv in cache["own"]],
    }


def start(params, cfg: ModelConfig, prompt_kv, prompt_mask, copies: int, room: int):
    """(decode params, cache) for `copies` samples of each of the B prompts whose prefill
    keys and values are `prompt_kv` (k [L, B, KV, Dh, P], v [L, B, KV, P, Dh]) and real
    tokens `prompt_mask` [B, P], with `room` own slots per row."""
    b, kv, _, dh = prompt_kv[1].shape[1:]
    own_k = jnp.zeros((b * copies, kv, dh, room), prompt_kv[0].dtype)
    own_v = jnp.zeros((b * copies, kv, room, dh), prompt_kv[1].dtype)
    cache = {
        "shared": [(k, v) for k, v in zip(*prompt_kv, strict=True)],
        "shared_mask": prompt_mask.astype(bool),
        "own": [(own_k, own_v)] * cfg.num_layers,
    }
    return decoder.unstack_layers(params, cfg), _constrain(cache)


def step(dparams, cfg: ModelConfig, cache: dict, tokens, positions, slot, read: int):
    """One new token per row (tokens, positions [R]): its key and value go to own slot
    `slot` < `read`, it attends to its prompt's real tokens and its own slots ≤ `slot`, of
    which only the first `read` (static) are read. Returns the float32 logits [R, V] and
    the updated cache."""
    rows, groups = tokens.shape[0], cache["shared_mask"].shape[0]
    masks = {
        "own": jnp.broadcast_to(jnp.arange(read) <= slot, (rows, 1, read)),
        "shared": jnp.repeat(cache["shared_mask"], rows // groups, axis=0)[:, None, :],
    }
    model = decoder.Decoder(cfg, scan_layers=False)
    variables = {"params": dparams}
    hidden, own = model.apply(
        variables, tokens[:, None], positions[:, None], masks, cache["shared"], cache["own"], slot
    )
    logits = model.apply(variables, hidden[:, 0], method=decoder.Decoder.logits)
    return logits, _constrain(cache | {"own": own})


def take_local(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """x[index] for index [S, n] whose row s names rows of the s-th of S equal blocks of x's
    rows (the rows one data shard holds): a gather inside each block, so no row moves between
    devices. Returns [S·n, ...]. Rows that do not split into S blocks (a shared part of fewer
    prompts than shards) are gathered whole."""
    shards = index.shape[0]
    if x.shape[0] % shards:
        return jnp.take(x, index.reshape(-1), axis=0)
    blocks = x.reshape(shards, -1, *x.shape[1:])
    local = index - jnp.arange(shards)[:, None] * blocks.shape[1]
    out = jax.vmap(lambda block, i: jnp.take(block, i, axis=0))(blocks, local)
    return out.reshape(-1, *x.shape[1:])


def take_rows(cache: dict, rows: jnp.ndarray) -> dict:
    """The cache of the rows `rows` ([S, n] indices into its R rows, `take_local`), each row
    with its own copy of its prompt's part: row i's prompt is group i // J."""
    groups = rows // (cache["own"][0][0].shape[0] // cache["shared_mask"].shape[0])
    return _constrain(
        {
            "shared": jax.tree.map(lambda x: take_local(x, groups), cache["shared"]),
            "shared_mask": take_local(cache["shared_mask"], groups),
            "own": jax.tree.map(lambda x: take_local(x, rows), cache["own"]),
        }
    )
