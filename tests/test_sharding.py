"""daro_jax.sharding: meshes from config, Flax logical-axis rules, indivisible dimensions,
activation constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from daro_jax import sharding


@pytest.mark.parametrize(
    "shape,expected",
    [((1, -1, 1), (1, 8, 1)), ((2, 2, 2), (2, 2, 2)), ((-1, 1, 2), (4, 1, 2)), ((8, 1, 1),) * 2],
)
def test_make_mesh_fills_the_rest(shape, expected):
    mesh = sharding.make_mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == expected
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize(
    "shape,message",
    [
        ((3, 2, 2), "needs 12 devices but 8 are available"),
        ((1, 1, 1), "needs 1 devices but 8"),
        ((3, -1, 1), "8 devices are not divisible by 3"),
        ((2, 4), "must have 3 entries"),
        ((-1, -1, 2), "at most one −1"),
        ((0, 8, 1), "sizes must be ≥ 1"),
    ],
)
def test_make_mesh_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_logical_spec_maps_names_through_the_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    spec = sharding.logical_spec
    # batch takes data × fsdp, so embed cannot reuse fsdp in the same array.
    assert spec(("batch", "length", "embed"), (8, 5, 64), mesh) == P(("data", "fsdp"), None, None)
    assert spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == P(
        None, "fsdp", "tensor", None
    )
    assert spec(("vocab", "embed"), (320, 64), mesh) == P("tensor", "fsdp")


def test_indivisible_dimension_is_an_error_or_an_explicit_logged_replication(caplog):
    mesh = sharding.make_mesh((2, 2, 2))
    spec = sharding.logical_spec
    with pytest.raises(
        ValueError,
        match=r"wq: dimension 2 \('heads', size 9\) is not divisible by mesh axes "
        r"\('tensor',\) of 2 devices",
    ):
        spec(("layers", "embed", "heads", "head_dim"), (2, 64, 9, 8), mesh, what="wq")
    # batch 6 over data × fsdp = 4 devices: an error, or replicated when the caller opts in.
    with pytest.raises(ValueError, match=r"dimension 0 \('batch', size 6\)"):
        spec(("batch", "length"), (6, 3), mesh)
    with caplog.at_level("WARNING"):
        out = spec(("batch", "length"), (6, 3), mesh, what="prompts", replicate_indivisible=True)
    assert out == P(None, None)
    assert "prompts: dimension 0 ('batch', size 6)" in caplog.text and "replicated" in caplog.text
    # heads and mlp both map to tensor: the earlier rule (heads) takes it.
    assert spec(("mlp", "heads"), (4, 8), mesh) == P(None, "tensor")


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
        sharding.logical_spec(("experts",), (8,), sharding.make_mesh((1, 8, 1)))


def test_rule_naming_an_unknown_mesh_axis_is_an_error():
    mesh = sharding.make_mesh((1, 8, 1))
    rules = sharding.RULES + (("mlp", "model"),)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        sharding.tree_shardings({"w": P("embed", "mlp")}, {"w": (64, 8)}, mesh, rules)
    with pytest.raises(ValueError, match="names mesh axis 'model'"), sharding.use_mesh(mesh, rules):
        pass


def test_tree_shardings_follow_the_tree_and_name_an_indivisible_leaf():
    mesh = sharding.make_mesh((1, 8, 1))
    axes = {"a": P("embed", "mlp"), "b": {"c": P("norm")}}
    shapes = {"a": (64, 8), "b": {"c": (64,)}}
    out = sharding.tree_shardings(axes, shapes, mesh)
    assert out["a"].is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)
    assert out["b"]["c"] == NamedSharding(mesh, P(None))
    with pytest.raises(ValueError, match=r"^a: dimension 0 \('embed', size 12\)"):
        sharding.tree_shardings(axes, {"a": (12, 8), "b": {"c": (64,)}}, mesh)


def test_constrain_is_identity_outside_a_mesh_and_pins_inside():
    x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    assert sharding.constrain(x, ("batch", "embed")) is x
    mesh = sharding.make_mesh((2, 2, 2))

    with sharding.use_mesh(mesh):
        y = jax.jit(lambda v: sharding.constrain(2 * v, ("batch", "mlp")))(x)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(y, 2 * np.asarray(x))
