"""LoRA adapters on the decoder's projections: the policy W + s·B·A, s = alpha / r.

A targeted projection (`layers.Linear`; targets among q, k, v, o, gate, up, down) with HF
weight W [out, in] gets A "lora_a" [r, *in] and B "lora_b" [*out, r] beside its kernel
(stacked over the layers like it, each axis with its logical name, "lora_rank" replicated),
and computes x·Wᵀ + s·(x·Aᵀ)·Bᵀ. B starts at zero, so the adapted model starts as the base
model exactly. In training the base params are frozen in the compute dtype and held apart
from the train state, whose "model" entry is the adapters alone (`split`, `combine`); only
the adapters get gradients, optimizer state and checkpoints.

`merged` folds the adapters into the kernels (W + s·B·A in float32, cast to W's dtype): what
`models.export` writes for transformers; `models.export_adapters` writes the adapters alone
in PEFT's layout. `base_digest` names a base by a hash of a few of its values (a resumed
run checks it).

Entry points: `configure`, `targets`, `split`, `combine`, `merged`, `init_adapters`,
`base_digest`, `base_meta`, `PROJECTIONS`.
"""

from __future__ import annotations

import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from daro_jax.models import decoder
from daro_jax.models.config import ModelConfig

ADAPTERS = ("lora_a", "lora_b")
# Our projection → its place in the params (under "layers") and its HF module name.
PROJECTIONS = {
    "q": (("attn", "q"), "self_attn.q_proj"),
    "k": (("attn", "k"), "self_attn.k_proj"),
    "v": (("attn", "v"), "self_attn.v_proj"),
    "o": (("attn", "o"), "self_attn.o_proj"),
    "gate": (("mlp", "gate"), "mlp.gate_proj"),
    "up": (("mlp", "up"), "mlp.up_proj"),
    "down": (("mlp", "down"), "mlp.down_proj"),
}
DTYPES = ("float32", "bfloat16")


def targets(pattern: str) -> tuple[str, ...]:
    """The projections a `model.lora.targets` value names: comma-separated regexes, each
    fully matching one or more of q, k, v, o, gate, up, down ("q,v", "q|k|v|o", ".*")."""
    names = []
    for part in str(pattern).split(","):
        try:
            regex = re.compile(part.strip())
        except re.error as err:
            raise ValueError(f"config.model.lora.targets: bad regex {part!r}: {err}.") from err
        hits = [name for name in PROJECTIONS if regex.fullmatch(name)]
        if not hits:
            raise ValueError(
                f"config.model.lora.targets: {part.strip()!r} matches none of {tuple(PROJECTIONS)}."
            )
        names += [name for name in hits if name not in names]
    return tuple(name for name in PROJECTIONS if name in names)


def configure(cfg: ModelConfig, section) -> ModelConfig:
    """`cfg` with the adapters of a `model.lora` section (rank, alpha, targets, dtype);
    unchanged for rank 0. Each bad field is a ValueError naming it."""
    rank, alpha, dtype = section.rank, section.alpha, section.dtype
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"config.model.lora.rank={rank!r}: need an int >= 0 (0 = off).")
    if rank == 0:
        return cfg
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise ValueError(f"config.model.lora.alpha={alpha!r}: need a number > 0.")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.lora.dtype={dtype!r} is not one of {DTYPES}.")
    return cfg.replace(
        lora_rank=rank,
        lora_alpha=float(alpha),
        lora_targets=targets(section.targets),
        lora_dtype=dtype,
    )


def _is_adapter(path) -> bool:
    return getattr(path[-1], "key", None) in ADAPTERS


def _partition(params: dict, keep_adapters: bool) -> dict:
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            part = _partition(value, keep_adapters)
            if part:
                out[name] = part
        elif (name in ADAPTERS) == keep_adapters:
            out[name] = value
    return out


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the params without the lora_a / lora_b leaves, and those leaves
    alone (same nesting)."""
    return _partition(params, False), _partition(params, True)


def combine(base: dict | None, adapters: dict) -> dict:
    """The params of the adapted model: `base` and `adapters` nested together (no copy);
    `adapters` itself when `base` is None (no LoRA: the trained params are the model)."""
    if base is None:
        return adapters
    out = dict(base)
    for name, value in adapters.items():
        out[name] = combine(base[name], value) if isinstance(value, dict) else value
    return out


def _delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """s·B·A [*out, *in] of one layer's A [r, *in], B [*out, r], in float32."""
    return scale * jnp.tensordot(b.astype(jnp.float32), a.astype(jnp.float32), axes=1)


def merged(params: dict, cfg: ModelConfig) -> dict:
    """The base params (no adapter leaves) with every targeted kernel W replaced by
    W + s·B·A, summed in float32 and cast to W's dtype."""
    base, _ = split(params)
    layers = dict(base["layers"])
    for name in cfg.lora_targets:
        (group, proj), _ = PROJECTIONS[name]
        leaves = params["layers"][group][proj]
        delta = jax.vmap(_delta, (0, 0, None))(leaves["lora_a"], leaves["lora_b"], cfg.lora_scale)
        kernel = leaves["kernel"]
        new = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        layers[group] = dict(layers[group]) | {proj: dict(layers[group][proj]) | {"kernel": new}}
    return dict(base) | {"layers": layers}


def init_adapters(cfg: ModelConfig, key: jax.Array, shardings: dict) -> dict:
    """The adapters of a random init of `cfg` (A uniform, B zeros), placed on `shardings`
    (the adapter part of `models.param_shardings`); the base part of the init is traced
    but not returned, so it is never computed."""
    init = jax.jit(lambda key: split(decoder.init_params(cfg, key))[1], out_shardings=shardings)
    return init(key)


DIGEST_VALUES = 16  # values read from each leaf of the base for `base_digest`


def base_digest(base: dict) -> str:
    """sha256 of every base leaf's path, shape, dtype and its first DIGEST_VALUES values
    along the last axis at index 0 of the others (exact values: the same for any mesh).
    Any fine-tuned or different checkpoint changes it."""

    def head(w):
        return w[(0,) * (w.ndim - 1)][:DIGEST_VALUES].astype(jnp.float32)

    leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    mesh = getattr(leaves[0][1].sharding, "mesh", None)
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    heads = jax.jit(lambda ws: [head(w) for w in ws], out_shardings=out)([w for _, w in leaves])
    sha = hashlib.sha256()
    for (path, w), values in zip(leaves, heads, strict=True):
        sha.update(f"{jax.tree_util.keystr(path)} {w.shape} {w.dtype};".encode())
        sha.update(np.asarray(values).tobytes())
    return sha.hexdigest()


def base_meta(path: str, base: dict) -> dict:
    """What a LoRA checkpoint's meta records of its base: {"path": model.path, "digest":
    `base_digest`} (`checkpoint.check_base` compares them)."""
    return {"path": path, "digest": base_digest(base)}
