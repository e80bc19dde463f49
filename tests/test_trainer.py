"""The RL loop end to end on configs/tiny.py (a random 2-layer decoder, SmolLM2 tokenizer).

A random model almost never answers correctly, so these tests score with a verifier that
is stubbed to a fixed, deterministic pattern of correct answers per rollout: the pass-rate
groups are then known and the loss sees every kind of group.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import load_config_file

from daro_jax import checkpoint, losses, models, packing, presets, trainer
from daro_jax.models import decoder, packed

ALGOS = ("grpo", "dr_grpo", "lipo", "dapo", "daro")


def tiny_config(**changes):
    """configs/tiny.py on a (1, -1, 1) mesh with one verifier worker, then `changes`."""
    return load_config_file(
        "configs/tiny.py",
        **{"mesh.shape": (1, -1, 1), "reward.num_workers": 1, **changes},
    )


class PatternPool:
    """Stand-in for RewardPool: prompt i of a batch gets (i mod (K+1)) correct answers."""

    def __init__(self, k: int):
        self.k = k

    def score(self, completions, golds):
        n = len(completions) // self.k
        correct = np.arange(self.k)[None, :] < (np.arange(n) % (self.k + 1))[:, None]
        return correct.astype(np.float32).reshape(-1)

    def pop_stats(self):
        return {"items": 0}


def params_of(t: trainer.Trainer):
    return jax.device_get(t.state["params"])


@pytest.mark.parametrize("algo", ALGOS)
def test_three_steps_each_algorithm(algo):
    config = tiny_config(**{"algo.name": algo, "train.batch_prompts": 6})
    t = trainer.Trainer(config)
    before = params_of(t)
    pool = PatternPool(config.algo.k)
    compiled = []
    for step in range(3):
        out = t.step(step, pool)
        compiled.append(t.update._cache_size())
        assert np.isfinite(out["loss"]), out
        # One update per step: on-policy, so the first (only) update's ratio is exactly 1.
        assert out["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert out["ratio_max"] == pytest.approx(1.0, abs=1e-6)
        prompts = [out[f"group/prompts/{g}of4"] for g in range(5)]
        if algo == "dapo":  # dynamic sampling keeps only 0 < k < K: 4 of every 5 prompts
            assert prompts[0] == prompts[4] == 0
        else:
            assert prompts == [2, 1, 1, 1, 1]  # 6 prompts with k = 0,1,2,3,4,0
    after = params_of(t)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["model"], after["model"])
    assert all(v > 0 for v in jax.tree.leaves(moved)), moved
    if algo == "daro":
        w0 = np.asarray(losses.daro_weights(before["daro"], t.spec))
        w1 = np.asarray(losses.daro_weights(after["daro"], t.spec))
        assert np.all(w1 != w0)  # groups k = 1, 2, 3 are present in every step
    # No recompilation after the first step: completions of tiny are ≤ 8 tokens (one bucket).
    assert compiled[0] == compiled[1] == compiled[2]


def test_absent_group_weight_does_not_move():
    config = tiny_config(**{"algo.name": "daro", "train.batch_prompts": 2})
    t = trainer.Trainer(config)
    before = np.asarray(losses.daro_weights(t.state["params"]["daro"], t.spec))
    for step in range(2):  # prompts get k = 0 and k = 1 only
        t.step(step, PatternPool(config.algo.k))
    after = np.asarray(losses.daro_weights(t.state["params"]["daro"], t.spec))
    assert after[0] != before[0]  # group k = 1 present
    np.testing.assert_array_equal(after[1:], before[1:])  # k = 2, 3 absent: unchanged


def test_microbatches_and_minibatch_settings_agree():
    """Micro-batching is exact: the same first update with one prompt block and one packed
    row per micro-batch (several loop iterations) and with two blocks of 16 rows (one
    iteration)."""
    outs = []
    for blocks, rows in ((1, 1), (2, 16)):
        config = tiny_config(
            **{
                "train.batch_prompts": 4,
                "train.prompt_blocks": blocks,
                "train.block_rows": rows,
            }
        )
        t = trainer.Trainer(config)
        outs.append(t.step(0, PatternPool(config.algo.k)))
    for out in outs[1:]:
        for name in ("loss", "grad_norm", "entropy", "group/L/1of4", "group/tokens/2of4"):
            assert out[name] == pytest.approx(outs[0][name], rel=1e-5, abs=1e-7), name


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
    s = trainer.UpdateSettings(cfg, spec, t, on_policy=False)

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
    blocks, g = trainer._blocks(batch)

    def ours(model_params):
        last, cache = packed.prompt_blocks(
            model_params, s.cfg, batch["prompt_tokens"], batch["prompt_mask"], blocks
        )
        out = []
        for i in range(batch["n_chunks"]):
            chunk = trainer._chunk(batch, i)
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
            out.append([trainer.to_rows(x, chunk, s.spec.k, g, mask.shape[0]) for x in pair])
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


@pytest.mark.parametrize("rows", [1, 3])
def test_update_gradients_equal_the_gradient_of_the_plain_loss(tiny_hf_dirs, rows):
    """The update's gradient — chunks in a loop, prompts pulled back once through jax.vjp —
    equals jax.grad of the DARO loss of one plain forward over every sequence, for the
    model and the DARO weights, off-policy (clipped ratios) and with padding rollouts."""
    params, batch, s, mask, plain = _packed_case(tiny_hf_dirs, rows, seed=10 + rows, padding=True)
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
    grads, sums = jax.jit(trainer.update_gradients, static_argnames="s")(full, batch, tb, s=s)

    def plain_loss(p):
        return losses.microbatch_loss(p["daro"], plain(p["model"])[0], tb, s.spec)[0]

    loss, ref_grads = jax.jit(jax.value_and_grad(plain_loss))(full)
    assert float(sums["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(sums["clip_low"] + sums["clip_high"]) > 0  # the clipped branch is exercised
    _assert_grads_close(grads, ref_grads)


def test_train_hands_periodic_eval_metrics_to_on_step(tmp_path):
    """trainer.train evaluates every eval.every_steps steps and passes those numbers to
    on_step with the step's metrics, equal to the report it writes in the workdir."""
    config = tiny_config(**{"train.steps": 2, "eval.every_steps": 2, "train.ckpt_every": 0})
    seen = {}
    trainer.train(config, str(tmp_path), on_step=lambda s, m: seen.setdefault(s, m))
    name = "eval/generated_heldout/mean_at_1"
    assert name not in seen[0] and "loss" in seen[1]
    report = json.loads((tmp_path / "eval_step2.json").read_text())
    assert seen[1][name] == report["benchmarks"]["generated_heldout"]["mean@1"]


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.rewards, "RewardPool", lambda *a, **k: _ContextPool(4))
    config = tiny_config(**{"train.steps": 4, "train.ckpt_every": 2})
    full: dict[int, dict] = {}
    trainer.train(config, str(tmp_path / "full"), on_step=lambda s, m: full.setdefault(s, m))

    class Crash(Exception):
        pass

    def crash_at_3(step, _):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        trainer.train(config, str(tmp_path / "resumed"), on_step=crash_at_3)
    resumed: dict[int, dict] = {}
    trainer.train(config, str(tmp_path / "resumed"), on_step=lambda s, m: resumed.setdefault(s, m))
    assert sorted(resumed) == [2, 3]  # restarted from the step-2 checkpoint
    for step in (2, 3):
        for name in ("loss", "grad_norm", "reward", "entropy", "daro/w_after_update/1of4"):
            assert resumed[step][name] == full[step][name], (step, name)
    with checkpoint.Checkpointer(str(tmp_path / "resumed"), keep=3, every=2) as ckpt:
        assert ckpt.latest_step() == 4
        assert ckpt.restore_meta()["step"] == 4


class _ContextPool(PatternPool):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.batch_prompts": 3, "algo.k": 4}, "divisible by the 8 data shards"),
        ({"data.source": "/nonexistent/train.jsonl"}, "/nonexistent/train.jsonl"),
        ({"train.minibatches": 3}, "train.minibatches=3"),
        ({"train.prompt_blocks": 3}, "train.prompt_blocks=3 must divide the 4 prompts"),
        ({"train.block_rows": 0}, "train.block_rows=0"),
        ({"algo.name": "ppo"}, "config.algo.name='ppo'"),
    ],
)
def test_bad_inputs_fail_clearly(changes, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        trainer.Trainer(tiny_config(**changes))


def test_column_mapping_mismatch(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    config = tiny_config(**{"data.source": str(path)})
    with pytest.raises(ValueError, match="problem"):
        trainer.Trainer(config)


def test_unknown_config_field_is_an_error():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daro_jax.main",
            "--config=configs/tiny.py",
            "--config.train.stepz=3",
            "--workdir=/tmp/never",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_nonfinite_loss_stops_the_run_without_saving_it(tmp_path, monkeypatch):
    """An absurd learning rate blows the params up; the step whose loss or gradient is not
    finite raises, names itself and the metric, and leaves the last checkpoint intact."""
    monkeypatch.setattr(trainer.rewards, "RewardPool", lambda *a, **k: _ContextPool(4))
    config = tiny_config(
        **{"optim.lr": 1e30, "optim.grad_clip": 0.0, "train.steps": 6, "train.ckpt_every": 1}
    )
    with pytest.raises(FloatingPointError, match=r"step \d+ \(update 0\): non-finite"):
        trainer.train(config, str(tmp_path))
    with checkpoint.Checkpointer(str(tmp_path), keep=3, every=1) as ckpt:
        last = ckpt.latest_step()
        assert last is not None and last < 6
        state, meta = ckpt.restore(
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                trainer.Trainer(config).state,
            )
        )
    assert meta["step"] == last
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_group_metrics_cover_every_minibatch():
    """A step of 4 minibatches reports the per-group metrics of the whole batch, equal to
    those of 1 minibatch on the same batch. The learning rate is too small to change any
    parameter in float32, so all 4 updates see the policy the 1-minibatch update sees."""
    outs = []
    for minibatches in (1, 4):
        config = tiny_config(
            **{"train.batch_prompts": 8, "train.minibatches": minibatches, "optim.lr": 1e-30}
        )
        outs.append(trainer.Trainer(config).step(0, PatternPool(config.algo.k)))
    one, four = outs
    assert sum(four[f"group/prompts/{g}of4"] for g in range(5)) == 8  # every prompt
    names = [
        f"group/{name}/{g}of4" for name in ("prompts", "tokens", "L", "w", "wL") for g in range(5)
    ]
    for name in names + ["tokens", "entropy", "ratio_mean", "sampler_logp_gap"]:
        assert four[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), name
