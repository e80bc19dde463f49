"""The model a recipe's `model` section names: one loader for training and evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from daro_jax.models import lora
from daro_jax.models.model import Model, abstract_params, load, param_shardings, read_architecture


def lora_rank(section: ConfigDict | Mapping) -> int:
    """model.lora.rank of a `model` section (0 when it has no lora section: a config saved
    before LoRA existed)."""
    return int(ConfigDict(section).get("lora", ConfigDict({"rank": 0})).get("rank", 0))


def with_adapters(model: Model, section: ConfigDict, seed: int) -> Model:
    """`model` with fresh LoRA adapters (`lora.init_adapters` with key(seed)) per
    `section.lora`, or unchanged when its rank is 0."""
    if not lora_rank(section):
        return model
    cfg = lora.configure(model.config, section.lora)
    shardings = lora.split(param_shardings(cfg, model.mesh))[1]
    adapters = lora.init_adapters(cfg, jax.random.key(seed), shardings)
    return dataclasses.replace(model, config=cfg, params=lora.combine(model.params, adapters))


def from_config(
    section: ConfigDict | Mapping, mesh: Mesh, *, seed: int, abstract: bool = False
) -> Model:
    """`models.load` of a config's `model` section: path, dtype, param_dtype, init_random
    (random N(0, 0.02²) params drawn with `seed`) and arch_overrides, with LoRA adapters
    when lora.rank > 0 (`with_adapters`; the base then held in the compute dtype, `dtype`).
    `section` is the ConfigDict or the plain dict a checkpoint's meta stores.

    abstract=True: the params are `models.abstract_params` on `mesh` (nothing is read,
    allocated or compiled; the tokenizer and config are read as usual), e.g. the target of
    a checkpoint restore.
    """
    m = ConfigDict(section)
    param_dtype = m.dtype if lora_rank(m) else m.param_dtype
    options = dict(param_dtype=param_dtype, seed=seed, overrides=m.arch_overrides.to_dict())
    if not abstract:
        model = load(m.path, m.dtype, mesh, random_init=m.init_random, **options)
        return with_adapters(model, m, seed)
    shell = load(m.path, m.dtype, mesh, abstract=True, **options)
    if not lora_rank(m):
        return shell
    cfg = lora.configure(shell.config, m.lora)
    return dataclasses.replace(shell, config=cfg, params=abstract_params(cfg, mesh))


def architecture(section: ConfigDict | Mapping, layers: int = 0):
    """(ModelConfig, tokenizer or None) of a config's `model` section as `from_config`
    makes it (its dtypes, arch_overrides and LoRA adapters), without reading weights
    (`model.read_architecture`: the paper models from `models.known`, with no tokenizer);
    cut to its first `layers` layers when given (the mesh search)."""
    m = ConfigDict(section)
    param_dtype = m.dtype if lora_rank(m) else m.param_dtype
    overrides = m.arch_overrides.to_dict() | ({"num_hidden_layers": layers} if layers else {})
    cfg, tokenizer = read_architecture(m.path, m.dtype, param_dtype, overrides)
    return (lora.configure(cfg, m.lora) if lora_rank(m) else cfg), tokenizer
