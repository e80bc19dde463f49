"""FLOPs and bytes from the compiled HLO (daro_jax/plan/costs.py): loop trip counts and the
costs of loops against the same program unrolled and closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax.plan import chips, costs


def mesh4() -> Mesh:
    return Mesh(np.array(chips.tpu_devices("v5e:2x2")), ("fsdp",))


def test_loop_costs_equal_the_unrolled_program():
    """A scan over L = 4 layers inside a loop of a traced count (n = 3), with each layer's
    weights gathered over 4 chips, against the same 12 layers unrolled: equal FLOPs."""
    mesh, layers, n = mesh4(), 4, 3

    def layer(x, w):
        return jnp.tanh(x @ w)

    def looped(w, x, count):
        def one(i, x):
            return jax.lax.scan(lambda x, w: (layer(x, w), None), x, w[i])[0]

        return jax.lax.fori_loop(0, count, one, x)

    def unrolled(w, x):
        for j in range(n):
            for i in range(layers):
                x = layer(x, w[j, i])
        return x

    def arg(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    w = arg((n, layers, 512, 512), jnp.bfloat16, PartitionSpec(None, None, "fsdp"))
    x = arg((256, 512), jnp.bfloat16, PartitionSpec("fsdp"))
    count = arg((), jnp.int32, PartitionSpec())
    parts = costs.program_parts(jax.jit(looped).lower(w, x, count).compile().as_text(), [n])
    (loop,) = [part for part in parts if part.dynamic]
    assert loop.trips == n and len(parts) == 2
    flat = jax.jit(unrolled).lower(w, x).compile()
    total = sum((part.total for part in parts), costs.Cost())
    assert total.flops == pytest.approx(flat.cost_analysis()["flops"], rel=1e-3)
    assert total.flops == pytest.approx(2 * 256 * 512 * 512 * layers * n / 4, rel=0.01)
    assert total.ici_bytes > 0 and total.bytes > 0


def test_loop_with_a_step_of_two():
    """A while loop i = 0, 2, 4, … < 9 runs 5 times (XLA's collective matmuls step by 2)."""
    mesh = mesh4()

    def f(x):
        return jax.lax.while_loop(lambda c: c[0] < 9, lambda c: (c[0] + 2, c[1] @ c[1]), (0, x))[1]

    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    (_, loop) = costs.program_parts(jax.jit(f).lower(x).compile().as_text(), [])
    assert (loop.trips, loop.dynamic) == (5, False)
    assert loop.total.flops == pytest.approx(5 * 2 * 256**3, rel=0.01)
