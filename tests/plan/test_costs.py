"""FLOPs and bytes from the compiled HLO (daro_jax/plan/costs.py): loop trip counts and the
costs of loops against the same program unrolled and closed forms; what XLA's cost
analysis cannot see into (custom calls: the Pallas TPU attention kernels) and the per-op
byte breakdown."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import plan
from daro_jax.models import attention_kernel, decoder, packed
from daro_jax.models.attention_kernel import Segments, fused_attend
from daro_jax.models.config import ModelConfig
from daro_jax.plan import chips, costs

plan.compile_only("v5e-4")


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


@functools.cache
def _one_chip() -> NamedSharding:
    mesh = jax.sharding.Mesh(chips.tpu_devices("v5e:2x2")[:1], ("x",))
    return NamedSharding(mesh, PartitionSpec())


def _abstract(*specs):
    """Abstract arrays on one v5e chip."""
    device = _one_chip()
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=device) for shape, dtype in specs]


def _custom_calls(text, target=""):
    """The custom calls of an HLO text (whose custom_call_target contains `target`)."""
    _, module = costs.parse_module(text)
    return [
        (inst, insts)
        for insts in module.values()
        for inst in insts.values()
        if inst.opcode == "custom-call" and f'custom_call_target="{target}' in inst.text
    ]


def test_kernel_counted_from_its_attention_shape():
    """Forward and backward of 2 rows × 128 queries, 2 heads of 128, over their own 128
    causal keys (one block: all of it visited) and a block's 128 shared keys read by
    both rows as 256 queries: 4·A·Dh FLOPs forward and 14·A·Dh backward, A the score
    entries, added to XLA's count of the rest."""
    r, t, kv, g, dh, p = 2, 128, 1, 2, 128, 128
    q, k, v, sk, sv, seg, kseg = _abstract(
        ((r, t, kv, g, dh), jnp.bfloat16),
        ((r, kv, dh, t), jnp.bfloat16),
        ((r, kv, t, dh), jnp.bfloat16),
        ((1, kv, dh, p), jnp.bfloat16),
        ((1, kv, p, dh), jnp.bfloat16),
        ((r, t), jnp.int32),
        ((1, p), jnp.int32),
    )

    def loss(q, k, v, sk, sv, seg, kseg):
        out = fused_attend(q, k, v, Segments(seg, seg, True), (sk, sv), Segments(seg, kseg))
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(q, k, v, sk, sv, seg, kseg)
    text = text.compile().as_text()
    calls = _custom_calls(text, "tpu_custom_call")
    assert len(calls) == 6  # per key set: forward, dq, dk/dv
    entries = g * (r * t * t + r * t * p)
    kernel = sum((costs.custom_call_cost(i, insts) for i, insts in calls), costs.Cost())
    assert kernel.flops == pytest.approx(18 * entries * dh)
    operands = sum(
        sum(costs.array_bytes(s))
        for i, insts in calls
        for s in [insts[n].shape for n in i.operands()]
    )
    assert kernel.bytes >= 0.5 * operands  # of the order of what the kernels read
    assert costs.xla_cost(text).flops >= kernel.flops


def test_untagged_custom_call_counts_its_operands_and_result():
    text = """HloModule m

ENTRY %main (p: f32[8,128]) -> f32[8,128] {
  %p = f32[8,128]{1,0} parameter(0)
  ROOT %c = f32[8,128]{1,0} custom-call(%p), custom_call_target="opaque"
}
"""
    ((inst, insts),) = _custom_calls(text)
    assert costs.custom_call_cost(inst, insts) == costs.Cost(0.0, 2 * 8 * 128 * 4)
    assert costs.xla_cost(text).bytes == pytest.approx(2 * 8 * 128 * 4, abs=2)


def _chunk_program(use_kernel: bool, monkeypatch) -> str:
    """The compiled gradient of a packed chunk's log-probabilities (1 layer, 2 blocks of
    2 prompts × 64 slots, one 512-token row each), kernel or einsum attention."""
    if not use_kernel:
        monkeypatch.setattr(attention_kernel, "kernel_fits", lambda *a, **k: False)
    cfg = ModelConfig(
        model_type="qwen2", vocab_size=256, hidden_size=256, intermediate_size=512,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1e4, dtype="bfloat16", param_dtype="float32", remat=True,
    )  # fmt: skip
    blocks, g, p, c = 2, 2, 64, 512
    shapes = jax.eval_shape(functools.partial(decoder.init_params, cfg), jax.random.key(0))
    leaves, tree = jax.tree.flatten(shapes)
    params = jax.tree.unflatten(tree, _abstract(*[(x.shape, x.dtype) for x in leaves]))
    last, pk, pv, mask, tokens, seg, offsets = _abstract(
        ((blocks, g, 256), jnp.bfloat16),
        ((1, blocks, 2, 128, g * p), jnp.bfloat16),
        ((1, blocks, 2, g * p, 128), jnp.bfloat16),
        ((blocks * g, p), jnp.int32),
        ((blocks, 1, c), jnp.int32),
        ((blocks, 1, c), jnp.int32),
        ((blocks, 1, c), jnp.int32),
    )

    def loss(params, last, pk, pv, mask, tokens, seg, offsets):
        chunk = dict(zip(packed.CHUNK_INPUTS, (tokens, seg, offsets), strict=True))
        logp, _ = packed.chunk_logprobs(params, cfg, last, (pk, pv), mask, chunk, 2, 1.0)
        return jnp.sum(logp)

    lowered = jax.jit(jax.grad(loss)).lower(params, last, pk, pv, mask, tokens, seg, offsets)
    return lowered.compile().as_text()


def test_packed_chunk_moves_fewer_bytes_with_the_kernel(monkeypatch):
    """XLA's bytes (+ the kernels' analytic bytes) of the chunk's gradient fall with the
    kernel; the per-op breakdown adds up to about XLA's count (3 % apart when written)."""
    kernel = _chunk_program(True, monkeypatch)
    einsum = _chunk_program(False, monkeypatch)
    kernels = "tpu_custom_call"
    assert _custom_calls(kernel, kernels) and not _custom_calls(einsum, kernels)
    total = lambda text: sum((part.total for part in costs.program_parts(text, [])), costs.Cost())  # noqa: E731
    assert total(kernel).bytes < 0.8 * total(einsum).bytes  # 0.71 when written
    for text in (kernel, einsum):  # the per-op estimate adds up to about XLA's total
        items = costs.byte_breakdown(text, per_trip_of_dynamic_loop=False)
        assert [b for _, b in items] == sorted((b for _, b in items), reverse=True)
        assert sum(b for _, b in items) == pytest.approx(total(text).bytes, rel=0.25)
