"""Model configuration: one frozen dataclass for the Llama 3.x / Qwen2 / SmolLM2 family.

Built from a transformers config object (`from_hf`), so `config.json` is read by the same
code transformers uses; every field we do not implement is refused by name rather than
silently ignored (a silently ignored `rope_theta` is a public bug in a peer project).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from daro_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedConfigError(UserError):
    """A config.json field asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (names follow HF where they exist).

    `rope_scaling` is None or a tuple of (name, value) pairs for the "llama3" scaling
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), kept as
    a tuple so the config is hashable and can be a static jit argument. `remat`: each
    scanned layer under `nn.remat` with the `jax.checkpoint_policies` entry named by
    `remat_policy` (what its forward keeps for the backward pass). `lora_rank` > 0: the
    projections named in `lora_targets` carry LoRA adapters (`models.lora`) scaled by
    lora_alpha / lora_rank, stored in `lora_dtype`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_dtype: str = "float32"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def lora_scale(self) -> float:
        """s = alpha / r of W + s·B·A."""
        return self.lora_alpha / self.lora_rank

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf, dtype: str = "float32", param_dtype: str | None = None) -> ModelConfig:
        """Map a transformers `LlamaConfig` / `Qwen2Config` to ours, refusing what we lack."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config.json field model_type={model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')."
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"config.json field hidden_act={act!r}; only 'silu'.")
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedConfigError("config.json field mlp_bias=true is not supported.")
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedConfigError(
                "config.json field use_sliding_window=true is not supported "
                "(full attention only); set it to false if the window exceeds your lengths."
            )
        layer_types = getattr(hf, "layer_types", None) or ()
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedConfigError(
                f"config.json field layer_types contains {other}; only 'full_attention'."
            )
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        legacy = getattr(hf, "rope_scaling", None)
        if not rope and legacy:
            rope = dict(legacy)
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
        if theta is None:
            raise UnsupportedConfigError("config.json has no rope_theta (nor rope_parameters).")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedConfigError(
                f"config.json field rope_scaling.rope_type={rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        scaling = None
        if rope_type == "llama3":
            keys = (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
            missing = [k for k in keys if k not in rope]
            if missing:
                raise UnsupportedConfigError(
                    f"config.json rope_scaling of type 'llama3' lacks fields {missing}."
                )
            scaling = tuple((k, float(rope[k])) for k in keys)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        eos = hf.eos_token_id
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(theta),
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            max_position_embeddings=int(hf.max_position_embeddings),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
            dtype=dtype,
            param_dtype=param_dtype or dtype,
        )
