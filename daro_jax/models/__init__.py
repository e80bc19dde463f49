"""Decoder models: load checkpoints (HF safetensors, GGUF), run them, export them.

Public API: `load`, `from_config` (the model of a recipe's `model` section), `architecture`
(its config and tokenizer without weights), `abstract_params`, `logits`, `smollm2_gguf_path`,
`export`, `export_adapters`, `Model`.
"""

from daro_jax.models.config import ModelConfig, UnsupportedConfigError
from daro_jax.models.export import export, export_adapters
from daro_jax.models.from_config import architecture, from_config
from daro_jax.models.hf_io import CheckpointError
from daro_jax.models.model import (
    Model,
    abstract_params,
    load,
    logits,
    param_shardings,
    smollm2_gguf_path,
)

__all__ = [
    "CheckpointError",
    "Model",
    "ModelConfig",
    "UnsupportedConfigError",
    "abstract_params",
    "architecture",
    "export",
    "export_adapters",
    "from_config",
    "load",
    "logits",
    "param_shardings",
    "smollm2_gguf_path",
]
