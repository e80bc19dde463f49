"""Qwen2.5-Math-1.5B, the paper's setting (K=8, lr 1e-6, DARO weight lr 1e-3)."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.path = "Qwen/Qwen2.5-Math-1.5B"  # or a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tpu.accelerator = "v4-32"  # the compiled step per chip: bench/tpu_plan.md
    c.mesh.shape = (1, -1, 1)
    c.algo.name = "daro"
    c.optim.lr = 1e-6
    c.sampler.max_prompt_tokens = 1024
    c.sampler.max_new_tokens = 3072  # Qwen2.5-Math has a 4k context
    c.data.update(base.PAPER_SUBSET)  # the paper's ≈ 45k problems (README "Recipes")
    c.data.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.instruction = ""
    c.train.batch_prompts = 128
    c.train.minibatches = 4
    c.train.ckpt_every = 25
    c.eval.every_steps = 50
    c.eval.max_new_tokens = 3072
    return c
