"""A tiny random-initialised decoder with SmolLM2's tokenizer: smoke tests in seconds."""

from configs import smollm2_135m


def get_config():
    c = smollm2_135m.get_config()
    c.model.init_random = True
    c.model.arch_overrides.hidden_size = 64
    c.model.arch_overrides.intermediate_size = 128
    c.model.arch_overrides.num_hidden_layers = 2
    c.model.arch_overrides.num_attention_heads = 4
    c.model.arch_overrides.num_key_value_heads = 2
    c.model.arch_overrides.head_dim = 16
    c.algo.k = 4
    c.algo.overlong_cache = 2
    c.optim.lr = 1e-3
    c.optim.weight_lr_multiplier = 10.0
    c.sampler.max_new_tokens = 8
    c.sampler.max_prompt_tokens = 64
    c.train.steps = 3
    c.train.batch_prompts = 4
    c.train.ckpt_every = 2
    return c
