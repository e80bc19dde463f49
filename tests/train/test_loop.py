"""train.loop end to end on configs/tiny.py (a random 2-layer decoder, SmolLM2 tokenizer).

A random model almost never answers correctly, so these tests score with a verifier that
is stubbed to a fixed, deterministic pattern of correct answers per rollout: the pass-rate
groups are then known and the loss sees every kind of group.
"""

from __future__ import annotations

import json
import signal

import jax
import numpy as np
import pytest
from helpers import PatternPool, tiny_config

from daro_jax import checkpoint, evaluation, sharding
from daro_jax.algo import daro
from daro_jax.train import loop

# One algorithm per path through the loop: GRPO's KL to the reference params, DAPO's dynamic
# sampling and overlong shaping, DARO's weights. Dr. GRPO and LIPO take GRPO's path without
# the KL; they differ from it only inside the advantages and the loss, which
# tests/algo/test_losses.py checks for every preset against NumPy.
ALGOS = ("grpo", "dapo", "daro")


def params_of(run: loop.Run):
    return jax.device_get(run.state["params"])


@pytest.mark.parametrize("algo", ALGOS)
def test_three_steps_of_each_loop_path(algo):
    config = tiny_config(**{"algo.name": algo, "train.batch_prompts": 6})
    run = loop.build(config)
    before = params_of(run)
    pool = PatternPool(config.algo.k)
    compiled = []
    for step in range(3):
        out = loop.run_step(run, step, pool)
        compiled.append(run.programs.update._cache_size())
        assert np.isfinite(out["loss"]), out
        prompts = [out[f"group/prompts/{g}of4"] for g in range(5)]
        if algo == "dapo":  # dynamic sampling keeps only 0 < k < K: 4 of every 5 prompts
            assert prompts[0] == prompts[4] == 0
        else:
            assert prompts == [2, 1, 1, 1, 1]  # 6 prompts with k = 0,1,2,3,4,0
    after = params_of(run)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["model"], after["model"])
    assert all(v > 0 for v in jax.tree.leaves(moved)), moved
    if algo == "daro":
        w0 = np.asarray(daro.weights(before["daro"], run.spec))
        w1 = np.asarray(daro.weights(after["daro"], run.spec))
        assert np.all(w1 != w0)  # groups k = 1, 2, 3 are present in every step
    # No recompilation after the first step: completions of tiny are ≤ 8 tokens (one bucket).
    assert compiled[0] == compiled[1] == compiled[2]


@pytest.mark.parametrize(
    "algo",
    [
        {"name": "gspo", "daro_weights": True, "kl_beta": 0.05, "kl_placement": "reward"},
        {"name": "cispo", "daro_weights": True, "mask_truncated": True, "entropy_coef": 0.01},
    ],
)
def test_two_steps_of_the_new_losses_and_options(algo):
    """GSPO and CISPO with DARO's weights on top, the KL in the reward (its old-policy
    pass and penalty), overlong filtering and the entropy bonus run through the loop: the
    reward penalty is 0 while the policy is the reference and not after an update; with
    filtering, the tokens trained on are the untruncated ones (tiny's 8-token limit)."""
    config = tiny_config(**{"train.batch_prompts": 6, **{f"algo.{n}": v for n, v in algo.items()}})
    run = loop.build(config)
    before = params_of(run)
    outs = [loop.run_step(run, step, PatternPool(config.algo.k)) for step in range(2)]
    after = params_of(run)
    assert all(np.isfinite(out["loss"]) for out in outs)
    w0, w1 = (np.asarray(daro.weights(p["daro"], run.spec)) for p in (before, after))
    if run.spec.kl_in_reward:
        assert outs[0]["kl_penalty"] == 0.0 and outs[1]["kl_penalty"] != 0.0
        assert np.all(w1 != w0)  # groups k = 1, 2, 3 are present in every step
    if run.spec.mask_truncated:  # the random model rarely stops: most completions filtered
        rows = config.train.batch_prompts * config.algo.k
        for out in outs:
            assert out["truncated_frac"] > 0
            kept = out["length_mean"] - config.sampler.max_new_tokens * out["truncated_frac"]
            assert out["tokens"] == pytest.approx(kept * rows, abs=1e-3)


def test_minibatch_and_microbatch_settings_give_the_batch_metrics():
    """One step's per-group metrics (and token means) cover the whole batch and agree
    between one minibatch in 2 prompt blocks of one packed row per micro-batch (several
    loop iterations) and 4 minibatches of one block of 16 rows: the loop splits the batch
    and reports every minibatch. The learning rate is too small to change any parameter in
    float32, so all 4 updates see the policy the 1-minibatch update sees. (The sums over
    minibatches: test_losses.py; the gradients over micro-batches: test_update.py.)"""
    outs = []
    for minibatches, blocks, rows in ((1, 2, 1), (4, 1, 16)):
        config = tiny_config(
            **{
                "train.batch_prompts": 8,
                "train.minibatches": minibatches,
                "train.prompt_blocks": blocks,
                "train.block_rows": rows,
                "optim.lr": 1e-30,
            }
        )
        outs.append(loop.run_step(loop.build(config), 0, PatternPool(config.algo.k)))
    one, four = outs
    assert sum(four[f"group/prompts/{g}of4"] for g in range(5)) == 8  # every prompt
    names = [
        f"group/{name}/{g}of4" for name in ("prompts", "tokens", "L", "w", "wL") for g in range(5)
    ]
    for name in names + ["tokens", "entropy", "ratio_mean", "sampler_logp_gap"]:
        assert four[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), name


def test_train_hands_periodic_eval_metrics_to_on_step(tmp_path):
    """loop.train evaluates every eval.every_steps steps and passes those numbers to
    on_step with the step's metrics, equal to the report it writes in the workdir."""
    config = tiny_config(**{"train.steps": 2, "eval.every_steps": 2, "train.ckpt_every": 0})
    seen = {}
    loop.train(config, str(tmp_path), on_step=lambda s, m: seen.setdefault(s, m))
    name = "eval/generated_heldout/mean_at_1"
    assert name not in seen[0] and "loss" in seen[1]
    report = json.loads((tmp_path / "eval_step2.json").read_text())
    assert seen[1][name] == report["benchmarks"]["generated_heldout"]["mean@1"]


@pytest.fixture
def sigterm_handler():
    """A SIGTERM handler of the caller's, installed for the test (train must give it back)."""

    def mine(signum, frame):
        raise AssertionError("unexpected SIGTERM")

    previous = signal.signal(signal.SIGTERM, mine)
    yield mine
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("rank", [0, 4])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, rank, sigterm_handler):
    """Also with LoRA (rank 4): its checkpoints hold the adapters, DARO weights and
    optimizer alone, and the resumed run checks the base it restores onto. train gives the
    caller's SIGTERM handler back when it returns or raises."""
    monkeypatch.setattr(loop.rewards, "RewardPool", lambda *a, **k: _ContextPool(4))
    lora = {"model.lora.rank": rank, "model.lora.alpha": 8.0}
    config = tiny_config(**{"train.steps": 4, "train.ckpt_every": 2, **lora})
    full: dict[int, dict] = {}
    loop.train(config, str(tmp_path / "full"), on_step=lambda s, m: full.setdefault(s, m))
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler

    class Crash(Exception):
        pass

    def crash_at_3(step, _):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        loop.train(config, str(tmp_path / "resumed"), on_step=crash_at_3)
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler
    resumed: dict[int, dict] = {}
    loop.train(config, str(tmp_path / "resumed"), on_step=lambda s, m: resumed.setdefault(s, m))
    assert sorted(resumed) == [2, 3]  # restarted from the step-2 checkpoint
    for step in (2, 3):
        for name in ("loss", "grad_norm", "reward", "entropy", "daro/w_after_update/1of4"):
            assert resumed[step][name] == full[step][name], (step, name)
    with checkpoint.Checkpointer(str(tmp_path / "resumed"), keep=3, every=2) as ckpt:
        assert ckpt.latest_step() == 4
        assert ckpt.restore_meta()["step"] == 4
    if rank:  # evaluation restores the trained adapters on the base
        mesh = sharding.make_mesh(config.mesh.shape)
        policy, label, _ = evaluation.load_policy(config, str(tmp_path / "resumed"), mesh)
        b = policy.params["layers"]["attn"]["q"]["lora_b"]
        assert label == "step4" and np.abs(np.asarray(b)).max() > 0
        config.seed = 1  # the adapters on another base (the random init of another seed)
        config.train.steps = 5
        with pytest.raises(checkpoint.IncompatibleCheckpointError, match="trained on the base"):
            loop.train(config, str(tmp_path / "resumed"))
        with pytest.raises(checkpoint.IncompatibleCheckpointError, match="trained on the base"):
            evaluation.load_policy(config, str(tmp_path / "resumed"), mesh)


class _ContextPool(PatternPool):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_nonfinite_loss_stops_the_run_without_saving_it(tmp_path, monkeypatch):
    """An absurd learning rate blows the params up; the step whose loss or gradient is not
    finite raises, names itself and the metric, and leaves the last checkpoint intact."""
    monkeypatch.setattr(loop.rewards, "RewardPool", lambda *a, **k: _ContextPool(4))
    config = tiny_config(
        **{"optim.lr": 1e30, "optim.grad_clip": 0.0, "train.steps": 6, "train.ckpt_every": 1}
    )
    with pytest.raises(FloatingPointError, match=r"step \d+ \(update 0\): non-finite"):
        loop.train(config, str(tmp_path))
    with checkpoint.Checkpointer(str(tmp_path), keep=3, every=1) as ckpt:
        last = ckpt.latest_step()
        assert last is not None and last < 6
        state, meta = ckpt.restore(
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                loop.build(config).state,
            )
        )
    assert meta["step"] == last
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_lora_trains_the_adapters_alone_and_the_base_stays_bit_identical():
    """With LoRA the state, the gradients and the optimizer hold the adapters (and DARO
    weights) alone; the frozen base is the same bits after updates; the sampler decodes the
    adapted policy (its log-probs are the update's).

    And the old policy: two updates per step (ppo_epochs = 2), π_old from the separate
    logprob pass over the whole batch (`update.jit_logprobs`, its own packing), π from the
    update's forward over the minibatch. Before the first update they are the same policy,
    so ρ = π / π_old is 1 up to rounding unless the two passes disagree on a token; the
    second update sees the moved policy, ρ ≠ 1."""
    config = tiny_config(
        **{
            "model.lora.rank": 4,
            "model.lora.alpha": 8.0,
            "train.ppo_epochs": 2,
            "train.batch_prompts": 8,
            "optim.lr": 1e-2,
        }
    )
    run = loop.build(config)
    base = jax.device_get(run.base)
    outs = [loop.run_step(run, step, PatternPool(config.algo.k)) for step in range(2)]
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(jax.device_get(run.base)), strict=True):
        np.testing.assert_array_equal(a, b)
    trained = jax.tree_util.tree_flatten_with_path(params_of(run)["model"])[0]
    assert {path[-1].key for path, _ in trained} == {"lora_a", "lora_b"}
    assert all(np.abs(x).max() > 0 for _, x in trained)  # B moved off zero
    adapter_sizes = sum(x.size for _, x in trained)
    daro_size = params_of(run)["daro"].size
    opt_sizes = sum(x.size for x in jax.tree.leaves(run.state["opt"]))
    assert opt_sizes <= 2 * adapter_sizes + 3 * daro_size + 16  # Adam moments, nothing else
    for out in outs:
        assert out["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert out["ratio_max"] == pytest.approx(1.0, abs=1e-4)
        assert abs(out["last_update/ratio_mean"] - 1.0) > 1e-3
        assert out["sampler_logp_gap"] <= 1e-4
