"""train.update: the packed forward and the update's gradient against one plain forward of
each [prompt | completion] sequence (`jax.grad` of the same loss), on tiny SmolLM2; the
minibatch schedule of a step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from helpers import load_config_file

from daro_jax import models
from daro_jax.algo import losses, optim, presets
from daro_jax.models import decoder, packed
from daro_jax.train import packing, update


def _packed_case(tiny_hf_dirs, rows: int, seed: int, padding: bool = False):
    """Tiny SmolLM2, G = 2 blocks of g = 2 left-padded prompts, K = 4 completions each of
    random lengths (`padding`: prompt 2's are all empty, as DAPO's padding prompts), packed
    with `rows` rows per chunk; and the plain forward of every [prompt | completion]
    sequence alone (the reference)."""
    spec = presets.resolve(dict(load_config_file("configs/tiny.py").algo), max_response_len=6)
    model = models.load(tiny_hf_dirs["smollm2"])
    cfg, params = model.config, model.params
    rng = np.random.default_rng(seed)
    blocks, g, k, p, c, t = 2, 2, spec.k, 7, 6, 0.8
    b = blocks * g
    prompt_mask = np.ones((b, p), np.int32)
    prompt_mask[0, :3] = 0
    prompt_mask[3, :1] = 0
    prompt_tokens = rng.integers(3, 200, (b, p)) * prompt_mask
    lengths = rng.integers(1, c + 1, (b, k))
    lengths[0, 0] = 1  # a one-token completion shares a row with others
    if padding:
        lengths[2] = 0
    mask = (np.arange(c) < lengths[..., None]).astype(np.int32)
    tokens = rng.integers(3, 200, (b, k, c)) * mask
    batch = packing.pack_blocks(tokens, lengths, blocks, rows)
    batch |= {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask}
    rows_of = batch["chunk_segments"].reshape(blocks, -1, c)
    shared = any(len(set(r[r >= 0] // k)) > 1 for blk in rows_of for r in blk)
    assert shared  # some row holds completions of two prompts
    s = update.UpdateSettings(cfg, spec, t, on_policy=False)

    def plain(model_params):
        full = np.concatenate([np.repeat(prompt_tokens, k, 0), tokens.reshape(b * k, c)], 1)
        full_mask = np.concatenate([np.repeat(prompt_mask, k, 0), mask.reshape(b * k, c)], 1)
        positions = decoder.positions_from_mask(full_mask)
        masks = decoder.causal_masks(full_mask)
        hidden, _ = decoder.forward(model_params, cfg, full, positions, masks)
        return decoder.token_logprobs(model_params, cfg, hidden[:, p - 1 : -1], full[:, p:], t)

    return params, batch, s, mask.reshape(b * k, c), jax.jit(plain)  # eager dispatch is slow


def test_packed_logprobs_equal_the_plain_forward(tiny_hf_dirs, rows=2):
    """Prompts forwarded once per block, completions of several prompts packed back to back
    into rows attending to their own prompt's cache: logprobs and entropies (scattered back
    to [b·K, C]), and the gradient of Σ logp through the prompts' caches, equal one plain
    forward of each [prompt | completion] sequence."""
    params, batch, s, mask, plain = _packed_case(tiny_hf_dirs, rows, seed=2)
    blocks, g = update._blocks(batch)

    def ours(model_params):
        last, cache = packed.prompt_blocks(
            model_params, s.cfg, batch["prompt_tokens"], batch["prompt_mask"], blocks
        )
        out = []
        for i in range(batch["n_chunks"]):
            chunk = update._chunk(batch, i)
            pair = packed.chunk_logprobs(
                model_params,
                s.cfg,
                last,
                cache,
                batch["prompt_mask"],
                chunk,
                s.spec.k,
                s.temperature,
            )
            out.append([update.to_rows(x, chunk, s.spec.k, g, mask.shape[0]) for x in pair])
        return tuple(sum(parts) for parts in zip(*out, strict=True))

    ours = jax.jit(ours)
    (logp, entropy), (ref_logp, ref_entropy) = ours(params), plain(params)
    valid = mask.astype(bool)
    assert not np.asarray(logp)[~valid].any() and not np.asarray(entropy)[~valid].any()
    np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(ref_logp)[valid], atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(entropy)[valid], np.asarray(ref_entropy)[valid], atol=2e-5
    )

    def objective(fn):
        return jax.jit(jax.grad(lambda w: (fn(w)[0] * mask).sum()))(params)

    _assert_grads_close(objective(ours), objective(plain))


def _assert_grads_close(grads, ref_grads):
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        scale = float(np.abs(r).max()) or 1.0
        assert float(np.abs(np.asarray(g) - np.asarray(r)).max()) <= 1e-4 * scale, path


def _check_update_gradients(tiny_hf_dirs, rows, seed, **algo):
    """The update's gradient equals jax.grad of the loss (algo: config.algo overrides of
    configs/tiny.py) of one plain forward, off-policy and with padding rollouts."""
    params, batch, s, mask, plain = _packed_case(tiny_hf_dirs, rows, seed=seed, padding=True)
    if algo:
        cfg = dict(load_config_file("configs/tiny.py").algo) | algo
        s = dataclasses.replace(s, spec=presets.resolve(cfg, max_response_len=6))
    rng = np.random.default_rng(rows)
    n, c = mask.shape
    ref_logp = np.asarray(plain(params)[0])
    old_logp = (ref_logp + rng.normal(0, 0.3, ref_logp.shape)) * mask
    advantages = rng.normal(0, 1, n).astype(np.float32)
    group_ids = np.repeat(rng.integers(0, s.spec.k + 1, n // s.spec.k), s.spec.k)
    tb = losses.token_batch(old_logp, mask, advantages, group_ids, s.spec)
    # Positive: DARO weights w themselves (the default) or ln w.
    daro = jax.numpy.asarray(np.exp(rng.normal(0, 0.1, s.spec.k - 1)), jax.numpy.float32)
    full = {"model": params, "daro": daro}
    batch = {**batch, "sampler_logp": old_logp}
    grads, sums = jax.jit(update.update_gradients, static_argnames="s")(full, batch, tb, s=s)

    def plain_loss(p):
        logp, entropy = plain(p["model"])
        return losses.microbatch_loss(p["daro"], logp, tb, s.spec, entropy)[0]

    loss, ref_grads = jax.jit(jax.value_and_grad(plain_loss))(full)
    assert float(sums["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(sums["clip_low"] + sums["clip_high"]) > 0  # the clipped branch is exercised
    _assert_grads_close(grads, ref_grads)


def test_grad_norm_counts_the_trained_leaves_only(tiny_hf_dirs):
    """With optim.frozen set, update_step's grad_norm is the global norm of the trained
    leaves' gradients (the norm clip_by_global_norm clips), not of every parameter's; the
    frozen leaf does not move."""
    params, batch, s, mask, _ = _packed_case(tiny_hf_dirs, rows=3, seed=5)
    rng = np.random.default_rng(5)
    n = mask.shape[0]
    old = (rng.normal(-2.0, 0.5, mask.shape) * mask).astype(np.float32)
    batch = batch | {
        "loss_mask": mask.astype(np.float32),
        "old_logp": old,
        "sampler_logp": old,
        "sampler_logp_full": old,
        "advantages": rng.normal(0, 1, n).astype(np.float32),
        "group_ids": np.repeat(rng.integers(1, s.spec.k, n // s.spec.k), s.spec.k),
    }
    frozen = (".*embed/embedding",)
    s = dataclasses.replace(s, frozen=frozen)
    cfg = load_config_file("configs/tiny.py").optim
    cfg.frozen = frozen
    train = optim.init_params(params, s.spec)
    tx = optim.make_optimizer(cfg, train, total_steps=10, spec=s.spec)
    state = {"params": train, "opt": tx.init(train)}
    tb = losses.token_batch(
        old, mask, batch["advantages"], batch["group_ids"], s.spec, sampler_logp=old
    )
    grads, _ = jax.jit(update.update_gradients, static_argnames="s")(train, batch, tb, s=s)
    squares = {
        jax.tree_util.keystr(path): float(np.sum(np.square(np.asarray(g, np.float64))))
        for path, g in jax.tree_util.tree_leaves_with_path(grads["model"])
    }
    trained = np.sqrt(sum(v for k, v in squares.items() if "embedding" not in k))
    everything = np.sqrt(sum(squares.values()))
    assert everything > 1.01 * trained  # the frozen leaf's gradient is not negligible
    step = jax.jit(update.update_step, static_argnames=("tx", "s"))
    new, out = step(state, batch, tx=tx, s=s)
    assert float(out["grad_norm"]) == pytest.approx(trained, rel=1e-5)
    embedding = lambda p: [  # noqa: E731
        g for path, g in jax.tree_util.tree_leaves_with_path(p) if "embedding" in str(path)
    ]
    np.testing.assert_array_equal(embedding(new["params"]), embedding(train))


@pytest.mark.parametrize("rows", [1, 3])
def test_update_gradients_equal_the_gradient_of_the_plain_loss(tiny_hf_dirs, rows):
    """The update's gradient — chunks in a loop, prompts pulled back once through jax.vjp —
    equals jax.grad of the DARO loss of one plain forward over every sequence, for the
    model and the DARO weights, off-policy (clipped ratios) and with padding rollouts."""
    _check_update_gradients(tiny_hf_dirs, rows, seed=10 + rows)


@pytest.mark.parametrize(
    "algo",
    [
        dict(name="gspo", daro_weights=True),
        dict(name="cispo", entropy_coef=0.05),
    ],
)
def test_update_gradients_of_gspo_cispo_and_the_entropy_bonus(tiny_hf_dirs, algo):
    """GSPO's sequence ratio needs each completion whole in one micro-batch (packing never
    splits one; 3 packed rows per chunk), and the entropy bonus differentiates through the
    entropy of the packed forward: still the gradient of one plain forward's loss."""
    _check_update_gradients(tiny_hf_dirs, rows=3, seed=20, **algo)


def test_minibatch_prompts_split_each_epoch_into_sorted_minibatches():
    """ppo_epochs × minibatches updates; each epoch's minibatches are sorted, of B / M
    prompts, and together hold every prompt once; the order is a function of (seed, step):
    the same again, another at the next step, and the epochs differ."""
    from types import SimpleNamespace

    train = SimpleNamespace(batch_prompts=12, minibatches=3, ppo_epochs=2)
    got = update.minibatch_prompts(7, 5, train)
    assert len(got) == 6
    for epoch in (got[:3], got[3:]):
        assert all(len(p) == 4 and list(p) == sorted(p) for p in epoch)
        assert sorted(np.concatenate(epoch).tolist()) == list(range(12))
    assert [p.tolist() for p in got] == [p.tolist() for p in update.minibatch_prompts(7, 5, train)]
    assert [p.tolist() for p in got] != [p.tolist() for p in update.minibatch_prompts(7, 6, train)]
    assert [p.tolist() for p in got[:3]] != [p.tolist() for p in got[3:]]
