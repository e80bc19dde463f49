"""Llama-3.1-8B-Instruct, the paper's setting."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"  # or a local HF checkpoint directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tpu.accelerator = "v5p-64"
    c.tpu.zone = "us-east5-a"
    c.mesh.shape = (1, -1, 1)
    c.algo.name = "daro"
    c.optim.lr = 1e-6
    c.sampler.max_prompt_tokens = 1024
    c.sampler.max_new_tokens = 3072
    c.data.update(base.PAPER_SUBSET)  # the paper's ≈ 45k problems (README "Recipes")
    c.train.batch_prompts = 128
    c.train.minibatches = 4
    c.train.ckpt_every = 25
    c.eval.every_steps = 50
    c.eval.max_new_tokens = 3072
    return c
