"""GGUF files (llama.cpp): tensors dequantised to float32 under their HF names.

llama.cpp computes RoPE on adjacent pairs (x[2i], x[2i+1]) for the "llama" architecture,
while HF rotates halves (x[i], x[i + Dh/2]). Its converter therefore reorders the rows of
each head of the Q and K projections: HF row j = s·(Dh/2) + i of a head (half s ∈ {0, 1},
pair i) is stored at row 2i + s. We undo it by viewing each head's rows as [Dh/2, 2] and
swapping to [2, Dh/2]. Q uses the query head count, K the key/value head count. Qwen2's
GGUF keeps HF's rotate-half layout (NeoX RoPE in llama.cpp), so its rows are left as is.

The whole file is dequantised in host memory (float32): meant for small models such as
the embedded SmolLM2-135M; large checkpoints should be read from safetensors.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
from gguf.quants import dequantize

from daro_jax.models.hf_io import ArraySource, CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_ROPE_PERMUTED = ("llama",)

_T = gguf.MODEL_TENSOR
_HF_NAMES = {
    _T.TOKEN_EMBD: "model.embed_tokens",
    _T.OUTPUT_NORM: "model.norm",
    _T.OUTPUT: "lm_head",
    _T.ATTN_NORM: "model.layers.{bid}.input_layernorm",
    _T.FFN_NORM: "model.layers.{bid}.post_attention_layernorm",
    _T.ATTN_Q: "model.layers.{bid}.self_attn.q_proj",
    _T.ATTN_K: "model.layers.{bid}.self_attn.k_proj",
    _T.ATTN_V: "model.layers.{bid}.self_attn.v_proj",
    _T.ATTN_OUT: "model.layers.{bid}.self_attn.o_proj",
    _T.FFN_GATE: "model.layers.{bid}.mlp.gate_proj",
    _T.FFN_UP: "model.layers.{bid}.mlp.up_proj",
    _T.FFN_DOWN: "model.layers.{bid}.mlp.down_proj",
}


def _name_patterns() -> list[tuple[re.Pattern, str, str | None]]:
    """(regex over GGUF names, HF name template, which RoPE head count it uses)."""
    heads = {_T.ATTN_Q: "q", _T.ATTN_K: "k"}
    out = []
    for tensor, hf in _HF_NAMES.items():
        pattern = re.escape(gguf.TENSOR_NAMES[tensor]).replace(r"\{bid\}", r"(?P<bid>\d+)")
        out.append((re.compile(pattern + r"\.(?P<kind>weight|bias)$"), hf, heads.get(tensor)))
    return out


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order (pairs → halves) of a Q/K weight or bias."""
    rows = w.shape[0]
    per_head = rows // n_heads
    return w.reshape(n_heads, per_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise CheckpointError(f"GGUF metadata lacks {key!r}.")
    return field.contents()


def read_tensors(path: str) -> ArraySource:
    """All tensors of a GGUF file, dequantised to float32, in HF names and layouts.

    Names the pattern table does not know are kept as they are, so the loader's tensor
    check reports them as unexpected.
    """
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF {path}: general.architecture={arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    n_heads = {
        "q": int(_field(reader, f"{arch}.attention.head_count")),
        "k": int(_field(reader, f"{arch}.attention.head_count_kv")),
    }
    patterns = _name_patterns()
    arrays = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        name = t.name
        for regex, hf, rope_heads in patterns:
            m = regex.match(t.name)
            if m:
                name = f"{hf.format(**m.groupdict())}.{m.group('kind')}"
                if rope_heads and arch in _ROPE_PERMUTED:
                    w = unpermute_rope_rows(w, n_heads[rope_heads])
                break
        arrays[name] = w
    return ArraySource(arrays)
