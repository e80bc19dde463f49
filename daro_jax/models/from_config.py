"""The model a recipe's `model` section names: one loader for training and evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from daro_jax.models.model import Model, load, param_shardings


def from_config(
    section: ConfigDict | Mapping, mesh: Mesh, *, seed: int, abstract: bool = False
) -> Model:
    """`models.load` of a config's `model` section: path, dtype, param_dtype, init_random
    (random N(0, 0.02²) params drawn with `seed`) and arch_overrides. `section` is the
    ConfigDict or the plain dict a checkpoint's meta stores.

    abstract=True: the params are `jax.ShapeDtypeStruct`s carrying their shardings on
    `mesh` (`jax.eval_shape` of a random init: nothing is read, allocated or compiled;
    the tokenizer and config are read as usual), e.g. the target of a checkpoint restore.
    """
    m = ConfigDict(section)
    options = dict(param_dtype=m.param_dtype, seed=seed, overrides=m.arch_overrides.to_dict())
    if not abstract:
        return load(m.path, m.dtype, mesh, random_init=m.init_random, **options)
    loaded = {}

    def params():
        model = load(m.path, m.dtype, mesh, random_init=True, **options)
        loaded["shell"] = dataclasses.replace(model, params=None)
        return model.params

    shapes = jax.eval_shape(params)
    shell = loaded["shell"]
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        param_shardings(shell.config, mesh),
    )
    return dataclasses.replace(shell, params=target)
