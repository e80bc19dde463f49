"""Decoder models: load checkpoints (HF safetensors, GGUF), run them, export them.

Public API: `load`, `logits`, `smollm2_gguf_path`, `export`, `Model`.
"""

from daro_jax.models.config import ModelConfig, UnsupportedConfigError
from daro_jax.models.export import export
from daro_jax.models.hf_io import CheckpointError
from daro_jax.models.model import Model, load, logits, param_shardings, smollm2_gguf_path

__all__ = [
    "CheckpointError",
    "Model",
    "ModelConfig",
    "UnsupportedConfigError",
    "export",
    "load",
    "logits",
    "param_shardings",
    "smollm2_gguf_path",
]
