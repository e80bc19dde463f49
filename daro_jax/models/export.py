"""Export a `Model` to an HF checkpoint directory that transformers loads as it is, and a
LoRA policy's adapters alone in PEFT's layout.

`export` writes config.json (a transformers config class built from our `ModelConfig`),
safetensors shards of at most `max_shard_bytes` (with model.safetensors.index.json when
there are several) and the tokenizer files; a model with LoRA adapters is written merged,
W + s·B·A (`lora.merged`). `export_adapters` writes adapter_config.json and
adapter_model.safetensors (lora_A.weight [r, in], lora_B.weight [out, r] of each targeted
`model.layers.{i}.<module>`, scaling lora_alpha / r), which `peft.PeftModel.from_pretrained`
loads on the base model. Every process takes part in gathering the sharded params; process
0 alone writes.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import transformers
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from daro_jax.models import hf_io, lora
from daro_jax.models.config import ModelConfig

_CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def hf_config(cfg: ModelConfig, dtype: str | None = None):
    """The transformers config of `cfg` (inverse of `ModelConfig.from_hf` on its fields)."""
    if cfg.model_type == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(
            f"llama has one attention_bias for q/k/v/o; got qkv_bias={cfg.qkv_bias}, "
            f"o_bias={cfg.o_bias}."
        )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    eos = list(cfg.eos_token_ids)
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos or None,
        dtype=dtype or cfg.param_dtype,
    )
    if cfg.model_type == "llama":
        fields["attention_bias"] = cfg.qkv_bias
    else:
        fields["use_sliding_window"] = False
    return _CONFIG_CLASSES[cfg.model_type](**fields)


def _host(x: jax.Array) -> np.ndarray:
    """The whole array on every process's host (all processes must call this)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(params: dict, cfg: ModelConfig, dtype: str | None = None):
    """Yield (HF name, array) for every tensor, in our params' order, cast to `dtype`."""
    for rule in hf_io.tensor_rules(cfg):
        leaf = params
        for key in rule.path:
            leaf = leaf[key]
        full = _host(leaf)
        if dtype is not None:
            full = full.astype(np.dtype(jax.numpy.dtype(dtype)))
        if rule.stacked:
            for i, layer in enumerate(full):
                yield rule.hf_name.format(i=i), hf_io.to_hf(rule, layer)
        else:
            yield rule.hf_name, hf_io.to_hf(rule, full)


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, int]:
    """Shard number of every HF tensor: greedy, in writing order, ≤ max_shard_bytes each."""
    plan, shard, total = {}, 0, 0
    for name, nbytes in sizes.items():
        if total and total + nbytes > max_shard_bytes:
            shard, total = shard + 1, 0
        plan[name] = shard
        total += nbytes
    return plan


def export(model, directory: str, dtype: str | None = None, max_shard_bytes: int = 2**31) -> str:
    """Write `model` as an HF checkpoint into `directory` (created); returns `directory`.

    dtype: storage dtype of the tensors (default: the params' dtype). Each shard is written
    as soon as its tensors are gathered, so host memory holds one leaf and one shard.
    """
    cfg, params = model.config, model.params
    if cfg.lora_rank:
        cfg, params = cfg.replace(lora_rank=0, lora_targets=()), lora.merged(params, cfg)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(directory, exist_ok=True)
        hf_config(cfg, dtype).save_pretrained(directory)
        model.tokenizer.save_pretrained(directory)
    itemsize = jax.numpy.dtype(dtype or cfg.param_dtype).itemsize
    sizes = {n: math.prod(s) * itemsize for n, s in hf_io.expected_tensors(cfg).items()}
    plan = _shard_plan(sizes, max_shard_bytes)
    count = max(plan.values()) + 1
    files = [
        hf_io.SINGLE_FILE if count == 1 else f"model-{n + 1:05d}-of-{count:05d}.safetensors"
        for n in range(count)
    ]
    last_of_shard = {n: name for name, n in plan.items()}
    shard: dict[str, np.ndarray] = {}
    for name, array in hf_tensors(params, cfg, dtype):
        shard[name] = array
        if last_of_shard[plan[name]] == name:
            if writer:
                save_file(shard, os.path.join(directory, files[plan[name]]), {"format": "np"})
            shard = {}
    if writer and count > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: files[n] for name, n in plan.items()},
        }
        with open(os.path.join(directory, hf_io.INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    multihost_utils.sync_global_devices(f"export {directory}")
    return directory


def peft_tensors(params: dict, cfg: ModelConfig):
    """Yield (PEFT tensor name, float32 array) of every adapter of `params`, layer by layer:
    lora_A [r, in] and lora_B [out, r] of HF module `model.layers.{i}.<module>`."""
    for name in cfg.lora_targets:
        (group, proj), module = lora.PROJECTIONS[name]
        leaves = params["layers"][group][proj]
        a, b = (_host(leaves[n]).astype(np.float32) for n in ("lora_a", "lora_b"))
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            yield f"{prefix}.lora_A.weight", a[i].reshape(cfg.lora_rank, -1)
            yield f"{prefix}.lora_B.weight", b[i].reshape(-1, cfg.lora_rank)


def export_adapters(model, directory: str, base_path: str) -> str:
    """Write the LoRA adapters of `model` into `directory` in PEFT's layout (module
    docstring), naming `base_path` (an HF checkpoint directory or hub id) as the base;
    returns `directory`."""
    cfg = model.config
    if not cfg.lora_rank:
        raise ValueError("export_adapters: the model has no LoRA adapters (model.lora.rank=0).")
    tensors = dict(peft_tensors(model.params, cfg))
    targets = cfg.lora_targets
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_path,
            "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "target_modules": sorted(lora.PROJECTIONS[n][1].split(".")[-1] for n in targets),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
        }
        with open(os.path.join(directory, PEFT_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(directory, PEFT_WEIGHTS), {"format": "pt"})
    multihost_utils.sync_global_devices(f"export_adapters {directory}")
    return directory
