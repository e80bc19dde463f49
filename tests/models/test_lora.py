"""daro_jax.models.lora: adapters start as the base model, their gradient is the chain rule of
the full weight's (NumPy), and the merged and PEFT exports give our logits in transformers
and peft."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from helpers import lora_model, max_err_on_tokens, torch_logits
from ml_collections import ConfigDict

from daro_jax import models
from daro_jax.models import decoder, lora
from daro_jax.models.config import ModelConfig
from daro_jax.models.from_config import with_adapters


def batch(rows=2, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 259, (rows, length))
    mask = np.ones((rows, length), np.int32)
    mask[1, :4] = 0
    return ids, mask


@pytest.fixture(scope="module")
def base(tiny_hf_dirs):
    return models.load(tiny_hf_dirs["qwen2_untied"])


def test_targets_and_bad_fields():
    assert lora.targets("q,v") == ("q", "v")
    assert lora.targets("q|k|v|o") == ("q", "k", "v", "o")
    assert lora.targets(".*") == tuple(lora.PROJECTIONS)
    assert lora.targets("gate,up,down,q") == ("q", "gate", "up", "down")
    with pytest.raises(ValueError, match="lora.targets: 'qk' matches none"):
        lora.targets("q,qk")
    section = ConfigDict({"rank": 4, "alpha": 8.0, "targets": ".*", "dtype": "float16"})
    cfg = ModelConfig("llama", 8, 4, 4, 1, 1, 1, 4, 1e-5, 1e4)
    with pytest.raises(ValueError, match="lora.dtype='float16'"):
        lora.configure(cfg, section)
    section.dtype, section.rank = "float32", -1
    with pytest.raises(ValueError, match="lora.rank=-1"):
        lora.configure(cfg, section)


def test_adapters_at_init_give_the_base_logits_exactly(base):
    section = ConfigDict({"lora": {"rank": 4, "alpha": 8.0, "targets": "q,v,down"}})
    section.lora.dtype = "float32"
    adapted = with_adapters(base, section, seed=0)
    _, adapters = lora.split(adapted.params)
    assert sorted(adapters["layers"]["attn"]) == ["q", "v"]
    assert list(adapters["layers"]["mlp"]) == ["down"]
    a, b = adapters["layers"]["attn"]["q"]["lora_a"], adapters["layers"]["attn"]["q"]["lora_b"]
    cfg = adapted.config
    assert a.shape == (cfg.num_layers, 4, cfg.hidden_size)
    assert b.shape == (cfg.num_layers, cfg.num_heads, cfg.head_dim, 4)
    assert np.abs(np.asarray(a)).max() > 0 and not np.asarray(b).any()
    specs = decoder.param_specs(cfg)["layers"]["attn"]["q"]
    assert tuple(specs["lora_a"]) == ("layers", "lora_rank", "embed")
    assert tuple(specs["lora_b"]) == ("layers", "heads", "head_dim", "lora_rank")
    ids, mask = batch()
    np.testing.assert_array_equal(
        np.asarray(models.logits(adapted, ids, mask)), np.asarray(models.logits(base, ids, mask))
    )


def test_adapter_gradient_is_the_chain_rule_of_the_weight_gradient(base):
    """L(W + s·B·A): with G = ∂L/∂W_eff (a forward without adapters at the merged weights),
    ∂L/∂B = s·G·Aᵀ and ∂L/∂A = s·Bᵀ·G in the [out, in] views, per layer (NumPy)."""
    adapted = lora_model(base, rank=3, targets=".*", std=0.1)
    cfg, s = adapted.config, adapted.config.lora_scale
    frozen, adapters = lora.split(adapted.params)
    ids, mask = batch()
    tokens, positions = jnp.asarray(ids), decoder.positions_from_mask(jnp.asarray(mask))
    masks = decoder.causal_masks(jnp.asarray(mask))
    weights = jax.random.normal(jax.random.key(3), (*ids.shape, cfg.vocab_size))

    def loss(params, cfg):
        hidden, _ = decoder.forward(params, cfg, tokens, positions, masks)
        return jnp.sum(decoder.lm_logits(params, cfg, hidden) * weights)

    ours = jax.grad(lambda ad: loss(lora.combine(frozen, ad), cfg))(adapters)
    plain = cfg.replace(lora_rank=0, lora_targets=())
    full = jax.grad(loss)(lora.merged(adapted.params, cfg), plain)
    for name, ((group, proj), _) in lora.PROJECTIONS.items():
        a = np.asarray(adapters["layers"][group][proj]["lora_a"], np.float64)
        b = np.asarray(adapters["layers"][group][proj]["lora_b"], np.float64)
        g = np.asarray(full["layers"][group][proj]["kernel"], np.float64)
        layers, r = a.shape[0], a.shape[1]
        a2, b2 = a.reshape(layers, r, -1), b.reshape(layers, -1, r)
        g2 = g.reshape(layers, b2.shape[1], a2.shape[2])
        want_b = s * g2 @ a2.transpose(0, 2, 1)
        want_a = s * b2.transpose(0, 2, 1) @ g2
        got = ours["layers"][group][proj]
        scale = max(np.abs(want_a).max(), np.abs(want_b).max())
        assert scale > 0, name
        for got_x, want in ((got["lora_b"], want_b), (got["lora_a"], want_a)):
            got_x = np.asarray(got_x).reshape(want.shape)
            assert np.abs(got_x - want).max() <= 1e-4 * scale, name


def test_merged_export_loads_in_transformers_with_our_logits(base, tmp_path):
    adapted = lora_model(base, rank=4, targets="q,k,o,up")
    out = models.export(adapted, str(tmp_path / "merged"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = batch()
    ours = models.logits(adapted, ids, mask)
    assert max_err_on_tokens(ours, models.logits(base, ids, mask), mask) > 1e-2  # adapters matter
    assert max_err_on_tokens(torch_logits(reloaded, ids, mask), ours, mask) <= 1e-4
    assert models.load(out).config == base.config  # no adapters in the merged checkpoint


def test_peft_adapters_load_on_the_base_with_our_logits(base, tiny_hf_dirs, tmp_path):
    adapted = lora_model(base, rank=4, targets=".*")
    base_dir = tiny_hf_dirs["qwen2_untied"]
    out = models.export_adapters(adapted, str(tmp_path / "adapters"), base_dir)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with_peft = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ids, mask = batch()
    ours = models.logits(adapted, ids, mask)
    assert max_err_on_tokens(ours, models.logits(base, ids, mask), mask) > 1e-2
    assert max_err_on_tokens(torch_logits(with_peft, ids, mask), ours, mask) <= 1e-4
    with pytest.raises(ValueError, match="no LoRA adapters"):
        models.export_adapters(base, str(tmp_path / "none"), base_dir)


def test_base_digest_names_the_weights(base):
    frozen = lora.split(base.params)[0]
    digest = lora.base_digest(frozen)
    assert digest == lora.base_digest(jax.tree.map(jnp.copy, frozen))
    other = jax.tree.map(lambda x: x, frozen)
    other["layers"] = dict(other["layers"])
    other["layers"]["mlp"] = dict(other["layers"]["mlp"])
    kernel = other["layers"]["mlp"]["down"]["kernel"]
    other["layers"]["mlp"]["down"] = {"kernel": kernel.at[0, 0, 0].add(1e-3)}
    assert lora.base_digest(other) != digest
