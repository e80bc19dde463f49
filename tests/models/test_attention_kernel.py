"""The splash kernels (Pallas interpret mode) against the einsum attention: values and
gradients on the packed layout (segment ids, shared prompt keys, GQA, causal)."""

import jax
import jax.numpy as jnp
import numpy as np

from daro_jax.models import layers
from daro_jax.models.attention_kernel import Segments, fused_attend, kernel_fits


def _packed_case(seed=0, r=4, t=128, kv=2, g=2, dh=16, blocks=2, prompts=2, p=64):
    """q [R, T, KV, G, Dh], own keys and values, the blocks' shared prompt keys and values,
    and the masks of a packed chunk: each row holds completions back to back (segment ids,
    −1 padding at the end), each completion reads its prompt (segment // 2) in its block."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    q, k, v = normal(r, t, kv, g, dh), normal(r, kv, dh, t), normal(r, kv, t, dh)
    shared = (normal(blocks, kv, dh, prompts * p), normal(blocks, kv, prompts * p, dh))
    seg = np.full((r, t), -1)
    for row in range(r):
        cuts = np.sort(rng.choice(np.arange(8, t - 8), size=3, replace=False))
        ends = np.append(cuts, t - 5 * row)
        start = 0
        for j, end in enumerate(ends):
            seg[row, start:end] = j
            start = end
    prompt = np.where(seg >= 0, seg // 2, -1)
    lengths = rng.integers(p // 2, p + 1, size=(blocks, prompts))
    key_prompt = np.full((blocks, prompts * p), -1)
    for b in range(blocks):
        for j in range(prompts):
            key_prompt[b, j * p + p - lengths[b, j] : (j + 1) * p] = j  # left-padded
    own = Segments(jnp.asarray(seg), jnp.asarray(seg), causal=True)
    return q, k, v, own, shared, Segments(jnp.asarray(prompt), jnp.asarray(key_prompt))


def _dense(own, shared_seg):
    return own.allowed(), shared_seg.allowed()


def test_kernel_matches_einsum_values_and_gradients():
    q, k, v, own, shared, shared_seg = _packed_case()
    assert kernel_fits(q.shape, k.shape[3], shared[0].shape, True)
    allowed, shared_allowed = _dense(own, shared_seg)
    live = np.asarray(allowed).any(-1) | np.asarray(shared_allowed).any(-1)  # [R, T]
    noise = np.random.default_rng(1).normal(size=q.shape)
    weight = jnp.asarray(noise * live[..., None, None, None])

    def loss(fn):
        return lambda q, k, v, sk, sv: jnp.sum(fn(q, k, v, (sk, sv)) * weight)

    ref = lambda q, k, v, sh: layers.einsum_attend(q, k, v, allowed, sh, shared_allowed)  # noqa: E731
    ker = lambda q, k, v, sh: fused_attend(q, k, v, own, sh, shared_seg, interpret=True)  # noqa: E731
    out_ref, out_ker = ref(q, k, v, shared), ker(q, k, v, shared)
    np.testing.assert_allclose(
        np.asarray(out_ker)[live], np.asarray(out_ref)[live], atol=2e-5, rtol=2e-5
    )
    args = (q, k, v, *shared)
    g_ref = jax.grad(loss(ref), argnums=range(5))(*args)
    g_ker = jax.grad(loss(ker), argnums=range(5))(*args)
    for a, b in zip(g_ker, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5)


def test_attend_on_cpu_takes_the_einsum_branch():
    """Kernel-sized segments: `attend` picks its branch by platform (the TPU kernel is not
    lowered for the CPU) and gives einsum_attend's output, under jit and grad."""
    q, k, v, own, shared, shared_seg = _packed_case(r=2, blocks=1)
    allowed, shared_allowed = _dense(own, shared_seg)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda q: jnp.sum(jnp.sin(fn(q)))))(q)

    got = run(lambda q: layers.attend(q, k, v, own, shared, shared_seg))
    want = run(lambda q: layers.einsum_attend(q, k, v, allowed, shared, shared_allowed))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
