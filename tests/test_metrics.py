"""metrics: the step's metrics against NumPy and hand counts, metric naming against hand-built
dictionaries, TensorBoard scalars read back by TensorBoard's own reader, MFU peaks by device
kind, the console lines."""

import math

import numpy as np
import pytest
from helpers import load_config_file

from daro_jax import metrics
from daro_jax.plan import chips


def test_flatten_names_groups_scalars_and_vectors():
    """Per-group [K+1] arrays become group/<name>/<g>of<K> (g = 0…K), 1-element arrays
    scalars, other arrays <name>/<i>; values are the array entries as floats."""
    k = 4
    loss = np.array([0.0, 0.5, -0.25, 1.5, 0.0], np.float32)
    out = metrics.flatten(
        {
            "group_loss": loss,
            "group_prompts": np.array([1, 0, 2, 1, 0]),
            "entropy": np.float32(0.75),
            "one": np.array([[3.0]]),
            "pair": np.array([[1.0, 2.0], [3.0, 4.0]]),
        },
        k,
    )
    want = {f"group/L/{g}of4": float(loss[g]) for g in range(5)}
    want |= {f"group/prompts/{g}of4": float(v) for g, v in enumerate([1, 0, 2, 1, 0])}
    want |= {"entropy": 0.75, "one": 3.0, "pair/0": 1.0, "pair/1": 2.0, "pair/2": 3.0}
    want |= {"pair/3": 4.0}
    assert out == want
    assert all(type(v) is float for v in out.values())


def test_first_nonfinite_follows_the_given_order():
    m = {"loss": 1.0, "grad_norm": math.inf, "grad_norm_daro": math.nan}
    assert metrics.first_nonfinite(m, ("loss", "grad_norm", "grad_norm_daro")) == "grad_norm"
    assert metrics.first_nonfinite(m, ("grad_norm_daro", "grad_norm")) == "grad_norm_daro"
    assert metrics.first_nonfinite(m, ("loss", "absent")) is None


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),  # v5e: not v5p's peak, though "TPU v5" is a prefix of both
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_kind(kind, peak):
    assert chips.peak_flops(kind) == peak


def test_writer_scalars_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = metrics.Writer(str(tmp_path))
    steps = {1: {"loss": 0.5, "group/L/1of8": -0.25}, 3: {"loss": 0.125}}
    for step, scalars in steps.items():
        writer.write(step, scalars)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["group/L/1of8", "loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (3, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("group/L/1of8")] == [(1, -0.25)]


def test_console_lines():
    m = {
        "reward": 0.25,
        "accuracy": 0.5,
        "loss": -0.0123456,
        "entropy": 1.5,
        "length_mean": 12.34,
        "time/sampler_s": 2.06,
        "time/update_s": 0.5,
        "not_shown": 7.0,
    }
    assert metrics.summary_line(3, m) == (
        "step 3 | reward 0.250 | acc 0.500 | loss -0.0123 | H 1.500 | len 12.3 | sample 2.1 "
        "| update 0.5"
    )
    assert metrics.closing_line(3, 10, m, "/w d") == (
        "done: step 3 of 10 | reward 0.250 | acc 0.500 | loss -0.0123 | H 1.500 | len 12.3 "
        "| checkpoints in /w d/checkpoints | view: tensorboard --logdir '/w d'"
    )


def test_startup_lines_of_the_tiny_recipe():
    config = load_config_file("configs/tiny.py")
    lines = metrics.startup_lines(config, "/runs/x", 1_234_567, {"data": 1, "fsdp": 8}, 64)
    a, t = config.algo, config.train
    assert lines[0].startswith(f"model        {config.model.path}: 1.2 M parameters")
    assert lines[2] == "mesh         data 1 × fsdp 8"
    assert lines[3].startswith(f"recipe       {a.name}, K={a.k}, {t.batch_prompts} prompts")
    assert lines[4] == f"data         {config.data.source}: 64 problems"
    assert lines[-1] == "TensorBoard  tensorboard --logdir /runs/x"


def _update(rng, spec, daro, loss: float):
    """The host outputs of one update over the rollouts of 2 random prompts (K each): its
    mask, group ids and the metric sums of `losses.microbatch_loss`."""
    import jax.numpy as jnp

    from daro_jax.algo import losses

    n, t = 2 * spec.k, 5
    mask = (np.arange(t)[None, :] < rng.integers(1, t + 1, n)[:, None]).astype(np.float32)
    groups = np.repeat(rng.integers(0, spec.k + 1, 2), spec.k)
    logp = jnp.asarray(rng.normal(-1.0, 0.3, (n, t)), jnp.float32)
    batch = losses.token_batch(logp, mask, rng.normal(0, 1, n), groups, spec)
    _, sums = losses.microbatch_loss(daro, logp, batch, spec)
    out = {"loss": loss, "grad_norm": 1.0 + loss, "grad_norm_daro": 2.0 + loss, "finite": 1.0}
    return out | {"sums": sums, "daro": np.asarray(daro)}, mask, groups


def test_update_metrics_cover_the_first_epoch_and_name_first_and_last():
    """3 updates, 2 minibatches: the group counts are those of the first two updates' rows
    (counted here with NumPy), the scalars the first update's, last_update/ the third's,
    and each DARO update's weights under daro/w_update<i>."""
    from configs import base
    from daro_jax.algo import daro, presets

    config = base.get_config()
    config.algo.k = 4
    spec = presets.resolve(config.algo, max_response_len=5)
    rng = np.random.default_rng(0)
    daros = [daro.init_weights(spec) * (1.0 + i) for i in range(3)]
    updates, masks, groups = zip(
        *[_update(rng, spec, d, loss) for d, loss in zip(daros, (0.5, 0.25, 0.125), strict=True)],
        strict=True,
    )
    out = metrics.update_metrics(updates, spec, minibatches=2)
    tokens = np.concatenate([m.sum(1) for m in masks[:2]])
    ids = np.concatenate(groups[:2])
    for g in range(spec.k + 1):
        assert out[f"group/tokens/{g}of4"] == pytest.approx(tokens[ids == g].sum())
        assert out[f"group/prompts/{g}of4"] == pytest.approx((ids == g).sum() / spec.k)
    assert (out["loss"], out["grad_norm"], out["last_update/loss"]) == (0.5, 1.5, 0.125)
    assert out["last_update/grad_norm_daro"] == 2.125
    for i, d in enumerate(daros):
        w = np.asarray(daro.weights(d, spec))
        assert [out[f"daro/w_update{i}/{g}of4"] for g in (1, 2, 3)] == pytest.approx(w)
    bad = dict(updates[1], grad_norm_daro=math.nan, finite=0.0)
    with pytest.raises(FloatingPointError, match=r"step 7 \(update 1\): non-finite grad_norm_daro"):
        metrics.check_finite(7, [updates[0], bad])


def test_rollout_metrics_and_throughput():
    """Lengths and truncation over the rows with a completion (padding rows have length 0);
    tokens per second as counted."""
    lengths = np.array([[3, 0], [5, 2]])
    truncated = np.array([[True, False], [False, False]])
    stats = {"reward": 0.5, "accuracy": 0.25, "length_correct": 4.0, "length_incorrect": 3.0}
    out = metrics.rollout_metrics(stats, lengths, truncated)
    assert out == {
        "reward": 0.5,
        "accuracy": 0.25,
        "length_mean": pytest.approx(10 / 3),
        "length_correct": 4.0,
        "length_incorrect": 3.0,
        "truncated_frac": pytest.approx(1 / 3),
    }
    speed = metrics.throughput(100.0, 300.0, {"sampler_s": 2.0, "update_s": 3.0}, 10, updates=2)
    assert speed["throughput/sampler_tokens_per_s"] == 50.0
    assert speed["throughput/update_tokens_per_s"] == 200.0
    assert "throughput/update_mfu" not in speed  # no known peak for CPU devices


@pytest.mark.parametrize("algo", ["daro", "grpo"])
def test_step_metrics_of_a_step_that_updated(algo):
    """A step's metrics: its updates' (first and last update), its rollouts' (lengths over
    the rows with a completion), the DARO weights after the updates (direct
    parameterization: w is the stored parameter; none for GRPO), the timings, and tokens
    per second of one process counted here by hand."""
    from configs import base
    from daro_jax.algo import presets

    config = base.get_config()
    config.algo.name, config.algo.k, config.algo.kl_beta = algo, 4, 0.0
    spec = presets.resolve(config.algo, max_response_len=5)
    rng = np.random.default_rng(1)
    updates = [_update(rng, spec, np.ones(3, np.float32), loss)[0] for loss in (0.5, 0.25)]
    rollouts = {
        "lengths": np.array([[3, 0, 1, 2], [5, 2, 0, 4]]),  # 17 new tokens, 6 completions
        "truncated": np.array([[True, False, False, False], [False, False, False, True]]),
        "prompt_mask": np.array([[0, 1, 1], [1, 1, 1]]),  # 5 prompt tokens
    }
    stats = {"reward": 0.5, "accuracy": 0.25, "length_correct": 4.0, "length_incorrect": 3.0}
    daro = np.array([0.5, 2.0, 1.5], np.float32)
    seconds = {"sampler_s": 2.0, "reward_s": 0.5, "update_s": 4.0}
    out = metrics.step_metrics(updates, stats, rollouts, daro, spec, 1, seconds, 10)
    assert (out["loss"], out["last_update/loss"], out["reward"]) == (0.5, 0.25, 0.5)
    assert out["length_mean"] == pytest.approx(17 / 6)
    assert out["truncated_frac"] == pytest.approx(2 / 6)
    weights = [out.get(f"daro/w_after_update/{g}of4") for g in (1, 2, 3)]
    assert weights == ([0.5, 2.0, 1.5] if algo == "daro" else [None] * 3)
    assert (out["time/sampler_s"], out["time/reward_s"], out["time/update_s"]) == (2.0, 0.5, 4.0)
    assert out["throughput/sampler_tokens_per_s"] == 17 / 2.0
    assert out["throughput/update_tokens_per_s"] == (17 + 5) * 2 / 4.0  # 2 updates
