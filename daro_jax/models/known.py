"""The paper's models without their files: config.json fields and end-of-sequence tokens.

The TPU plan and the GPU check compile these models' steps on a machine that has neither
their weights nor network (`models.architecture`). HF_CONFIGS holds each model's
config.json fields (huggingface.co/<id>/blob/main/config.json); STOP_TOKEN_IDS the ids
`sampling.completions.default_stop_token_ids` finds in its tokenizer (the config's EOS ids,
the tokenizer's EOS and its end-of-turn tokens: Qwen's <|endoftext|> 151643 and
<|im_end|> 151645, Llama 3's <|end_of_text|> 128001, <|eom_id|> 128008, <|eot_id|> 128009).
"""

from __future__ import annotations

_QWEN25_MATH = dict(
    model_type="qwen2",
    hidden_act="silu",
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151643,
    use_sliding_window=False,
)
HF_CONFIGS = {
    "Qwen/Qwen2.5-Math-1.5B": _QWEN25_MATH
    | dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-Math-7B": _QWEN25_MATH
    | dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        hidden_act="silu",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        attention_bias=False,
        mlp_bias=False,
    ),
}
STOP_TOKEN_IDS = {
    "Qwen/Qwen2.5-Math-1.5B": (151643, 151645),
    "Qwen/Qwen2.5-Math-7B": (151643, 151645),
    "meta-llama/Llama-3.1-8B-Instruct": (128001, 128008, 128009),
}
