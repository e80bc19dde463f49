"""The train-state optimizer: AdamW for the model, lazy projected Adam for DARO weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from daro_jax.algo import daro, optim, presets

K = 4
EMBED_SHAPE = (7, 5)  # a shape no other parameter has


def algo_spec(**overrides):
    cfg = base.get_config().algo
    cfg.k = K
    for key, value in overrides.items():
        cfg[key] = value
    return presets.resolve(cfg, max_response_len=16)


def optim_cfg(**overrides):
    cfg = base.get_config().optim
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def random_state(spec, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {
        "params": {
            "embed": {"embedding": normal(*EMBED_SHAPE)},
            "layers": {"kernel": normal(3, 4), "bias": normal(4)},
            "head": {"kernel": normal(4, 2)},
        }
    }
    state = optim.init_params(params, spec)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), state)
    return state, grads


def test_first_update_moves_daro_weights_at_1000x_the_model_lr():
    # ln w starts at 0, where the projected update p + u - p is exact in float32 (w = 1 would
    # round it to float32's spacing near 1).
    spec = algo_spec(daro_parameterization="log")
    state, grads = random_state(spec)
    cfg = optim_cfg(frozen=("params/embed/.*",))
    lr, wd, clip = cfg.lr, cfg.weight_decay, cfg.grad_clip
    tx = optim.make_optimizer(cfg, state, total_steps=10, spec=spec)
    updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
    # Adam's first step is lr * g / (|g| + eps): NumPy, after clipping the trainable model
    # gradients to global norm `clip`, plus decoupled weight decay lr * wd * p.
    trainable = [grads["model"]["params"][n] for n in ("layers", "head")]
    norm = np.sqrt(sum(np.sum(np.square(g)) for t in trainable for g in jax.tree.leaves(t)))
    assert norm > clip
    for name in ("layers", "head"):
        for key, g in grads["model"]["params"][name].items():
            g_c = np.asarray(g) * clip / norm
            p = np.asarray(state["model"]["params"][name][key])
            expected = -lr * (g_c / (np.abs(g_c) + 1e-8) + wd * p)
            np.testing.assert_allclose(updates["model"]["params"][name][key], expected, rtol=1e-5)
    g = np.asarray(grads["daro"])
    expected = -1000.0 * lr * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(updates["daro"], expected, rtol=1e-6)
    # Without weight decay both steps are lr-sized: the ratio is the multiplier, 1000.
    tx = optim.make_optimizer(optim_cfg(weight_decay=0.0), state, 10, spec)
    updates, _ = tx.update(grads, tx.init(state), state)
    model_steps = np.concatenate([np.abs(u).ravel() for u in jax.tree.leaves(updates["model"])])
    np.testing.assert_allclose(np.abs(updates["daro"]) / model_steps.mean(), 1000.0, rtol=1e-5)


def test_frozen_params_do_not_change_and_hold_no_moments():
    spec = algo_spec()
    state, grads = random_state(spec)
    tx = optim.make_optimizer(optim_cfg(frozen=("params/embed/.*",)), state, 10, spec)
    opt_state = tx.init(state)
    shapes = [leaf.shape for leaf in jax.tree.leaves(opt_state)]
    assert EMBED_SHAPE not in shapes
    adam = opt_state.inner_states["model"].inner_state[1][0]
    assert isinstance(adam.mu["model"]["params"]["embed"]["embedding"], optax.MaskedNode)
    assert adam.mu["model"]["params"]["head"]["kernel"].shape == (4, 2)
    n_model = sum(x.size for x in jax.tree.leaves(state["model"])) - np.prod(EMBED_SHAPE)
    n_state = sum(np.size(x) for x in jax.tree.leaves(opt_state))
    scalars = n_state - 2 * n_model - 3 * (K - 1)  # Adam mu, nu; lazy Adam count, mu, nu
    assert 0 < scalars <= 4  # step counters only
    update = jax.jit(tx.update)
    new = state
    for _ in range(3):
        updates, opt_state = update(grads, opt_state, new)
        new = optax.apply_updates(new, updates)
    frozen, moved = new["model"]["params"]["embed"], new["model"]["params"]["head"]
    np.testing.assert_array_equal(
        frozen["embedding"], state["model"]["params"]["embed"]["embedding"]
    )
    assert np.all(moved["kernel"] != state["model"]["params"]["head"]["kernel"])


def test_model_part_matches_optax_adamw_and_ignores_daro_grads_in_clipping():
    spec = algo_spec()
    state, grads = random_state(spec)
    cfg = optim_cfg(warmup_steps=2, schedule="cosine")
    tx = optim.make_optimizer(cfg, state, total_steps=5, spec=spec)
    schedule = optim.learning_rate_schedule(cfg, 5)
    ref = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay),
    )
    opt_state, ref_state = tx.init(state), ref.init(state["model"])
    new, ref_params = state, state["model"]
    for step in range(4):
        big = dict(grads, daro=grads["daro"] * 1e6 * (step + 1))  # not part of the norm
        updates, opt_state = tx.update(big, opt_state, new)
        new = optax.apply_updates(new, updates)
        ref_updates, ref_state = ref.update(grads["model"], ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    for a, b in zip(jax.tree.leaves(new["model"]), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_schedules():
    cfg = optim_cfg(lr=2e-6, warmup_steps=4, schedule="constant")
    sched = optim.learning_rate_schedule(cfg, 20)
    expected = [2e-6 * min(1.0, (t + 1) / 4) for t in range(10)]
    np.testing.assert_allclose([sched(t) for t in range(10)], expected, rtol=1e-6)
    cfg = optim_cfg(lr=1.0, warmup_steps=2, schedule="cosine")
    sched = optim.learning_rate_schedule(cfg, 12)
    cos = [0.5 * (1 + np.cos(np.pi * (t - 2) / 10)) for t in range(2, 13)]
    np.testing.assert_allclose([sched(t) for t in range(13)], [0.5, 1.0, *cos], atol=1e-6)
    assert float(sched(12)) < 1e-6 and float(sched(100)) < 1e-6
    assert float(optim.learning_rate_schedule(optim_cfg(), 1)(0)) == pytest.approx(1e-6)


@pytest.mark.parametrize("param", ["log", "direct"])
def test_daro_weights_are_projected_onto_bounds(param):
    spec = algo_spec(daro_parameterization=param, daro_log_weight_bounds=(-0.5, 0.002))
    state, grads = random_state(spec)
    grads["daro"] = -jnp.ones(K - 1)  # every weight pushed up, by 1000 * lr = 1e-3 per step
    tx = optim.make_optimizer(optim_cfg(), state, 10, spec)
    update = jax.jit(tx.update)
    opt_state = tx.init(state)
    trace = []
    for _ in range(4):
        updates, opt_state = update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        trace.append(float(daro.weights(state["daro"], spec)[0]))
    top = np.exp(0.002)  # "log" steps ln w by 1e-3, "direct" steps w by 1e-3
    expected = [np.exp(1e-3), top, top, top] if param == "log" else [1.001, 1.002, top, top]
    np.testing.assert_allclose(trace, expected, rtol=1e-6)


def test_absent_group_weight_does_not_move():
    """A DARO weight whose gradient is exactly 0 (its group absent from the batch:
    test_losses.py) keeps its value, Adam moments and step count (lazy Adam) while the
    others move; plain Adam would move it on its momentum. Without params the update is
    refused (the projection needs them)."""
    spec = algo_spec()
    state, grads = random_state(spec)
    tx = optim.make_optimizer(optim_cfg(), state, 100, spec)
    update = jax.jit(tx.update)
    plain = optax.adam(1e-3)
    opt_state, plain_state, plain_params = tx.init(state), plain.init(state["daro"]), state["daro"]
    rng = np.random.default_rng(1)
    history, moments = [], []
    for i in range(12):
        g = rng.normal(size=K - 1).astype(np.float32)
        g[2] = g[2] if i < 4 else 0.0  # group 3 absent from the fifth update on
        grads["daro"] = jnp.asarray(g)
        updates, opt_state = update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        plain_updates, plain_state = plain.update(grads["daro"], plain_state)
        plain_params = optax.apply_updates(plain_params, plain_updates)
        history.append(np.asarray(state["daro"]))
        daro_state = opt_state.inner_states["daro"].inner_state
        moments.append([float(daro_state.mu["daro"][2]), float(daro_state.nu["daro"][2])])
    history = np.array(history)
    assert np.all(np.diff(history[:4, 2]) != 0)  # moving while present
    np.testing.assert_array_equal(history[4:, 2], history[3, 2])  # frozen once absent
    assert np.all(np.diff(history[4:, :2], axis=0) != 0)
    np.testing.assert_array_equal(moments[4:], [moments[3]] * 8)
    np.testing.assert_array_equal(daro_state.count["daro"], [12, 12, 4])
    assert abs(float(plain_params[2]) - history[3, 2]) > 1e-4  # plain Adam would drift
    lazy = optim.lazy_adam_projected(lambda step: 0.1, 0.9, 0.999, (-10.0, 10.0))
    with pytest.raises(ValueError, match="pass params"):
        lazy.update(jnp.ones(3), lazy.init(jnp.zeros(3)))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(lr=0.0), "optim.lr=0.0"),
        (dict(lr=-1e-6), "optim.lr=-1e-06"),
        (dict(schedule="linear"), "optim.schedule='linear'"),
        (dict(warmup_steps=-1), "optim.warmup_steps=-1"),
        (dict(schedule="cosine", warmup_steps=10), "optim.warmup_steps=10"),
        (dict(b1=1.0), "optim.b1=1.0"),
        (dict(weight_decay=-0.1), "optim.weight_decay"),
        (dict(grad_clip=-1.0), "optim.grad_clip"),
        (dict(weight_lr_multiplier=0.0), "optim.weight_lr_multiplier"),
        (dict(frozen=("embed/.*",)), r"match no parameter path.*params/"),
        (dict(frozen=("params/(",)), "bad regex"),
    ],
)
def test_bad_optim_config_raises(overrides, match):
    spec = algo_spec()
    state, _ = random_state(spec)
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(optim_cfg(**overrides), state, 10, spec)


def test_bad_total_steps_raises():
    with pytest.raises(ValueError, match="total_steps=0"):
        optim.learning_rate_schedule(optim_cfg(), 0)


def test_weight_decay_mask_spares_biases_and_norm_scales():
    """decay_biases_and_norms=False (TRL's default): AdamW's first step is
    -lr (g / (|g| + eps) + wd p) on kernels and embeddings and -lr g / (|g| + eps) on biases
    and norm scales (NumPy); the default decays every leaf, as optax.adamw does."""
    spec = algo_spec()
    rng = np.random.default_rng(4)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {
        "embed": {"embedding": normal(7, 5)},
        "layers": {
            "attn": {"q": {"kernel": normal(2, 5, 3), "bias": normal(2, 3)}},
            "attn_norm": {"scale": normal(2, 5)},
        },
        "final_norm": {"scale": normal(5)},
    }
    state = optim.init_params(params, spec)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), state)
    spared = ("layers/attn/q/bias", "layers/attn_norm/scale", "final_norm/scale")
    flags = optim.decays(state)["model"]
    named = {optim._path_name(p): f for p, f in jax.tree_util.tree_leaves_with_path(flags)}
    assert named == {name: name not in spared for name in named} and len(named) == 5
    lr, wd = 1e-3, 0.1
    for mask_on in (True, False):
        cfg = optim_cfg(lr=lr, weight_decay=wd, grad_clip=0.0, decay_biases_and_norms=not mask_on)
        tx = optim.make_optimizer(cfg, state, total_steps=10, spec=spec)
        updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
        leaves = jax.tree_util.tree_leaves_with_path(updates["model"])
        for (path, u), g, p in zip(
            leaves, jax.tree.leaves(grads["model"]), jax.tree.leaves(params), strict=True
        ):
            g, p = np.asarray(g), np.asarray(p)
            decayed = not (mask_on and optim._path_name(path) in spared)
            expected = -lr * (g / (np.abs(g) + 1e-8) + wd * p * decayed)
            np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-9)


def test_zero_gradient_minibatch_moves_nothing_with_skip_zero_grad_updates():
    """A minibatch whose gradient is exactly zero (DARO with every mu in {0, 1}): plain AdamW
    still moves the model (momentum, weight decay); with skip_zero_grad_updates the model
    and its Adam state stay as they are, and the next real update is the one a run without
    the zero minibatch makes."""
    spec = algo_spec()
    state, grads = random_state(spec)
    zero = jax.tree.map(jnp.zeros_like, grads)

    def run(skip, schedule):
        tx = optim.make_optimizer(optim_cfg(skip_zero_grad_updates=skip), state, 10, spec)
        opt, params, seen = tx.init(state), state, []
        for g in schedule:
            updates, opt = jax.jit(tx.update)(g, opt, params)
            params = optax.apply_updates(params, updates)
            seen.append((params, opt))
        return seen

    (p1, o1), (p2, o2), (p3, _) = run(True, [grads, zero, grads])
    for a, b in zip(
        jax.tree.leaves((p1, o1.inner_states["model"])),
        jax.tree.leaves((p2, o2.inner_states["model"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    (_, _), (ref, _) = run(False, [grads, grads])
    for a, b in zip(jax.tree.leaves(p3["model"]), jax.tree.leaves(ref["model"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    (q1, _), (q2, _) = run(False, [grads, zero])
    pairs = zip(jax.tree.leaves(q1["model"]), jax.tree.leaves(q2["model"]), strict=True)
    assert all(np.all(a != b) for a, b in pairs)  # every model weight moved without a gradient
