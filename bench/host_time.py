"""Per-step host costs of an RL step at a recipe's shapes, measured on this machine.

    nice -n 5 python -m bench.host_time [--config configs/qwen2_5_math_1_5b.py] [--repeats 2]

One step of the recipe hands the host B·K completions of up to N = max_new_tokens tokens
(1,024 of 3,072 for the paper's 1.5B: 128 prompts × 8). Their texts are built from the
MATH-500 golds (`bench.verifier.build_items`: a reasoning text ending in a boxed answer,
correct, an equivalent rewrite, a near miss or truncated), lengthened with further
reasoning paragraphs to N tokens each, as the plan's longest step assumes. Timed, as
training runs them (best of --repeats rounds):

- decode: `sampling.completions.decode`, the B·K token rows to text (the SmolLM2
  tokenizer, a byte-level BPE like Qwen's and Llama's, as no other tokenizer is on this
  machine);
- score: `rewards.RewardPool(reward.num_workers, reward.timeout_s).score` of the texts
  against their golds (a fresh pool each round: no cached verdicts);
- pack: `train.packing.pack_blocks` of the whole batch (the logprob pass) and of each
  minibatch (the updates), at the recipe's prompt blocks and block_rows.

Prints seconds per completion of each, the figures `daro_jax.plan.host.MEASURED` records
(the plan adds them to its step estimate), and the 1-minute load average (other jobs
share this machine's 2 cores, so these are upper bounds).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import numpy as np

from bench import tpu_plan, verifier


def texts_of_length(tokenizer, n_tokens: int, count: int, seed: int = 0):
    """`count` (token ids [count, n_tokens], golds): completions of exactly n_tokens tokens,
    each a MATH-500 item's reasoning and boxed answer after further reasoning paragraphs."""
    golds = verifier.load_golds(Path(verifier.DEFAULT_DATA_DIR))
    items = verifier.build_items(golds, count, seed)
    rng = random.Random(seed)
    rows = []
    for completion, _, _ in items:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        while len(ids) < n_tokens:
            other = rng.choice(items)[0]
            ids = tokenizer(other + "\n\n", add_special_tokens=False)["input_ids"] + ids
        rows.append(ids[-n_tokens:])
    return np.asarray(rows, np.int32), [gold for _, gold, _ in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="qwen2_5_math_1_5b")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from daro_jax import models, plan, rewards, sharding
    from daro_jax.plan import chips, report
    from daro_jax.sampling import completions
    from daro_jax.train import packing

    config = tpu_plan.load_recipe(args.config, {})
    t, s, r, k = config.train, config.sampler, config.reward, config.algo.k
    b, n = t.batch_prompts, s.max_new_tokens
    tokenizer = models.load("smollm2-gguf", random_init=True).tokenizer
    tokens, golds = texts_of_length(tokenizer, n, b * k)
    lengths = np.full(b * k, n, np.int32)
    plan.compile_only(config.tpu.accelerator)
    mesh = sharding.make_mesh(config.mesh.shape, chips.tpu_devices(report.topology(config)))
    per = b // t.minibatches
    blocks = {n_: sharding.prompt_blocks(n_, t.prompt_blocks, mesh) for n_ in (b, per)}
    best = {"decode": float("inf"), "score": float("inf"), "pack": float("inf")}
    for _ in range(args.repeats):
        start = time.perf_counter()
        texts = completions.decode(tokenizer, tokens, lengths)
        best["decode"] = min(best["decode"], time.perf_counter() - start)
        with rewards.RewardPool(r.num_workers, r.timeout_s, fallback=r.fallback) as pool:
            start = time.perf_counter()
            scores = pool.score(texts, golds)
            best["score"] = min(best["score"], time.perf_counter() - start)
        start = time.perf_counter()
        grid, per_prompt = tokens.reshape(b, k, n), lengths.reshape(b, k)
        packing.pack_blocks(grid, per_prompt, blocks[b], t.block_rows)
        for m in range(t.ppo_epochs * t.minibatches):
            rows = slice((m % t.minibatches) * per, (m % t.minibatches + 1) * per)
            packing.pack_blocks(grid[rows], per_prompt[rows], blocks[per], t.block_rows)
        best["pack"] = min(best["pack"], time.perf_counter() - start)
    load = os.getloadavg()[0]
    print(
        f"{b * k} completions of {n} tokens ({args.config}), {r.num_workers} verifier "
        f"workers, {float(np.mean(scores)):.0%} scored correct; load average {load:.1f}"
    )
    for name, seconds in best.items():
        print(f"{name}: {seconds:.2f} s per step, {seconds / (b * k) * 1e3:.3f} ms per completion")
    print(f"host total: {sum(best.values()):.2f} s per step of {b * k} completions (this CPU)")


if __name__ == "__main__":
    main()
