"""Hugging Face tensor names ↔ our params tree, and checkpoint reading placed on shardings.

Each of our leaves comes from one HF tensor per layer (stacked leaves) or one HF tensor
(embed, final_norm, lm_head). Ours keep HF's [out, in] order with `out` (or `in`) split
row-major into named axes, e.g.

    layers/attn/q/kernel[l, h, k, d] = model.layers.{l}.self_attn.q_proj.weight[h · Dh + k, d]
    layers/attn/o/kernel[l, d, h, k] = model.layers.{l}.self_attn.o_proj.weight[d, h · Dh + k]

A `TensorRule` records, for every dimension of our per-layer array, which HF dimension it
comes from; reading an arbitrary block of our array then becomes one contiguous slice of
the HF tensor (`safe_open(...).get_slice`), a reshape, a sub-slice and a transpose. Loading
with `jax.make_array_from_callback` reads only the block each device holds, so no host
ever holds an unsharded copy of a large stacked weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import numpy as np
from safetensors import safe_open

from daro_jax.errors import UserError
from daro_jax.models import decoder
from daro_jax.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(UserError):
    """A checkpoint's tensors do not match the model config (missing, extra, wrong shape)."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Where one of our leaves comes from.

    path: the leaf's keys in the params pytree, e.g. ("layers", "attn", "q", "kernel").
    hf_name: the HF tensor name; "{i}" stands for the layer index of stacked leaves.
    source_dims: for each dimension of our (per-layer) array, the HF dimension it comes
        from; dimensions taken from the same HF dimension split it row-major, in our order.
    """

    path: tuple[str, ...]
    hf_name: str
    source_dims: tuple[int, ...]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"


_LAYER_RULES = {
    ("attn_norm", "scale"): ("input_layernorm.weight", (0,)),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", (0,)),
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", (0, 0, 1)),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", (0, 0, 1)),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", (0, 0, 1)),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", (0, 1, 1)),
    ("attn", "q", "bias"): ("self_attn.q_proj.bias", (0, 0)),
    ("attn", "k", "bias"): ("self_attn.k_proj.bias", (0, 0)),
    ("attn", "v", "bias"): ("self_attn.v_proj.bias", (0, 0)),
    ("attn", "o", "bias"): ("self_attn.o_proj.bias", (0,)),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", (0, 1)),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", (0, 1)),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", (0, 1)),
}
_TOP_RULES = {
    ("embed", "embedding"): ("model.embed_tokens.weight", (0, 1)),
    ("final_norm", "scale"): ("model.norm.weight", (0,)),
    ("lm_head",): ("lm_head.weight", (0, 1)),
}
_LM_HEAD = "lm_head.weight"


def tensor_rules(cfg: ModelConfig) -> list[TensorRule]:
    """One rule per leaf of `decoder.param_shapes(cfg)`, in its order."""
    rules = []
    for path, _ in jax.tree_util.tree_flatten_with_path(decoder.param_shapes(cfg), _is_shape)[0]:
        keys = tuple(k.key for k in path)
        if keys[0] == "layers":
            name, dims = _LAYER_RULES[keys[1:]]
            rules.append(TensorRule(keys, f"model.layers.{{i}}.{name}", dims))
        else:
            rules.append(TensorRule(keys, *_TOP_RULES[keys]))
    return rules


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _leaf(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _hf_order(rule: TensorRule) -> list[int]:
    """Our dimensions sorted by the HF dimension they come from (stable)."""
    return sorted(range(len(rule.source_dims)), key=lambda j: (rule.source_dims[j], j))


def hf_shape(rule: TensorRule, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF shape of one layer's tensor, given our per-layer `shape`."""
    n = max(rule.source_dims) + 1
    return tuple(
        math.prod(s for s, d in zip(shape, rule.source_dims, strict=True) if d == i)
        for i in range(n)
    )


def to_hf(rule: TensorRule, ours: np.ndarray) -> np.ndarray:
    """Our per-layer array → the HF tensor (inverse of `read_block` on the full range)."""
    return np.ascontiguousarray(ours.transpose(_hf_order(rule))).reshape(hf_shape(rule, ours.shape))


def read_block(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    rule: TensorRule,
    shape: tuple[int, ...],
    index: tuple[slice, ...],
) -> np.ndarray:
    """Block `index` (one slice per dimension) of our per-layer array of `shape`.

    `read(hf_slices)` returns that slice of the HF tensor. For each HF dimension, the
    first of our dimensions split from it selects a contiguous HF range; the others are
    read in full and sub-sliced here.
    """
    order = _hf_order(rule)
    bounds = [idx.indices(size)[:2] for idx, size in zip(index, shape, strict=True)]
    hf_slices, block_shape, sub = [], [], []
    for hf_dim in range(max(rule.source_dims) + 1):
        group = [j for j in order if rule.source_dims[j] == hf_dim]
        inner = math.prod(shape[j] for j in group[1:])
        start, stop = bounds[group[0]]
        hf_slices.append(slice(start * inner, stop * inner))
        block_shape += [stop - start] + [shape[j] for j in group[1:]]
        sub += [slice(None)] + [slice(*bounds[j]) for j in group[1:]]
    block = read(tuple(hf_slices)).reshape(block_shape)[tuple(sub)]
    return block.transpose(np.argsort(order))


class TensorSource(Protocol):
    """A checkpoint's tensors by HF name."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


@dataclasses.dataclass
class ArraySource:
    """Tensors already in host memory (e.g. dequantised GGUF)."""

    arrays: dict[str, np.ndarray]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.arrays.items()}

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.arrays[name][index]


class SafetensorsSource:
    """The safetensors files of an HF directory, opened lazily (memory-mapped slices)."""

    def __init__(self, directory: str, stack: contextlib.ExitStack):
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            weight_map = None
        else:
            raise CheckpointError(
                f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors "
                "checkpoints are read (convert .bin files with transformers' save_pretrained)."
            )
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        handles = {
            f: stack.enter_context(safe_open(os.path.join(directory, f), framework="numpy"))
            for f in files
        }
        if weight_map is None:
            weight_map = dict.fromkeys(handles[SINGLE_FILE].keys(), SINGLE_FILE)
        self._slices = {name: handles[f].get_slice(name) for name, f in weight_map.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(s.get_shape()) for k, s in self._slices.items()}

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._slices[name][index]


@contextlib.contextmanager
def open_safetensors(directory: str) -> Iterator[SafetensorsSource]:
    """`SafetensorsSource` of `directory`, its files closed on exit."""
    with contextlib.ExitStack() as stack:
        yield SafetensorsSource(directory, stack)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config needs, with its shape, in `tensor_rules` order."""
    shapes = decoder.param_shapes(cfg)
    out = {}
    for rule in tensor_rules(cfg):
        shape = _leaf(shapes, rule.path)
        if rule.stacked:
            for i in range(shape[0]):
                out[rule.hf_name.format(i=i)] = hf_shape(rule, shape[1:])
        else:
            out[rule.hf_name] = hf_shape(rule, shape)
    return out


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(source: TensorSource, cfg: ModelConfig, where: str) -> None:
    """Fail, naming them, on missing, unexpected or wrongly shaped tensors.

    Harmless extras are ignored: rotary inverse-frequency buffers, and `lm_head.weight`
    when embeddings are tied (transformers ties it to the embedding on load too).
    """
    expected, found = expected_tensors(cfg), source.shapes()
    ignored = {n for n in found if n.endswith(HARMLESS_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignored |= {_LM_HEAD} & set(found)
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys() - ignored
    wrong = [
        f"{n}: {found[n]} in the checkpoint, {expected[n]} expected"
        for n in sorted(expected.keys() & found.keys())
        if tuple(found[n]) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match its config "
            f"(model_type={cfg.model_type}, {cfg.num_layers} layers): " + " | ".join(problems)
        )


def load_params(source: TensorSource, cfg: ModelConfig, shardings: dict) -> dict:
    """The params pytree, each leaf built on its sharding from the blocks its devices hold.

    Blocks are read with `read_block` (one contiguous slice per layer and HF tensor) and
    cast to `cfg.param_dtype`; devices holding the same block share one read.
    """
    shapes = decoder.param_shapes(cfg)
    dtype = cfg.weight_dtype

    def build(rule: TensorRule) -> jax.Array:
        shape = _leaf(shapes, rule.path)
        done: dict[tuple, np.ndarray] = {}

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            key = tuple(idx.indices(size) for idx, size in zip(index, shape, strict=True))
            if key not in done:
                if rule.stacked:
                    inner = index[1:]
                    blocks = [
                        read_block(
                            lambda s, i=i: source.read(rule.hf_name.format(i=i), s),
                            rule,
                            shape[1:],
                            inner,
                        )
                        for i in range(*key[0])
                    ]
                    block = np.stack(blocks)
                else:
                    block = read_block(lambda s: source.read(rule.hf_name, s), rule, shape, index)
                done[key] = block.astype(dtype)
            return done[key]

        return jax.make_array_from_callback(shape, _leaf(shardings, rule.path), callback)

    params: dict = {}
    for rule in tensor_rules(cfg):
        parent = params
        for key in rule.path[:-1]:
            parent = parent.setdefault(key, {})
        parent[rule.path[-1]] = build(rule)
    return params
