"""Token selection for the sampler: temperature, top-k, top-p, one inverse-CDF draw per row.

`select_both(logits [N, V], uniforms [N], temperature, top_p, top_k)` draws one token per
row at its uniform u ~ U[0, 1) and returns it with its log-probability under the
distribution it was drawn from and under the untruncated softmax(logits / T), the
distribution the trainer scores (they differ under top-p / top-k only); `select_tokens`
draws the uniforms from a key and returns the first two. One uniform
per row instead of V Gumbel variables: threefry for [N, V] numbers costs more than the rest
of the selection on CPU. T = 0 is greedy (the first argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SAMPLE_BLOCK = 256


def _first_argmax(x: jnp.ndarray) -> jnp.ndarray:
    """argmax over the last axis (first index on ties), as max + min-index reductions
    (XLA on CPU runs these far faster than its two-operand argmax reduction)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def _last_positive(x: jnp.ndarray) -> jnp.ndarray:
    """The last index along the last axis where x > 0 (−1 if none)."""
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.max(jnp.where(x > 0, index, -1), axis=-1)


def _inverse_cdf(weights: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
    """Index i with c_{i−1} ≤ u < c_i, c = cumsum(weights) over the last axis (u ≥ 0).

    Rounding can only push the answer past the end: it is capped at the last positive
    weight, so a zero-weight index is never returned.
    """
    below = jnp.sum(jnp.cumsum(weights, axis=-1) <= u[..., None], axis=-1)
    return jnp.minimum(below, _last_positive(weights)).astype(jnp.int32)


def _sample(z: jnp.ndarray, uniforms: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """A draw from softmax(z) per row of z [N, V] (−∞ = excluded) and its log-probability.

    Inverse-CDF sampling at the uniform u ~ U[0, 1) of each row (`uniforms` [N]), in two
    levels so that no length-V scan is needed: w = exp(z − max z) in blocks of SAMPLE_BLOCK
    tokens; pick the block where the cumulative block mass passes u·Σw, then the token
    inside that block where the cumulative mass passes the remainder.
    log p = z_i − max z − log Σw.
    """
    n, vocab = z.shape
    top = jnp.max(z, axis=-1, keepdims=True)
    weights = jnp.exp(z - top)
    blocks = jnp.pad(weights, ((0, 0), (0, -vocab % SAMPLE_BLOCK))).reshape(n, -1, SAMPLE_BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)
    total = jnp.sum(block_mass, axis=-1)
    u = uniforms * total
    block = _inverse_cdf(block_mass, u)
    before = jnp.sum(jnp.where(jnp.arange(block_mass.shape[1]) < block[:, None], block_mass, 0), -1)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    tokens = block * SAMPLE_BLOCK + _inverse_cdf(inside, jnp.maximum(u - before, 0.0))
    chosen = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - top[:, 0] - jnp.log(total)


def select_tokens(
    logits: jnp.ndarray,
    key: jax.Array,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draw one token per row of `logits` [N, V]; returns (tokens [N] int32, logprobs [N]).

    The first two outputs of `select_both` at the uniforms `jax.random.uniform(key, (N,))`
    (`key` is unused, and may be None, when T = 0).
    """
    uniforms = None
    if temperature != 0:
        uniforms = jax.random.uniform(key, (logits.shape[0],), jnp.float32)
    return select_both(logits, uniforms, temperature=temperature, top_p=top_p, top_k=top_k)[:2]


def select_both(
    logits: jnp.ndarray,
    uniforms: jnp.ndarray | None,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One token per row of `logits` [N, V] by inverse CDF at the row's uniform in
    `uniforms` [N] ~ U[0, 1); returns (tokens [N] int32, logprobs [N], full_logprobs [N]).

    z = logits / T; top-k keeps z_v ≥ the k-th largest z; top-p then keeps the smallest set
    of highest-probability tokens whose mass reaches top_p (token v is kept when the mass of
    the tokens strictly more likely than it is < top_p; ties at the threshold are kept);
    the token is drawn from softmax(z̃), z̃ = z on kept tokens and −∞ elsewhere, and its
    logprob is z̃_v − logsumexp(z̃) (the policy that drew it); full_logprobs is
    z_v − logsumexp(z), the same token under the untruncated softmax(z) (equal to logprobs
    without top-p / top-k): logprobs − full_logprobs = −log(mass of the kept tokens) ≥ 0.
    T = 0 is greedy (`uniforms` unused, may be None): the first argmax of the logits, with
    logprob under softmax(logits) (see the module docstring) in both outputs.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = _first_argmax(logits)
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
        logp = chosen - jax.nn.logsumexp(logits, axis=-1)
        return tokens, logp, logp
    z = full = logits / temperature
    vocab = z.shape[-1]
    ranked = None
    if 0 < top_k < vocab:
        ranked = lax.top_k(z, top_k)[0]
        z = jnp.where(z >= ranked[:, -1:], z, -jnp.inf)
    if top_p < 1.0:
        if ranked is None:
            ranked = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
        z = jnp.where(z >= threshold, z, -jnp.inf)
    tokens, logp = _sample(z, uniforms)
    if z is full:
        return tokens, logp, logp
    chosen = jnp.take_along_axis(full, tokens[:, None], axis=-1)[:, 0]
    return tokens, logp, chosen - jax.nn.logsumexp(full, axis=-1)
