"""Qwen2.5-Math-7B, LoRA DARO on one TPU host: a v5e-8 (or a v6e-8, with
--config.tpu.accelerator=v6e-8). The plan of both: bench/tpu_plan.md.

The base is frozen in bfloat16 (15 GB, split over the 8 chips); only the rank-32 adapters of
every projection (81 M parameters, float32) and the DARO weights train. The sampler's decode
copy of the weights is whole along "embed" on every chip, so the mesh splits it over
tensor = 4 (4 GB a chip; Qwen2.5-Math-7B has 4 key/value heads, so 4 is the most). LoRA
takes a larger learning rate than full fine-tuning: 1e-5 (DARO weights 1e-2).
"""

from configs import base, qwen2_5_math_7b


def get_config():
    c = base.lora_on_one_v5e8_host(qwen2_5_math_7b.get_config())
    c.train.batch_prompts = 16  # a v6e-8 takes 32 (bench/tpu_plan.md)
    return c
