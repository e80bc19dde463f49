"""daro_jax.sampling.sampler: parity with transformers' greedy generate, log-probs equal to the
training forward's, stop handling, decode stages that shrink to the live rows, sharded meshes,
one compilation per shape (token selection itself: test_selection.py).
"""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import lora_model, softmax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from daro_jax import models, sharding
from daro_jax.models import decoder
from daro_jax.models.config import ModelConfig
from daro_jax.sampling import completions, sampler

CHATS = ("What is 2+3?", "Name a color.", "Say hi to Bob in French.")


def training_logprobs(model, prompt_tokens, prompt_mask, tokens, mask, temperature):
    """log π(token) of each completion token by the training path: one full-sequence
    forward (no cache) over [prompt | completion] and decoder.token_logprobs at T."""
    full = jnp.asarray(np.concatenate([prompt_tokens, tokens], axis=1))
    full_mask = jnp.asarray(np.concatenate([prompt_mask, mask], axis=1))
    positions = decoder.positions_from_mask(full_mask)
    masks = decoder.causal_masks(full_mask)
    hidden, _ = decoder.forward(model.params, model.config, full, positions, masks)
    p = prompt_tokens.shape[1]
    logp, _ = decoder.token_logprobs(
        model.params, model.config, hidden[:, p - 1 : -1], full[:, p:], temperature, chunk=16
    )
    return np.asarray(logp)


@pytest.fixture(scope="module")
def tiny(tiny_hf_dirs):
    """The tiny SmolLM2-shaped model (9 query / 3 KV heads), random weights, unsharded."""
    return models.load(tiny_hf_dirs["smollm2"])


@pytest.fixture(scope="module")
def tiny_prompts():
    """Three prompts of 3, 9 and 6 tokens, left-padded to 16."""
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, 259, n)) for n in (3, 9, 6)]
    return rows, *completions.left_pad(rows, 16)


# ---- The real SmolLM2-135M-Instruct ----


@pytest.fixture
def one_torch_thread():
    """PyTorch's OpenMP threads spin against JAX's thread pool in one process (10× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_greedy_matches_transformers_generate(smollm2_model, one_torch_thread):
    """32 greedy tokens equal transformers' generate; the greedy logprobs (untempered) equal
    the training forward's at T = 1 on the real weights."""
    folder, name = os.path.split(models.smollm2_gguf_path())
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    ours = completions.generate(smollm2_model, list(CHATS), max_new_tokens=32, temperature=0.0)
    rows = completions.encode_prompts(smollm2_model.tokenizer, CHATS, chat_template=True)
    ids, mask = completions.left_pad(rows, max(map(len, rows)))
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
            pad_token_id=sampler.PAD_ID,
        )
    theirs = out[:, ids.shape[1] :].numpy()
    logp = training_logprobs(
        smollm2_model, ours.prompt_tokens, ours.prompt_mask, ours.tokens, ours.mask, 1.0
    )
    assert np.abs(ours.logprobs - logp)[ours.mask > 0].max() <= 1e-4
    stops = set(completions.default_stop_token_ids(smollm2_model.tokenizer, smollm2_model.config))
    assert {2, 0} <= stops  # <|im_end|> and <|endoftext|>
    for row in range(len(CHATS)):
        n = int(ours.lengths[row])
        np.testing.assert_array_equal(ours.tokens[row, :n], theirs[row, :n])
        if not ours.truncated[row]:  # both stopped at the same end-of-turn token
            assert ours.tokens[row, n - 1] in stops
            assert theirs.shape[1] == n or theirs[row, n] == sampler.PAD_ID
    assert ours.lengths.min() < 32 and ours.truncated.sum() < len(CHATS)  # stops exercised
    assert ours.texts[0] == smollm2_model.tokenizer.decode(
        theirs[0, : ours.lengths[0]], skip_special_tokens=True
    )


# ---- Tiny random models ----


@pytest.mark.parametrize(
    "temperature,top_k,adapters",
    [(1.0, 0, False), (0.7, 0, False), (1.3, 5, False), (0.7, 0, True)],
)
def test_logprobs_equal_training_forward_at_temperature(
    tiny, tiny_prompts, temperature, top_k, adapters
):
    """At T and with top-k the sampler's logprob is of the renormalised distribution; with
    no truncation it equals the training forward at T, with top-k it is larger by the
    log-mass of the kept tokens (checked via NumPy on the full logits). With LoRA adapters
    (B random, so they change the model) the sampler decodes the adapted policy."""
    _, tokens, mask = tiny_prompts
    tiny = lora_model(tiny) if adapters else tiny
    fn = sampler.make_sampler(
        tiny.config, k=2, max_new_tokens=10, prompt_len=16, temperature=temperature, top_k=top_k
    )
    out = jax.device_get(fn(tiny.params, tokens, mask, jax.random.key(1)))
    ptok, pmask = np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0)
    ref = training_logprobs(tiny, ptok, pmask, out["tokens"], out["mask"], temperature)
    if top_k:
        full = np.concatenate([ptok, out["tokens"]], 1)
        full_mask = np.concatenate([pmask, out["mask"]], 1)
        logits = np.asarray(models.logits(tiny, full, full_mask))[:, 15:-1] / temperature
        probs = softmax(logits)
        kth = np.sort(logits, -1)[..., -top_k][..., None]
        ref = ref - np.log(np.where(logits >= kth, probs, 0).sum(-1))
        chosen = np.take_along_axis(logits, out["tokens"][..., None], -1)[..., 0]
        assert np.all((chosen >= kth[..., 0])[out["mask"] > 0])
    assert np.abs(out["logprobs"] - ref)[out["mask"] > 0].max() <= 1e-4


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (1.0, 5), (1.0, 0)])
def test_full_logprobs_equal_training_forward_under_truncation(tiny, tiny_prompts, top_p, top_k):
    """logprobs_full is the sampled token under the untruncated softmax(logits / T): the
    training forward's log-prob at T, under top-p / top-k too; logprobs (the truncated
    policy's) exceed it by the kept tokens' −log mass, and equal it without truncation."""
    _, tokens, mask = tiny_prompts
    fn = sampler.make_sampler(
        tiny.config,
        k=2,
        max_new_tokens=8,
        prompt_len=16,
        temperature=0.8,
        top_p=top_p,
        top_k=top_k,
    )
    out = jax.device_get(fn(tiny.params, tokens, mask, jax.random.key(3)))
    live = out["mask"] > 0
    ptok, pmask = np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0)
    ref = training_logprobs(tiny, ptok, pmask, out["tokens"], out["mask"], 0.8)
    assert np.abs(out["logprobs_full"] - ref)[live].max() <= 1e-4
    assert np.all(out["logprobs_full"][~live] == 0)
    gap = (out["logprobs"] - out["logprobs_full"])[live]
    if top_p < 1 or top_k:
        assert gap.min() >= -1e-5 and gap.max() > 1e-3
    else:
        assert np.all(gap == 0)


def test_stop_tokens_and_mixed_prompt_lengths(tiny, tiny_prompts):
    """Rows end at their first stop token (kept, mask 1) and are padding after it; each
    prompt of a mixed-length batch gets the same completion as when generated alone."""
    rows, tokens, mask = tiny_prompts
    greedy = dict(k=1, max_new_tokens=12, prompt_len=16, temperature=0.0)
    free = jax.device_get(
        sampler.make_sampler(tiny.config, **greedy)(tiny.params, tokens, mask, jax.random.key(0))
    )
    assert free["mask"].all() and free["truncated"].all()
    stop = int(free["tokens"][0, 3])  # row 0 stops at its 4th token (or earlier)
    fn = sampler.make_sampler(tiny.config, stop_token_ids=(stop,), **greedy)
    out = jax.device_get(fn(tiny.params, tokens, mask, jax.random.key(0)))
    for row in range(3):
        hits = np.flatnonzero(free["tokens"][row] == stop)
        n = hits[0] + 1 if hits.size else 12
        assert out["lengths"][row] == n and out["truncated"][row] == (hits.size == 0)
        np.testing.assert_array_equal(out["mask"][row], np.arange(12) < n)
        np.testing.assert_array_equal(out["tokens"][row, :n], free["tokens"][row, :n])
        assert np.all(out["tokens"][row, n:] == sampler.PAD_ID)
        assert np.all(out["logprobs"][row, n:] == 0)
        np.testing.assert_allclose(out["logprobs"][row, :n], free["logprobs"][row, :n], atol=1e-6)
    assert out["lengths"][0] <= 4
    for i, row in enumerate(rows):
        one = jax.device_get(fn(tiny.params, *completions.left_pad([row], 16), jax.random.key(0)))
        for name in ("tokens", "mask", "lengths", "truncated"):
            np.testing.assert_array_equal(out[name][i], one[name][0])
        np.testing.assert_allclose(out["logprobs"][i], one["logprobs"][0], atol=1e-5)


def test_stage_sizes_halve_down_to_min_rows_in_multiples_of_the_shards():
    assert sampler.stage_sizes(32, 8) == (32, 16, 8)
    assert sampler.stage_sizes(32, 1) == (32, 16, 8, 4, 2, 1)
    assert sampler.stage_sizes(32, 32) == sampler.stage_sizes(32, 10**6) == (32,)
    assert sampler.stage_sizes(24, 4) == (24, 12, 6)
    assert sampler.stage_sizes(7, 1) == (7, 4, 2, 1)  # halves rounded up
    assert sampler.stage_sizes(16, 1, shards=4) == (16, 8, 4)
    assert sampler.stage_sizes(24, 1, shards=8) == (24, 16, 8)
    assert sampler.stage_sizes(8, 1, shards=8) == (8,)
    # By default the smallest stage is max(8, B·K / 8): at most four decode loops to compile.
    cfg = ModelConfig("llama", 8, 8, 8, 1, 1, 1, 8, 1e-5, 1e4)
    default = sampler.Sampler(cfg, k=1, max_new_tokens=1, prompt_len=1)
    assert default.stage_sizes(32) == (32, 16, 8) and default.stage_sizes(6) == (6,)
    assert default.stage_sizes(1024) == (1024, 512, 256, 128)


@pytest.mark.parametrize("temperature,seed", [(1.0, 2), (0.0, 0)])
def test_compacted_stages_give_the_rollouts_of_one_stage(tiny, temperature, seed):
    """Rows stop at very different steps (a tenth of the vocabulary stops), so the live
    rows fall through every stage (24 → 12 → 6 → 3 → 2 → 1 rows) while one row goes on to
    N; the rollouts equal those of one 24-row stage. Logprobs may differ in the last ulps:
    XLA:CPU rounds some reductions differently at small row counts."""
    k = 4 if temperature else 1  # greedy: distinct prompts, as a prompt's K rows are equal
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 259, n)) for n in rng.integers(2, 16, 24 // k)]
    tokens, mask = completions.left_pad(prompts, 16)
    settings = dict(
        k=k,
        max_new_tokens=32,
        prompt_len=16,
        temperature=temperature,
        stop_token_ids=tuple(range(3, 35)),
    )
    one = sampler.make_sampler(tiny.config, min_rows=24, **settings)
    staged = sampler.make_sampler(tiny.config, min_rows=1, **settings)
    assert one.stage_sizes(24) == (24,) and staged.stage_sizes(24) == (24, 12, 6, 3, 2, 1)
    ref = jax.device_get(one(tiny.params, tokens, mask, jax.random.key(3)))
    out = jax.device_get(staged(tiny.params, tokens, mask, jax.random.key(3)))
    live = ref["mask"].sum(0)
    assert live[:-1].min() == 1 and live[-1] == 1 and ref["truncated"].sum() == 1
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(out[name], ref[name])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_slot_stages_give_the_rollouts_of_one_stage(tiny, tiny_prompts, temperature):
    """Decode loops that read only the own slots that can be valid (128, then 256 of N =
    256) give the rollouts of one loop that reads all 256 at every step (masked): greedy
    tokens identical, log-probs within f32 rounding."""
    _, tokens, mask = tiny_prompts
    settings = dict(k=2, max_new_tokens=256, prompt_len=16, temperature=temperature)
    full = sampler.make_sampler(tiny.config, min_slots=256, **settings)
    staged = sampler.make_sampler(tiny.config, **settings)
    assert full.slot_stages() == (256,) and staged.slot_stages() == (128, 256)
    assert staged.decode_trips(6) == (128, 127)
    ref = jax.device_get(full(tiny.params, tokens, mask, jax.random.key(1)))
    out = jax.device_get(staged(tiny.params, tokens, mask, jax.random.key(1)))
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(out[name], ref[name])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)


def test_one_compilation_per_shape(tiny, tiny_prompts):
    """New params, prompts and keys reuse the compiled sampler (same settings: same one)."""
    _, tokens, mask = tiny_prompts
    settings = dict(k=2, max_new_tokens=10, prompt_len=16, temperature=1.0)
    fn = sampler.make_sampler(tiny.config, **settings)
    first = fn(tiny.params, tokens, mask, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 1.01, tiny.params)
    second = fn(params, (tokens + 1) * mask, mask, jax.random.key(5))
    assert fn.jitted._cache_size() == 1
    assert not np.array_equal(first["tokens"], second["tokens"])
    assert sampler.make_sampler(tiny.config, **settings) is fn


def test_generate_rollouts_are_prompt_major(tiny):
    out = completions.generate(tiny, ["ab", "hello there"], k=3, max_new_tokens=5, temperature=0.0)
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (6, 5)
    assert out.tokens.dtype == np.int32 and out.logprobs.dtype == np.float32
    assert len(out.texts) == 6 and out.prompt_tokens.shape[0] == 6
    for b in range(2):  # greedy: the K samples of a prompt are equal, prompts differ
        block = out.tokens[3 * b : 3 * b + 3]
        assert (block == block[0]).all()
        assert len({out.texts[3 * b + j] for j in range(3)}) == 1
    text = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    expect = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.prompt_tokens[3][out.prompt_mask[3] > 0].tolist() == expect
    raw_text = "a raw prompt, long enough for the same bucket"  # shares the compilation
    raw = completions.generate(
        tiny, [raw_text], k=3, max_new_tokens=5, temperature=0.0, chat_template=False
    )
    raw_ids = raw.prompt_tokens[0][raw.prompt_mask[0] > 0].tolist()
    assert raw_ids == tiny.tokenizer(raw_text)["input_ids"]


def test_default_stop_tokens_of_each_family():
    def tok(eos, vocab):
        return types.SimpleNamespace(eos_token_id=eos, get_vocab=lambda: vocab)

    def cfg(eos):
        return types.SimpleNamespace(eos_token_ids=eos)

    qwen = tok(151643, {"<|im_end|>": 151645, "<|endoftext|>": 151643, "a": 5})
    assert completions.default_stop_token_ids(qwen, cfg((151645,))) == (151643, 151645)
    llama = tok(128009, {"<|eot_id|>": 128009, "<|end_of_text|>": 128001, "<|eom_id|>": 9})
    assert completions.default_stop_token_ids(llama, cfg((128001, 128008))) == (
        128001,
        128008,
        128009,
    )


def test_bad_arguments_name_the_field(tiny, tiny_prompts):
    _, tokens, mask = tiny_prompts
    base = dict(k=1, max_new_tokens=4, prompt_len=16)
    for bad, field in [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"k": 0}, "k="),
        ({"stop_token_ids": (10**6,)}, "stop_token_ids"),
        ({"min_rows": 0}, "min_rows"),
    ]:
        with pytest.raises(ValueError, match=field):
            sampler.make_sampler(tiny.config, **(base | bad))
    with pytest.raises(ValueError, match="prompt_len=16"):
        sampler.make_sampler(tiny.config, **base)(tiny.params, tokens[:, 2:], mask[:, 2:], 0)
    with pytest.raises(TypeError, match="list of strings"):
        completions.generate(tiny, "one string", max_new_tokens=2)


# ---- Meshes ----


@pytest.fixture(scope="module")
def llama_unsharded(tiny_hf_dirs):
    return models.load(tiny_hf_dirs["llama31"])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_mesh_gives_same_rollouts(mesh_shape, tiny_hf_dirs, llama_unsharded):
    """Sharded rollouts equal one device's, also when the decode stages shrink the rows
    (16 → 8 → 4 on the (2, 2, 2) mesh's 4 row shards, 16 → 8 on 8) and gather them across
    devices."""
    prompts = ["one", "two three", "four five six", "seven"]
    kw = dict(k=2, max_new_tokens=8, stop_token_ids=[])
    mesh = sharding.make_mesh(mesh_shape)
    placed = models.load(tiny_hf_dirs["llama31"], mesh=mesh)
    for temperature in (0.0, 1.0):
        ref = completions.generate(llama_unsharded, prompts, temperature=temperature, seed=4, **kw)
        out = completions.generate(placed, prompts, temperature=temperature, seed=4, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    fn = sampler.make_sampler(  # the sampler generate() used: already compiled
        placed.config, k=2, max_new_tokens=8, prompt_len=out.prompt_tokens.shape[1], mesh=mesh
    )
    result = fn(placed.params, out.prompt_tokens[::2], out.prompt_mask[::2], jax.random.key(4))
    np.testing.assert_array_equal(result["tokens"], ref.tokens)
    rows = NamedSharding(mesh, P("data" if mesh_shape[1] == 1 else ("data", "fsdp")))
    assert result["tokens"].sharding.is_equivalent_to(rows, 2)
    staged = dict(
        k=4,
        max_new_tokens=16,
        prompt_len=out.prompt_tokens.shape[1],
        stop_token_ids=tuple(range(3, 40)),
    )
    one = sampler.make_sampler(llama_unsharded.config, min_rows=16, **staged)
    fn = sampler.make_sampler(placed.config, min_rows=1, mesh=mesh, **staged)
    assert fn.stage_sizes(16) == ((16, 8) if mesh_shape[0] == 8 else (16, 8, 4))
    args = out.prompt_tokens[::2], out.prompt_mask[::2], jax.random.key(4)
    ref = jax.device_get(one(llama_unsharded.params, *args))
    result = jax.device_get(fn(placed.params, *args))
    live = ref["mask"].sum(0)
    assert live[:-1].min() <= 4 and live[-1] > 0  # the last stage runs to N
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(result[name], ref[name])
    np.testing.assert_allclose(result["logprobs"], ref["logprobs"], rtol=0, atol=1e-5)


def test_stages_gather_rows_inside_their_shard():
    """Compiled for 8 devices (rows over fsdp) with an own KV cache that dominates memory
    (4 layers, 128 rows × 1024 slots: 67 MB per device), decoding in five stages (128 → 8
    rows) needs at most the next stage's arrays beside the first's (1.5×, measured 1.48×),
    not a cache gathered across devices (which measured 7×). One slot stage (min_slots = N):
    this is the row stages' memory; XLA:CPU copies a cache that a loop slices (the slot
    stages), which libtpu updates in place (bench/RESULTS.md, the decode's slot stages)."""
    mesh = sharding.make_mesh((1, 8, 1))
    cfg = ModelConfig("llama", 512, 256, 512, 4, 8, 4, 32, 1e-5, 1e4, tie_word_embeddings=True)
    shardings = models.param_shardings(cfg, mesh)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0))),
        shardings,
    )
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    prompts = jax.ShapeDtypeStruct((16, 128), jnp.int32, sharding=rows)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def temp_bytes(min_rows):
        settings = dict(k=8, max_new_tokens=1024, prompt_len=128, mesh=mesh, min_rows=min_rows)
        settings["min_slots"] = 1024
        fn = sampler.Sampler(cfg, **settings)
        compiled = fn.jitted.lower(params, prompts, prompts, key).compile()
        return fn.stage_sizes(128), compiled.memory_analysis().temp_size_in_bytes

    (one_stage, one), (stages, staged) = temp_bytes(128), temp_bytes(8)
    assert one_stage == (128,) and stages == (128, 64, 32, 16, 8)
    own_cache = 2 * 4 * (128 // 8) * 4 * 1024 * 32 * 4  # k, v per device
    assert own_cache < one < 1.5 * own_cache  # the cache updated in place
    assert staged <= 1.6 * one
