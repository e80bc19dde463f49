"""Checkpointer: sharded round trip, keep-last-M, atomicity, config compatibility, SIGTERM."""

import errno
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import largest_array_file, load_config_file, run_processes, truncate_half
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from daro_jax import checkpoint as ck
from daro_jax import sharding
from daro_jax.errors import PathError


def _state(mesh):
    """A train-state-like pytree: f32/bf16 params sharded over `mesh`, adam state, int, keys."""

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    rng = np.random.default_rng(0)
    params = {
        "embed": put(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), P("fsdp", "tensor")),
        "layers": [
            put(jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16), P("data", None)),
            put(jnp.asarray(rng.normal(size=(6,)), jnp.float32), P()),
        ],
    }
    opt_state = optax.adamw(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5, opt_state)  # not all zeros
    return {
        "params": params,
        "opt": opt_state,
        "daro": {"log_w": put(jnp.linspace(-1.0, 1.0, 8), P("data"))},
        "step": jnp.int32(7),
        "tokens": put(jnp.arange(16, dtype=jnp.int32).reshape(2, 8), P(None, "tensor")),
        "rng": jax.random.key_data(jax.random.key(42)),
        "typed_rng": jax.random.key(3),
    }


def _abstract(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def _host(tree):
    """Values as NumPy (typed keys as their key data) to compare independently of layout."""
    return jax.tree.map(
        lambda x: np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        ),
        tree,
    )


META = {"data_position": 123, "config": {"algo": {"name": "daro", "k": 8}}}


@pytest.fixture(scope="module")
def mesh3():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))


def test_round_trip_onto_other_sharding(tmp_path, mesh3):
    state = _state(mesh3)
    expected = _host(state)
    with ck.Checkpointer(tmp_path, keep=2, every=1) as ckpt:
        assert ckpt.save(5, state, META)
        # Donation safety: the async save must not read the device buffers after returning.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()

    # Restore on a different (8,) mesh: everything sharded on its leading axis when possible.
    mesh8 = jax.make_mesh((8,), ("x",))
    flat = jax.tree.map(
        lambda x: NamedSharding(mesh8, P("x") if x.ndim and x.shape[0] % 8 == 0 else P()),
        expected,
    )
    abstract = _abstract(jax.eval_shape(lambda: _state(mesh3)), flat)
    with ck.Checkpointer(tmp_path, keep=2, every=1) as ckpt:
        assert ckpt.latest_step() == 5
        restored, meta = ckpt.restore(abstract)
    assert meta == META
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    for got, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert got.dtype == target.dtype and got.shape == target.shape
        assert got.sharding == target.sharding
    host = jax.tree.leaves(_host(restored))
    for got, want in zip(host, jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert jax.random.key_data(restored["typed_rng"]).tolist() == expected["typed_rng"].tolist()


def test_keep_last_and_interval(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with ck.Checkpointer(tmp_path, keep=2, every=2) as ckpt:
        assert ckpt.latest_step() is None
        started = [ckpt.save(s, {"w": state["w"] * s}, {"step": s}) for s in range(1, 8)]
        assert started == [False, True, False, True, False, True, False]
        assert ckpt.save(7, {"w": state["w"] * 7}, {"step": 7}, force=True)
        assert not ckpt.save(7, state, {"step": 7}, force=True)  # already saved: no error
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert ckpt.latest_step() == 7
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]
    with ck.Checkpointer(tmp_path, keep=2, every=2) as ckpt:
        abstract = jax.eval_shape(lambda: state)
        w, meta = ckpt.restore(abstract, step=6)
        np.testing.assert_array_equal(w["w"], np.arange(4.0) * 6)
        assert meta == {"step": 6} and ckpt.restore_meta() == {"step": 7}


def test_no_checkpoint(tmp_path):
    with ck.Checkpointer(tmp_path, keep=1, every=0) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore(jax.eval_shape(lambda: {"w": jnp.zeros(2)})) is None
        assert ckpt.restore_meta() is None
        assert not ckpt.save(10, {"w": jnp.zeros(2)}, {})  # every=0: only forced saves
        with pytest.raises(FileNotFoundError, match="step 3"):
            ckpt.restore_meta(step=3)


def test_leftover_tmp_dir_is_ignored(tmp_path):
    state = {"w": jnp.arange(6.0)}
    with ck.Checkpointer(tmp_path, keep=3, every=1) as ckpt:
        ckpt.save(2, state, {"step": 2})
    # A crash during the save of step 9: orbax's temporary directory, half written.
    root = tmp_path / "checkpoints"
    tmp = root / "9.orbax-checkpoint-tmp"
    shutil.copytree(root / "2", tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")
    with ck.Checkpointer(tmp_path, keep=3, every=1) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
        np.testing.assert_array_equal(restored["w"], np.arange(6.0))
        assert meta == {"step": 2}
        assert ckpt.save(4, {"w": state["w"] + 1}, {"step": 4})
        ckpt.wait()
        restored, _ = ckpt.restore(jax.eval_shape(lambda: state))
        np.testing.assert_array_equal(restored["w"], np.arange(6.0) + 1)
    # The leftover is deleted (in the background, finished before the next save).
    assert sorted(os.listdir(root)) == ["2", "4"]


@pytest.mark.parametrize("broken", ["meta/metadata", "array file"])
def test_unreadable_latest_checkpoint_is_skipped_with_a_warning(tmp_path, broken, caplog):
    """A latest checkpoint with a truncated file is skipped with one warning naming it and
    the cause; the run resumes from the newest intact one. None intact: one line says so.
    Evaluation's read-only access (`read_meta`) skips a checkpoint with a truncated meta
    alike."""
    state = {"w": jnp.arange(1000.0)}
    with ck.Checkpointer(tmp_path, keep=3, every=1, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": state["w"] * step}, {"step": step})
    root = tmp_path / "checkpoints"
    for step in (2, 3):
        truncate_half(
            root / str(step) / "meta" / "metadata"
            if broken[0] == "m"
            else largest_array_file(root, step)
        )
    abstract = jax.eval_shape(lambda: state)
    with ck.Checkpointer(tmp_path, keep=3, every=1) as ckpt:
        restored, meta = ckpt.restore(abstract)
        assert ckpt.restore_meta() == {"step": 1 if broken[0] == "m" else 3}
    np.testing.assert_array_equal(restored["w"], np.arange(1000.0))
    assert meta == {"step": 1}
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 2, warnings  # steps 3 and 2, once each
    assert warnings[0].startswith(f"the checkpoint {root / '3'} cannot be read (")
    assert warnings[1].startswith(f"the checkpoint {root / '2'} cannot be read (")
    assert all(w.endswith("); skipped") for w in warnings), warnings
    cause = "JSONDecodeError" if broken[0] == "m" else "Encountered error while reading"
    assert all(cause in w for w in warnings), warnings
    if broken[0] == "m":
        assert ck.read_meta(tmp_path) == (1, {"step": 1})
    truncate_half(root / "1" / "meta" / "metadata")
    unreadable = rf"^no checkpoint in {root} can be read: step 3 "
    with ck.Checkpointer(tmp_path, keep=3, every=1) as ckpt, pytest.raises(PathError) as e:
        ckpt.restore(abstract)
    assert re.match(unreadable, str(e.value)), str(e.value)
    assert "\n" not in str(e.value) and "step 1 (JSONDecodeError" in str(e.value)
    if broken[0] == "m":
        with pytest.raises(PathError, match=unreadable):
            ck.read_meta(tmp_path)


def test_workdir_that_is_a_file_is_a_path_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PathError, match=r"workdir .*/file is a file; give a folder"):
        ck.Checkpointer(tmp_path / "file", keep=1, every=1)


def test_read_only_access_restores_one_part_and_leaves_a_save_in_flight(tmp_path, mesh3):
    """read_meta / restore_part read the params of a step onto new shardings and nothing
    else of the state; a half-written save (orbax's tmp folder) is neither read nor
    deleted, where opening a Checkpointer would delete it."""
    assert not ck.has_checkpoints(tmp_path)
    state = _state(mesh3)
    expected = _host(state)
    with ck.Checkpointer(tmp_path, keep=3, every=1) as ckpt:
        ckpt.save(3, state, META)
        ckpt.save(5, jax.tree.map(lambda x: x, state), {**META, "data_position": 5})
    in_flight = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / "5", in_flight)
    assert ck.has_checkpoints(tmp_path)
    assert ck.read_meta(tmp_path) == (5, {**META, "data_position": 5})
    assert ck.read_meta(tmp_path, 3) == (3, META)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 .* steps: \[3, 5\]"):
        ck.read_meta(tmp_path, 4)
    replicated = NamedSharding(jax.make_mesh((8,), ("x",)), P())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), expected["params"]
    )
    part = ck.restore_part(tmp_path, 3, {"params": target})
    assert set(part) == {"params"}
    for got, want in zip(
        jax.tree.leaves(part["params"]), jax.tree.leaves(expected["params"]), strict=True
    ):
        assert got.sharding == replicated
        np.testing.assert_array_equal(np.asarray(got), want)
    assert in_flight.is_dir()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        ck.read_meta(tmp_path / "nothing")


def test_mismatched_target_names_the_leaves(tmp_path):
    with ck.Checkpointer(tmp_path, keep=1, every=1) as ckpt:
        ckpt.save(1, {"a": jnp.zeros((4, 2)), "b": {"c": jnp.zeros(3, jnp.int32)}}, {})
        ckpt.wait()
        target = jax.eval_shape(
            lambda: {"a": jnp.zeros((4, 3)), "b": {"c": jnp.zeros(3)}, "d": jnp.zeros(1)}
        )
        with pytest.raises(ValueError) as e:
            ckpt.restore(target)
    msg = str(e.value)
    assert "a: checkpoint float32[4, 2], this run float32[4, 3]" in msg
    assert "b/c: checkpoint int32[3], this run float32[3]" in msg
    assert "d: in this run, not in the checkpoint" in msg


def test_meta_must_be_json(tmp_path):
    with ck.Checkpointer(tmp_path, keep=1, every=1) as ckpt:
        with pytest.raises(TypeError, match="meta\\['position'\\]"):
            ckpt.save(1, {"w": jnp.zeros(1)}, {"position": np.zeros(2)})
        assert ckpt.latest_step() is None


def test_bad_options():
    with pytest.raises(ValueError, match="keep=0"):
        ck.Checkpointer("/nonexistent", keep=0, every=1)
    with pytest.raises(ValueError, match="every=-1"):
        ck.Checkpointer("/nonexistent", keep=1, every=-1)


def test_check_compatible():
    saved = {
        "model": {"path": "Qwen/Qwen2.5-Math-1.5B"},
        "algo": {"name": "daro", "k": 8},
        "train": {"batch_prompts": 32, "lr_like": 1e-6},
        "mesh": {"shape": [1, -1, 1]},
        "data": {"source": "generated"},
    }
    current = {
        "model": {"path": "Qwen/Qwen2.5-Math-1.5B"},
        "algo": {"name": "daro", "k": 8},
        "train": {"batch_prompts": 32, "lr_like": 2e-6},
        "mesh": {"shape": (1, -1, 1)},
        "data": {"source": "generated"},
    }
    ck.check_compatible(saved, current)  # lr may change on resume
    ck.check_compatible(saved, current, keys=("mesh.shape",))  # tuple == its JSON list
    current["algo"]["k"] = 16
    current["model"]["path"] = "other"
    with pytest.raises(ck.IncompatibleCheckpointError) as e:
        ck.check_compatible(json.dumps(saved), current)
    msg = str(e.value)
    assert "algo.k: checkpoint 8, this run 16" in msg
    assert "model.path: checkpoint 'Qwen/Qwen2.5-Math-1.5B', this run 'other'" in msg
    assert "algo.name" not in msg and "batch_prompts" not in msg
    with pytest.raises(ck.IncompatibleCheckpointError, match="algo.missing: checkpoint '<absent>'"):
        ck.check_compatible(saved, {**saved, "algo": {"missing": 1}}, keys=("algo.missing",))


def test_sigterm_sets_flag_and_the_previous_handler_comes_back():
    """Inside `handling_sigterm` SIGTERM sets the flag and the process lives on; on leaving
    it, even by an exception, the handler installed before is back."""

    def mine(signum, frame):
        raise AssertionError("the handler of handling_sigterm should have run")

    ck.clear_preemption()
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(KeyError), ck.handling_sigterm():
            assert signal.getsignal(signal.SIGTERM) is not mine
            assert not ck.preemption_requested() and not ck.any_process_preempted()
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not ck.preemption_requested() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ck.preemption_requested() and ck.any_process_preempted()
            raise KeyError("leaving by an exception")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
        ck.clear_preemption()


def _fail_saves_of(monkeypatch, step: int) -> None:
    """Orbax's write of the `meta` item of checkpoint `step` raises ENOSPC, as a full disk
    would (in the background thread of an asynchronous save)."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def save_fn(self, item, directory):
        if directory.parent.name.split(".")[0] == str(step):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)


FAILED_2 = r"step 2 in .* failed \(OSError: .*No space left on device.*step 1, is intact"


def _restores_step_1(tmp_path):
    with ck.Checkpointer(tmp_path, keep=1, every=1) as ckpt:
        assert ckpt.all_steps() == [1]
        state, meta = ckpt.restore(jax.eval_shape(lambda: {"w": jnp.zeros(4)}))
    assert meta == {"step": 1}
    np.testing.assert_array_equal(state["w"], np.arange(4.0))


def test_failed_background_save_stops_the_next_save(tmp_path, monkeypatch):
    """The save of step 2 fails after `save` returned: the next `save` raises, naming step 2
    and the cause, starts nothing, and step 1 (keep=1) is not deleted."""
    _fail_saves_of(monkeypatch, 2)
    with ck.Checkpointer(tmp_path, keep=1, every=1) as ckpt:
        assert ckpt.save(1, {"w": jnp.arange(4.0)}, {"step": 1})
        assert ckpt.save(2, {"w": jnp.arange(4.0) * 2}, {"step": 2})
        with pytest.raises(ck.CheckpointSaveError, match=FAILED_2):
            ckpt.save(3, {"w": jnp.arange(4.0) * 3}, {"step": 3})
        assert ckpt.all_steps() == [1]
    _restores_step_1(tmp_path)


def test_failed_last_save_raises_at_close(tmp_path, monkeypatch):
    _fail_saves_of(monkeypatch, 2)
    ckpt = ck.Checkpointer(tmp_path, keep=1, every=1)
    ckpt.save(1, {"w": jnp.arange(4.0)}, {"step": 1})
    ckpt.save(2, {"w": jnp.arange(4.0) * 2}, {"step": 2})
    with pytest.raises(ck.CheckpointSaveError, match=FAILED_2):
        ckpt.close()
    _restores_step_1(tmp_path)


def test_failed_synchronous_save_raises_at_once(tmp_path, monkeypatch):
    _fail_saves_of(monkeypatch, 2)
    with ck.Checkpointer(tmp_path, keep=1, every=1, async_save=False) as ckpt:
        assert ckpt.save(1, {"w": jnp.arange(4.0)}, {"step": 1})
        with pytest.raises(ck.CheckpointSaveError, match=FAILED_2):
            ckpt.save(2, {"w": jnp.arange(4.0) * 2}, {"step": 2})
    _restores_step_1(tmp_path)


def test_training_stops_when_a_save_fails_and_the_last_good_one_restores(tmp_path, monkeypatch):
    """train.loop.train with the step-4 save failing: the run raises, naming step 4 and the
    cause; step 2 (keep=1) is intact and a new run restores its whole state."""
    from daro_jax.train import loop

    config = load_config_file(
        "configs/tiny.py",
        **{
            "train.steps": 4,
            "train.ckpt_every": 2,
            "train.keep_checkpoints": 1,
            "reward.num_workers": 1,
        },
    )
    _fail_saves_of(monkeypatch, 4)
    with pytest.raises(ck.CheckpointSaveError, match=r"step 4 .*No space left.*step 2, is intact"):
        loop.train(config, str(tmp_path))
    with ck.Checkpointer(tmp_path, keep=1, every=2) as ckpt:
        assert ckpt.all_steps() == [2]
        assert loop.resume(loop.build(config), ckpt, json.loads(config.to_json())) == 2


def _two_process_worker(process_id, num_processes, port, workdir):
    """One of 2 CPU processes (4 devices each): preemption agreement, collective save/restore."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{port}", num_processes=int(num_processes), process_id=process_id
    )
    mesh = jax.make_mesh((8,), ("x",))
    full = np.arange(64, dtype=np.float32).reshape(8, 8)
    w = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("x")), lambda i: full[i])
    ck.install_sigterm_handler()
    assert not ck.any_process_preempted()
    if process_id == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        while not ck.preemption_requested():
            time.sleep(0.01)
    agreed = ck.any_process_preempted()
    with ck.Checkpointer(workdir, keep=1, every=1) as ckpt:
        ckpt.save(3, {"w": w}, {"pos": 3})
        ckpt.wait()
        target = NamedSharding(mesh, P(None, "x"))
        state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=target)})
    shards_ok = all(
        np.array_equal(np.asarray(s.data), full[s.index]) for s in state["w"].addressable_shards
    )
    ok = shards_ok and state["w"].sharding == target and meta == {"pos": 3}
    print(json.dumps({"local": ck.preemption_requested(), "agreed": agreed, "restored": ok}))


def test_two_processes_save_collectively_and_agree_on_preemption(tmp_path):
    results = run_processes(__file__, 2, 4, tmp_path, timeout=120)
    assert results == [
        {"local": False, "agreed": True, "restored": True},
        {"local": True, "agreed": True, "restored": True},
    ]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


if __name__ == "__main__":
    _two_process_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])


# configs/tiny.py shrunk (bf16 params, hidden 2, the embedding frozen: 276 KB), one DARO
# step at commit 116639e, before the package move of issue 23:
#   python -m daro_jax.main --config=configs/tiny.py --workdir=W --config.train.steps=1
#     --config.train.ckpt_every=1 --config.algo.name=daro --config.eval.every_steps=0
#     --config.model.param_dtype=bfloat16 --config.reward.num_workers=1
#     --config.model.arch_overrides.{hidden_size=2,intermediate_size=4,
#       num_attention_heads=1,num_key_value_heads=1,head_dim=2}
#     "--config.optim.frozen=('embed/embedding',)"
OLD_RUN = Path(__file__).parent / "fixtures" / "checkpoint_116639e_tiny"
OLD_OVERRIDES = {
    "train.steps": 1,
    "train.ckpt_every": 1,
    "algo.name": "daro",
    "eval.every_steps": 0,
    "model.param_dtype": "bfloat16",
    "reward.num_workers": 1,
    "optim.frozen": ("embed/embedding",),
    **{
        f"model.arch_overrides.{name}": size
        for name, size in (
            ("hidden_size", 2),
            ("intermediate_size", 4),
            ("num_attention_heads", 1),
            ("num_key_value_heads", 1),
            ("head_dim", 2),
        )
    },
}


def test_checkpoint_written_before_the_move_restores(tmp_path):
    """A checkpoint of the old layout restores with today's code onto today's abstract state
    (on 8 devices; it was written on 1): params, optimizer state, DARO weights and the data
    position. The frozen embedding equals today's random init of the same seed (an
    independent derivation), the DARO weights their initial values (no group had
    0 < μ < 1: the random policy answers nothing), the optimizer counted one update, and
    every array equals orbax's plain read of the files."""
    from daro_jax import data, models
    from daro_jax.algo import daro, presets
    from daro_jax.models import decoder
    from daro_jax.train import state as train_state

    shutil.copytree(OLD_RUN, tmp_path / "run")
    config = load_config_file(Path(__file__).parents[1] / "configs" / "tiny.py", **OLD_OVERRIDES)
    config.mesh.shape = (-1, 1, 1)
    mesh = sharding.make_mesh(config.mesh.shape)
    cfg = models.from_config(config.model, mesh, seed=config.seed, abstract=True).config
    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    like = train_state.abstract_state(config, cfg, spec, mesh)
    with ck.Checkpointer(tmp_path / "run", keep=3, every=1) as ckpt:
        restored, meta = train_state.restore(ckpt, like, json.loads(config.to_json()))
    assert meta["step"] == 1
    iterator = data.PromptIterator([{}] * 10000, 4, config.seed, 0, 1)
    iterator.restore(meta["data_position"])
    assert iterator.state() == {"epoch": 0, "index": 4, "num_examples": 10000, "seed": 0}
    params = restored["params"]
    embedding = decoder.init_params(cfg, jax.random.key(config.seed))["embed"]["embedding"]
    assert params["model"]["embed"]["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["model"]["embed"]["embedding"], np.float32),
        np.asarray(embedding, np.float32),
    )
    np.testing.assert_array_equal(params["daro"], daro.init_weights(spec))
    counts = [
        int(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored["opt"])[0]
        if getattr(path[-1], "name", None) in ("count", "step") and np.ndim(leaf) == 0
    ]
    assert counts and set(counts) == {1}, counts
    raw = ocp.PyTreeCheckpointer().restore(tmp_path / "run" / "checkpoints" / "1" / "state")
    got, want = (ocp.tree.to_flat_dict(_host(tree)) for tree in (restored, raw))
    assert got.keys() == want.keys()
    for path in got:
        np.testing.assert_array_equal(
            np.asarray(got[path], np.float32), np.asarray(want[path], np.float32), str(path)
        )
