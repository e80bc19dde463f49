"""TPU chips and topologies (daro_jax/plan/chips.py): accelerator names, libtpu's device
descriptions, and a clear failure without libtpu."""

from __future__ import annotations

import importlib.util

import pytest

from daro_jax.plan import chips


@pytest.mark.parametrize(
    ("accelerator", "name"),
    [
        ("v4-8", "v4:2x2x1"),
        ("v4-32", "v4:2x2x4"),
        ("v5p-64", "v5p:2x4x4"),
        ("v5p-128", "v5p:4x4x4"),
        ("v5e-4", "v5e:2x2"),
        ("v5litepod-8", "v5e:2x4"),
        ("v6e-8", "v6e:2x4"),
        ("v6e-32", "v6e:4x8"),
    ],
)
def test_topology_of_an_accelerator(accelerator, name):
    assert chips.topology(accelerator) == name


@pytest.mark.parametrize("accelerator", ["v3-8", "tpu-16", "v4-7", "v5e-6"])
def test_unknown_accelerator_is_a_clear_error(accelerator):
    with pytest.raises(ValueError, match=f"config.tpu.accelerator={accelerator!r}"):
        chips.topology(accelerator)


def test_topologies_have_the_chip_counts():
    """libtpu's own descriptions: v4 chips as one megacore device each."""
    assert len(chips.tpu_devices("v4:2x2x4")) == 16
    assert len(chips.tpu_devices("v5p:2x4x4")) == 32
    assert chips.tpu_devices("v6e:2x4")[0].device_kind.startswith("TPU v6")


def test_missing_libtpu_is_a_clear_failure(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match=r"libtpu, which is not installed.*requirements-test"):
        chips.tpu_devices("v5e:2x2")


@pytest.mark.parametrize("frozen", [False, True])
def test_train_flops_per_token_match_the_compiled_backward(frozen):
    """6 · N FLOPs a token trains the weights; 4 · N when they are frozen (a LoRA base): XLA's
    count of a linear layer's forward and backward, the gradient taken for the input alone
    when the weight is frozen, for the input and the weight otherwise."""
    import jax
    import jax.numpy as jnp

    tokens, d = 64, 256
    x, w = jnp.ones((tokens, d)), jnp.ones((d, d))

    def loss(x, w):
        return jnp.sum(jnp.tanh(x @ w))

    grad = jax.grad(loss, argnums=0 if frozen else (0, 1))
    flops = jax.jit(grad).lower(x, w).compile().cost_analysis()["flops"]
    expected = chips.train_flops_per_token(d * d, frozen=d * d if frozen else 0) * tokens
    assert flops == pytest.approx(expected, rel=0.02)


def test_mfu_is_model_flops_over_peak():
    """MFU: FLOPs per token × tokens over seconds × peak × devices."""
    assert chips.mfu(6e9, 1000, 2.0, 1e12, 4) == pytest.approx(6e12 / 8e12)


def test_topology_devices_are_the_same_objects_at_every_call():
    """Two plans in one process (the search's candidates, `scaled_plan`'s depths, the bench's
    setups) meet the samplers `make_sampler` cached for an equal mesh: its devices must be
    the very objects the next plan's arguments are placed on (libtpu's devices of two
    descriptions are equal but incompatible: "Received incompatible devices for jitted
    computation")."""
    first, again = chips.tpu_devices("v5e:2x2"), chips.tpu_devices("v5e:2x2")
    assert all(a is b for a, b in zip(first, again, strict=True)) and len(first) == 4
