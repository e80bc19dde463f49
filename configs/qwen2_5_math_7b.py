"""Qwen2.5-Math-7B, the paper's setting."""

from configs import qwen2_5_math_1_5b


def get_config():
    c = qwen2_5_math_1_5b.get_config()
    c.model.path = "Qwen/Qwen2.5-Math-7B"
    c.tpu.accelerator = "v5p-32"
    c.tpu.zone = "us-east5-a"
    return c
