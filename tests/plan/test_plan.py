"""The TPU plan (daro_jax/plan/report.py): configs/tiny.py's whole RL step compiled for a v5e 2×2.

These tests compile with libtpu, which requirements-test.txt installs (jax[tpu]); without
it they fail with the plan's own message naming the missing package. The compiled
numbers are checked for consistency with each other and with closed forms (the bytes of
the state the programs take, the model FLOPs a step must do); loop trip counts are
checked against the same program unrolled.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config_file
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax import plan
from daro_jax.models import decoder
from daro_jax.plan import chips, costs, programs
from daro_jax.train import packing

plan.compile_only("v5e-4")  # libtpu quiet, and loadable by the CLI runs and other workers
TINY = {"tpu.accelerator": "v5e-4", "reward.num_workers": 1}  # v5e:2x2, 4 chips
OVERSIZED = "--config.train.block_rows=65536"  # the update's logits: ~100 GiB a chip
PAPER_RECIPES = {  # recipe → published parameter count of its model
    "qwen2_5_math_1_5b": 1_543_714_304,
    "qwen2_5_math_7b": 7_615_616_512,
    "llama8b": 8_030_261_248,
}


@pytest.fixture(scope="module")
def tiny():
    """configs/tiny.py and its plan on a v5e 2×2 (the sampler and the update: on-policy,
    no KL, so no logprob pass)."""
    config = load_config_file("configs/tiny.py", **TINY)
    return config, plan.make_plan(config, title="configs/tiny.py")


def by_name(p: plan.Plan) -> dict:
    return {c.name: c for c in p.programs}


def test_tiny_step_compiles_for_the_topology(tiny):
    config, p = tiny
    assert p.topology == "v5e:2x2" and p.chips == 4 and p.chip.hbm_gib == 16
    assert p.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    assert list(by_name(p)) == ["sampler", "update"]
    assert p.fits and p.verdict().startswith("plan: fits (peak ")
    assert p.verdict().endswith(" of 16 GiB per device)")
    assert p.format().splitlines()[-1] == p.verdict()


def test_memory_numbers_are_positive_and_consistent(tiny):
    """Per device: arguments, temp and code positive; the update takes the whole state
    (params, Adam moments, DARO weights) and gives it back in place (donated; the compiler
    counts TPU tiles, which pad tiny's 64-wide arrays); the sampler takes the params; each
    peak covers its arguments and temp."""
    _, p = tiny
    state = sum(p.resident.values())
    compiled = by_name(p)
    for c in compiled.values():
        m = c.memory
        assert min(m["arguments"], m["outputs"], m["temp"], m["code"]) > 0, c
        assert c.peak >= m["arguments"] + m["temp"] >= m["arguments"]
    update, rollout = compiled["update"], compiled["sampler"]
    assert update.memory["arguments"] > state
    assert state <= update.memory["aliased"] <= 1.1 * state  # + TPU tile padding
    assert update.resident_elsewhere == 0
    assert rollout.memory["arguments"] >= p.resident["params"]
    assert rollout.resident_elsewhere == state - p.resident["params"] > 0
    assert p.peak_program.peak == max(c.peak for c in compiled.values())


def test_loop_trip_counts_and_model_flops(tiny):
    """The decode loop runs N − 1 steps (in its first stage) and the update's chunk loop
    all S packed chunks; with the layers' scans counted L times, the compiled FLOPs cover
    the model's matmul FLOPs: 2·W per token through the layers' W weights and 2·D·V per
    logit row forward, 3× that forward and backward. Sampler: B·P prompt tokens, B·K·(N − 1)
    decoded, logits for B prompts and the decoded tokens. Update: B·P + B·K·N tokens, logits
    for the B·K·N completion tokens."""
    config, p = tiny
    t, s, k = config.train, config.sampler, config.algo.k
    b, prompt, n = t.batch_prompts, s.max_prompt_tokens, s.max_new_tokens
    compiled = by_name(p)
    decode = [part.trips for part in compiled["sampler"].parts if part.dynamic]
    assert decode == [n - 1, 0]  # stages of 16, 8 rows: no row stops early
    (chunks,) = [part for part in compiled["update"].parts if part.dynamic]
    blocks = math.gcd(b, 4)
    assert chunks.trips == packing.chunk_slots(b // blocks, k, t.block_rows)
    layers = [part for part in compiled["sampler"].parts if not part.dynamic][1:]
    assert [part.trips for part in layers] == [2]  # the prefill's scan over the 2 layers
    cfg = programs.model_config(config)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    weights = p.n_params - cfg.hidden_size * cfg.vocab_size * (2 - cfg.tie_word_embeddings)
    decoded = b * k * (n - 1)
    sampling = 2 * weights * (b * prompt + decoded) + head * (b + decoded)
    update = 3 * (2 * weights * (b * prompt + b * k * n) + head * b * k * n)
    assert 1.0 <= compiled["sampler"].total().flops * p.chips / sampling < 1.5
    assert 1.0 <= compiled["update"].total().flops * p.chips / update < 1.5


def test_step_time_and_mfu_are_roofline_estimates(tiny):
    _, p = tiny
    phases = p.step_seconds()
    assert list(phases) == ["prefill", "decode", "logprob pass", "update"]
    assert phases["logprob pass"] == 0.0 and min(phases["prefill"], phases["decode"]) > 0
    update = by_name(p)["update"]
    assert phases["update"] == pytest.approx(update.runs * update.seconds(p.chip))
    assert 0 < p.update_mfu() < 1 and 0 < p.decode_share() < 1
    assert 0 < p.decode_roofline_share() <= 1
    assert "compiler estimates, not measurements" in p.format().splitlines()[0]


def run_cli(module: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    return subprocess.run(
        [sys.executable, "-m", module, "--config=configs/tiny.py", *args],
        capture_output=True,
        text=True,
        env=env | {"JAX_PLATFORMS": "cpu"},
        cwd=os.getcwd(),
        timeout=600,
    )


def test_oversized_step_does_not_fit(tmp_path):
    """A micro-batch of 4 × 65536 packed rows: the CLI prints the plan, ends with "does not
    fit" naming the knob, exits 1, writes the JSON, and shows none of libtpu's start-up
    warnings."""
    out = run_cli(
        "daro_jax.plan",
        "--config.tpu.accelerator=v5e-4",
        OVERSIZED,
        f"--json={tmp_path / 'plan.json'}",
        tmp_path=tmp_path,
    )
    assert out.returncode == 1, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("plan: does not fit (peak ") and "in the update" in last
    assert last.endswith("change train.block_rows=32768")
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "E0000" not in out.stderr
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["fits"] is False and saved["verdict"] == last
    assert saved["peak"] > saved["usable"]


def test_main_refuses_to_start_when_the_step_does_not_fit(tmp_path):
    """daro_jax.main with plan.check on: the oversized step exits before any weight or
    checkpoint is written."""
    workdir = tmp_path / "run"
    out = run_cli(
        "daro_jax.main",
        "--config.tpu.accelerator=v5e-4",
        "--config.plan.check=true",
        OVERSIZED,
        f"--workdir={workdir}",
        tmp_path=tmp_path,
    )
    assert out.returncode == 1
    assert "plan: does not fit" in out.stderr
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize(
    ("accelerator", "name"),
    [
        ("v4-8", "v4:2x2x1"),
        ("v4-32", "v4:2x2x4"),
        ("v5p-64", "v5p:2x4x4"),
        ("v5p-128", "v5p:4x4x4"),
        ("v5e-4", "v5e:2x2"),
        ("v5litepod-8", "v5e:2x4"),
        ("v6e-8", "v6e:2x4"),
        ("v6e-32", "v6e:4x8"),
    ],
)
def test_topology_of_an_accelerator(accelerator, name):
    assert chips.topology(accelerator) == name


@pytest.mark.parametrize("accelerator", ["v3-8", "tpu-16", "v4-7", "v5e-6"])
def test_unknown_accelerator_is_a_clear_error(accelerator):
    with pytest.raises(ValueError, match=f"config.tpu.accelerator={accelerator!r}"):
        chips.topology(accelerator)


def test_topologies_have_the_chip_counts():
    """libtpu's own descriptions: v4 chips as one megacore device each."""
    assert len(chips.tpu_devices("v4:2x2x4")) == 16
    assert len(chips.tpu_devices("v5p:2x4x4")) == 32
    assert chips.tpu_devices("v6e:2x4")[0].device_kind.startswith("TPU v6")


def test_missing_libtpu_is_a_clear_failure(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match=r"libtpu, which is not installed.*requirements-test"):
        chips.tpu_devices("v5e:2x2")


def test_paper_models_match_their_published_parameter_counts():
    for name, published in PAPER_RECIPES.items():
        cfg = programs.model_config(load_config_file(f"configs/{name}.py"))
        shapes = jax.tree.leaves(decoder.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
        assert sum(math.prod(s) for s in shapes) == published, name


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
