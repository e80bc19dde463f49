"""The train state (daro_jax/train/state.py): its abstract form is the state that is built."""

import jax
from helpers import tiny_config

from daro_jax.train import loop, state


def test_the_built_state_is_the_abstract_state():
    """The state `build` puts on the devices has the structure, shapes, dtypes and
    shardings of `state.abstract_state`: what the update compiles for, what a checkpoint is
    restored onto and what the TPU plan compiles on."""
    config = tiny_config(**{"algo.name": "daro"})
    run = loop.build(config)
    abstract = state.abstract_state(config, run.model.config, run.spec, run.mesh)
    built = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), run.state)
    want = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), abstract)
    assert jax.tree.structure(built) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(built), jax.tree.leaves(want), strict=True):
        assert got == expected
    specs = {x.sharding.spec for x in jax.tree.leaves(run.state["params"]["model"])}
    assert any(any(axis is not None for axis in spec) for spec in specs)  # some leaf is split
