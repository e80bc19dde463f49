"""GGUF files (llama.cpp): the metadata as a transformers config and tokenizer, and the
tensors dequantised to float32 under their HF names.

Nothing here imports torch (transformers' own GGUF reader does, and the runtime does not
install it): `gguf.GGUFReader` parses the file, `hf_config` builds a `LlamaConfig` /
`Qwen2Config` from llama.cpp's keys, and `tokenizer` hands the vocabulary to transformers'
GGUF→tokenizers converter, which needs only `tokenizers`.

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

import dataclasses
import re
from typing import Any

import gguf
import numpy as np
import transformers
from gguf.quants import dequantize
from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_gguf_tokenizer

from daro_jax.models.config import UnsupportedConfigError
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


@dataclasses.dataclass(frozen=True)
class Metadata:
    """A GGUF file's key/value metadata, values decoded to Python, and its tensor names."""

    path: str
    fields: dict[str, Any]
    tensor_names: tuple[str, ...]

    def require(self, key: str):
        if key not in self.fields:
            raise CheckpointError(f"GGUF {self.path}: the metadata lacks {key!r}.")
        return self.fields[key]

    def architecture(self) -> str:
        """general.architecture, refused unless it is one of SUPPORTED_ARCHITECTURES."""
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"GGUF {self.path}: general.architecture={arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        return arch


def _metadata(reader: gguf.GGUFReader, path: str) -> Metadata:
    fields = {key: field.contents() for key, field in reader.fields.items()}
    return Metadata(path, fields, tuple(t.name for t in reader.tensors))


def read_metadata(path: str) -> Metadata:
    """The metadata of the GGUF file at `path` (its tensors are not read)."""
    return _metadata(gguf.GGUFReader(path), path)


def hf_config(meta: Metadata) -> transformers.PreTrainedConfig:
    """The `LlamaConfig` / `Qwen2Config` that llama.cpp's `{arch}.*` keys describe.

    embedding_length → hidden_size, feed_forward_length → intermediate_size, block_count →
    num_hidden_layers, attention.head_count / head_count_kv → num_attention_heads /
    num_key_value_heads, attention.layer_norm_rms_epsilon → rms_norm_eps, context_length →
    max_position_embeddings, rope.freq_base → rope_theta (llama.cpp's 10000 when absent),
    vocab_size (else the token count); head_dim = attention.key_length, else hidden_size /
    head_count. tie_word_embeddings: no `output.weight` tensor (llama.cpp writes the output
    matrix only when it differs from the embedding). Llama's attention_bias: the file has
    attn_q biases. bos/eos/pad ids from tokenizer.ggml.*. RoPE scaling (a
    rope.scaling.type other than "none", or Llama 3's `rope_freqs` factors) and a rotary
    width other than head_dim are refused by name.
    """
    arch = meta.architecture()
    fields = meta.fields

    def key(name: str):
        return meta.require(f"{arch}.{name}")

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // heads))
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedConfigError(
            f"GGUF {meta.path}: {arch}.rope.scaling.type={scaling!r} is not supported."
        )
    if "rope_freqs.weight" in meta.tensor_names:
        raise UnsupportedConfigError(
            f"GGUF {meta.path} scales RoPE by per-frequency factors (tensor rope_freqs, "
            "Llama 3.1-style), which are not read from GGUF; load the safetensors checkpoint."
        )
    rotary = int(fields.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise UnsupportedConfigError(
            f"GGUF {meta.path}: {arch}.rope.dimension_count={rotary} rotates part of each "
            f"head (head_dim={head_dim}); only full-width RoPE is supported."
        )
    vocab = fields.get(f"{arch}.vocab_size") or len(meta.require("tokenizer.ggml.tokens"))
    common = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        },
        tie_word_embeddings="output.weight" not in meta.tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "llama":
        bias = any(name.endswith(".attn_q.bias") for name in meta.tensor_names)
        return transformers.LlamaConfig(**common, head_dim=head_dim, attention_bias=bias)
    if head_dim != hidden // heads:
        raise UnsupportedConfigError(
            f"GGUF {meta.path}: {arch}.attention.key_length={head_dim} differs from "
            f"embedding_length / head_count = {hidden // heads}, which Qwen2 assumes."
        )
    return transformers.Qwen2Config(**common)


_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _renamed(fields: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """{new name: fields["tokenizer." + key]} for the keys of `renames` the file has."""
    keys = {new: f"tokenizer.{k}" for k, new in renames.items()}
    return {new: fields[k] for new, k in keys.items() if k in fields}


def tokenizer(meta: Metadata) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer that the metadata's `tokenizer.*` keys describe.

    The vocabulary (tokenizer.ggml.model, .pre, .tokens, .merges or .scores, .token_type)
    goes through transformers' GGUF converter, which picks the model (byte-level BPE for
    "gpt2", SentencePiece BPE for "llama"), the pre-tokenizer split for .pre, and adds
    control tokens as special and user-defined ones as plain added tokens. The wrapper gets
    the chat template, add_bos/eos_token (BOS by default for a SentencePiece vocabulary, as
    llama.cpp does), and bos/eos/unk/pad spelled from their ids.
    """
    fields = meta.fields
    tokens = meta.require("tokenizer.ggml.tokens")
    mapping = hf_gguf_tokenizer.GGUF_TOKENIZER_MAPPING
    vocabulary = _renamed(fields, mapping["tokenizer"])
    options = _renamed(fields, mapping["tokenizer_config"])
    if vocabulary.get("tokenizer_type") == "llama":
        options.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        options[name] = tokens[fields[key]] if key in fields else None
    try:
        backend, extra = hf_gguf_tokenizer.convert_gguf_tokenizer(
            meta.require("general.architecture"), vocabulary
        )
    except ValueError as e:
        raise CheckpointError(f"GGUF {meta.path}: cannot build its tokenizer ({e}).") from e
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=meta.path, **options, **extra
    )


def read_tensors(path: str) -> ArraySource:
    """All tensors of a GGUF file, dequantised to float32, in HF names and layouts.

    Names the pattern table does not know are kept as they are, so the loader's tensor
    check reports them as unexpected.
    """
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader, path)
    arch = meta.architecture()
    n_heads = {
        "q": int(meta.require(f"{arch}.attention.head_count")),
        "k": int(meta.require(f"{arch}.attention.head_count_kv")),
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
