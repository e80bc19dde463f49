"""Qwen2.5-Math-7B, LoRA DARO on one TPU host: a v5e-8 (or a v6e-8, with
--config.tpu.accelerator=v6e-8). The plan of both: bench/tpu_plan.md.

The base is frozen in bfloat16 (15 GB, split over the 8 chips); only the rank-32 adapters of
every projection (81 M parameters, float32) and the DARO weights train. The sampler's decode
copy of the weights is whole along "embed" on every chip, so the mesh splits it over
tensor = 4 (4 GB a chip; Qwen2.5-Math-7B has 4 key/value heads, so 4 is the most). LoRA
takes a larger learning rate than full fine-tuning: 1e-5 (DARO weights 1e-2).
"""

from configs import qwen2_5_math_7b


def get_config():
    c = qwen2_5_math_7b.get_config()
    c.model.param_dtype = "bfloat16"  # the frozen base is held in model.dtype
    c.model.lora.rank = 32
    c.model.lora.alpha = 64.0
    c.tpu.accelerator = "v5e-8"
    c.tpu.zone = "us-west4-a"
    c.mesh.shape = (1, 2, 4)
    c.optim.lr = 1e-5
    c.train.batch_prompts = 16  # a v6e-8 takes 32 (bench/tpu_plan.md)
    c.train.minibatches = 2
    return c
