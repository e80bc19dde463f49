"""The step's programs compiled ahead of time (daro_jax/plan/programs.py), on configs/tiny.py's
plan for a v5e 2×2: memory numbers consistent with each other and the state's bytes, loop
trip counts, compiled FLOPs against the model's closed-form FLOPs; the recipes' model
shapes against their published parameter counts."""

from __future__ import annotations

import math

import jax
from helpers import load_config_file, plan_tiny_config

from daro_jax import models
from daro_jax.models import decoder
from daro_jax.train import packing

PAPER_RECIPES = {  # recipe → published parameter count of its model
    "qwen2_5_math_1_5b": 1_543_714_304,
    "qwen2_5_math_7b": 7_615_616_512,
    "llama8b": 8_030_261_248,
}


def test_memory_numbers_are_positive_and_consistent(tiny):
    """Per device: arguments, temp and code positive; the update takes the whole state
    (params, Adam moments, DARO weights) and gives it back in place (donated; the compiler
    counts TPU tiles, which pad tiny's 64-wide arrays); the sampler takes the params; each
    peak covers its arguments and temp."""
    _, p = tiny
    state = sum(p.resident.values())
    for c in p.programs:
        m = c.memory
        assert min(m["arguments"], m["outputs"], m["temp"], m["code"]) > 0, c
        assert c.peak >= m["arguments"] + m["temp"] >= m["arguments"]
    update, rollout = p.program("update"), p.program("sampler")
    assert update.memory["arguments"] > state
    assert state <= update.memory["aliased"] <= 1.1 * state  # + TPU tile padding
    assert update.resident_elsewhere == 0
    assert rollout.memory["arguments"] >= p.resident["params"]
    assert rollout.resident_elsewhere == state - p.resident["params"] > 0
    assert p.peak_program.peak == max(c.peak for c in p.programs)


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
    sampler, update = p.program("sampler"), p.program("update")
    decode = [part.trips for part in sampler.parts if part.dynamic]
    assert decode == [n - 1, 0]  # stages of 16, 8 rows: no row stops early
    (chunks,) = [part for part in update.parts if part.dynamic]
    blocks = math.gcd(b, 4)
    assert chunks.trips == packing.chunk_slots(b // blocks, k, t.block_rows)
    layers = [part for part in sampler.parts if not part.dynamic][1:]
    assert [part.trips for part in layers] == [2]  # the prefill's scan over the 2 layers
    cfg, _ = models.architecture(config.model)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    weights = p.n_params - cfg.hidden_size * cfg.vocab_size * (2 - cfg.tie_word_embeddings)
    decoded = b * k * (n - 1)
    sampling = 2 * weights * (b * prompt + decoded) + head * (b + decoded)
    trained = 3 * (2 * weights * (b * prompt + b * k * n) + head * b * k * n)
    assert 1.0 <= sampler.total().flops * p.chips / sampling < 1.5
    assert 1.0 <= update.total().flops * p.chips / trained < 1.5


def _decode_loops(config):
    """(the step's programs built for `config`'s topology, the data-dependent loops of its
    sampler as libtpu compiles it)."""
    from daro_jax import sharding
    from daro_jax.algo import presets
    from daro_jax.plan import chips, programs, report

    mesh = sharding.make_mesh(config.mesh.shape, chips.tpu_devices(report.topology(config)))
    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    built = programs.build(config, mesh, spec)
    sampler = programs.step_programs(config, built, mesh)[0]
    return built, [part for part in programs.compile_program(sampler, 0).parts if part.dynamic]


def test_decode_bytes_grow_with_the_slot_stage():
    """N = 256 decoded in two slot stages (`Sampler.slot_stages`: 128, then 256 own slots),
    compiled by libtpu: in each row stage (16 rows, then 8), the loop that reads 256 own
    slots a step moves more bytes and FLOPs a step than the one that reads 128."""
    built, loops = _decode_loops(plan_tiny_config(**{"sampler.max_new_tokens": 256}))
    assert built.sample.slot_stages() == (128, 256)
    assert [part.trips for part in loops] == [128, 127, 0, 0]  # no row stops early
    for short, long in (loops[:2], loops[2:]):
        assert long.per_trip.bytes > short.per_trip.bytes
        assert long.per_trip.flops > short.per_trip.flops


def test_decode_step_gathers_logits_not_the_output_matrix():
    """Vocab split over tensor = 4 on a v5e-8 (the LoRA recipes' mesh): the decode loop's
    ICI traffic a step stays below the output matrix' bytes — each chip's logits come from its
    part of the matrix and the rows' logits are gathered, where libtpu for v5e gathered the
    whole matrix at every step (1 GiB for the 7B; bench/RESULTS.md)."""
    config = plan_tiny_config(
        **{
            "tpu.accelerator": "v5e-8",
            "mesh.shape": (1, 2, 4),
            "model.arch_overrides.hidden_size": 256,
            "model.arch_overrides.num_key_value_heads": 4,
        }
    )
    built, loops = _decode_loops(config)
    matrix = built.cfg.vocab_size * built.cfg.hidden_size * 2  # bf16 [V, D]
    assert loops and all(0 < part.per_trip.ici_bytes < matrix / 4 for part in loops)


def test_paper_models_match_their_published_parameter_counts():
    for name, published in PAPER_RECIPES.items():
        cfg, _ = models.architecture(load_config_file(f"configs/{name}.py").model)
        shapes = jax.tree.leaves(decoder.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
        assert sum(math.prod(s) for s in shapes) == published, name
