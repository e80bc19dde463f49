"""Llama-3.1-8B-Instruct, LoRA DARO on one TPU host: a v5e-8 (or a v6e-8, with
--config.tpu.accelerator=v6e-8). The plan of both: bench/tpu_plan.md.

The base is frozen in bfloat16 (16 GB, split over the 8 chips); only the rank-32 adapters of
every projection (84 M parameters, float32) and the DARO weights train, so the optimizer
state is 0.7 GB instead of the 64 GB of full fine-tuning. The sampler's decode copy of the
weights is whole along "embed" on every chip, so the mesh splits it over tensor = 4 (4 GB a
chip; kv_heads 8). LoRA takes a larger learning rate than full fine-tuning (the adapters
start at zero): 1e-5 (DARO weights 1e-2, multiplier 1000).
"""

from configs import base, llama8b


def get_config():
    c = base.lora_on_one_v5e8_host(llama8b.get_config())
    # 8 prompts × K = 8: the sampler's KV cache (128 KiB a slot over 32 layers) is the
    # largest part of a v5e chip's 16 GiB; a v6e-8 takes 16 (bench/tpu_plan.md).
    c.train.batch_prompts = 8
    return c
