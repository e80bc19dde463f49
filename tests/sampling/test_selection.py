"""daro_jax.sampling.selection on fixed logits: sampling frequencies against softmax written
in NumPy (chi-square), top-p and top-k supports, greedy ties, sharded logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import softmax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from daro_jax import sharding
from daro_jax.sampling import selection

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
DRAWS = 40_000


def draw(logits, **kw):
    rows = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, logits.shape[-1]))
    tokens, logp = selection.select_tokens(rows, jax.random.key(42), **kw)
    return np.asarray(tokens), np.asarray(logp)


def assert_follows(tokens, probs):
    """Chi-square goodness of fit of the token counts to probs (zero-prob: never drawn)."""
    counts = np.bincount(tokens, minlength=probs.size)
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    assert stats.chisquare(counts[keep], DRAWS * probs[keep]).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_frequencies_match_softmax(temperature):
    tokens, logp = draw(LOGITS, temperature=temperature)
    probs = softmax(LOGITS / temperature)
    assert_follows(tokens, probs)
    np.testing.assert_allclose(logp, np.log(probs[tokens]), rtol=1e-5)


def test_sampling_over_blocks_of_a_larger_vocabulary():
    """V = 600 is not a multiple of the 256-token blocks; mass sits in three blocks."""
    logits = np.full(600, -4.0, np.float32)
    logits[[3, 255, 256, 400, 599]] = [1.0, 0.5, 0.2, 1.5, 0.8]
    tokens, _ = draw(logits, temperature=1.0)
    probs = softmax(logits)
    heavy = probs > 0.01
    merged = np.where(heavy[tokens], tokens, 600)  # the light tail as one category
    expected = np.append(np.where(heavy, probs, 0), probs[~heavy].sum())
    assert_follows(merged, expected)


def test_top_p_draws_only_from_the_nucleus():
    top_p = 0.8
    probs = softmax(LOGITS)  # sorted descending already: 0.61, 0.22, 0.14, …
    before = np.cumsum(probs) - probs
    nucleus = before < top_p  # the smallest prefix reaching 0.8: the first three
    assert nucleus.tolist() == [True, True, True, False, False, False]
    tokens, logp = draw(LOGITS, temperature=1.0, top_p=top_p)
    kept = np.where(nucleus, probs, 0) / probs[nucleus].sum()
    assert_follows(tokens, kept)
    np.testing.assert_allclose(logp, np.log(kept[tokens]), rtol=1e-5)


def test_top_k_draws_only_from_the_k_best():
    shuffled = LOGITS[[3, 0, 5, 2, 1, 4]]
    tokens, logp = draw(shuffled, temperature=0.8, top_k=2)
    probs = softmax(shuffled / 0.8)
    kept = np.where(np.isin(np.arange(6), [1, 4]), probs, 0)
    kept /= kept.sum()
    assert_follows(tokens, kept)
    np.testing.assert_allclose(logp, np.log(kept[tokens]), rtol=1e-5)


def test_greedy_is_the_first_argmax_with_the_model_logprob():
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]], np.float32)
    tokens, logp = selection.select_tokens(jnp.asarray(logits), None, temperature=0.0)
    np.testing.assert_array_equal(tokens, [1, 0])
    np.testing.assert_allclose(logp, np.log(softmax(logits)[[0, 1], [1, 0]]), rtol=1e-6)


def test_selection_on_sharded_logits_equals_replicated():
    logits = jax.random.normal(jax.random.key(0), (16, 512)) * 3
    mesh = sharding.make_mesh((2, 2, 2))
    placed = jax.device_put(logits, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
    select = jax.jit(lambda x, key: selection.select_tokens(x, key, temperature=1.0, top_p=0.9))
    ref = select(logits, jax.random.key(7))
    out = select(placed, jax.random.key(7))
    np.testing.assert_array_equal(ref[0], out[0])
    np.testing.assert_allclose(ref[1], out[1], rtol=1e-6)  # sums over vocab shards: ulps
