"""The paper recipes' RL steps compiled for their TPU topologies: writes bench/tpu_plan.md.

    nice -n 5 python -m bench.tpu_plan [--only LABEL ...] [--search] [--scaled]

One `daro_jax.plan.make_plan` per setup in SETUPS: the three paper recipes on their
target TPUs, the 1.5B on a single-host v5e-8 and v6e-8, and LoRA of the 7B and the 8B on
a single-host v5e-8 and v6e-8. Each compiles the sampler,
the logprob pass and the update with libtpu on this machine (no TPU), so everything
except the compile time is a compiler estimate (see daro_jax/plan/report.py), not a measurement.
Each setup's table row and report are kept in bench/tpu_plan.json; `--only` recompiles the
setups named and takes the others from there (several `--only` runs may go at once);
`--search` adds each setup's mesh search (`daro_jax.plan.search`; slow); `--scaled` compiles
each setup at 2 and 4 layers and extrapolates to the model's depth (`report.scaled_plan`: a
whole compile of the 7B/8B samplers needs more than this machine's 23 GiB). Needs
requirements-test.txt (jax[tpu]).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import importlib.util
import json
import os
import platform
import subprocess
import time

RESULTS = "bench/tpu_plan.json"
SINGLE_HOST = (
    "One host of 8 chips: each chip decodes 8× the rows of a v4-32 chip at the recipe's 128 "
    "prompts a step, so the prompts per step are cut until the sampler fits, keeping at "
    "least one prompt per chip in each update."
)
LORA = (
    "LoRA (rank 32, every projection): the base frozen in bf16, only the adapters and the DARO "
    "weights in the optimizer; mesh fsdp 2 × tensor 4, since the sampler's decode copy of the "
    "weights is whole along embed on every chip; the prompts per step are cut until the "
    "sampler's KV cache fits (8B: 8 on v5e, 16 on v6e; 7B: 16 and 32). The decode step's "
    "logits stay vocab-split until the rows' logits are gathered (4f60c2f): before, libtpu "
    "for v5e gathered the whole output matrix at every decode step (the 7B at 2 layers: 154 "
    "GiB of HBM and 43 GiB of ICI a step; bench/RESULTS.md)."
)
SETUPS = (  # label, recipe, overrides, why the overrides
    ("Qwen2.5-Math-1.5B", "qwen2_5_math_1_5b", {}, ""),
    ("Qwen2.5-Math-7B", "qwen2_5_math_7b", {}, ""),
    ("Llama-3.1-8B", "llama8b", {}, ""),
    (
        "Qwen2.5-Math-1.5B, v5e-8",
        "qwen2_5_math_1_5b",
        {"tpu.accelerator": "v5e-8", "train.batch_prompts": 16, "train.minibatches": 2},
        SINGLE_HOST,
    ),
    (
        "Qwen2.5-Math-1.5B, v6e-8",
        "qwen2_5_math_1_5b",
        {"tpu.accelerator": "v6e-8", "train.batch_prompts": 32},
        SINGLE_HOST,
    ),
    ("Llama-3.1-8B LoRA, v5e-8", "llama8b_lora_v5e8", {}, LORA),
    (
        "Llama-3.1-8B LoRA, v6e-8",
        "llama8b_lora_v5e8",
        {"tpu.accelerator": "v6e-8", "train.batch_prompts": 16},
        LORA,
    ),
    ("Qwen2.5-Math-7B LoRA, v5e-8", "qwen2_5_math_7b_lora_v5e8", {}, LORA),
    (
        "Qwen2.5-Math-7B LoRA, v6e-8",
        "qwen2_5_math_7b_lora_v5e8",
        {"tpu.accelerator": "v6e-8", "train.batch_prompts": 32},
        LORA,
    ),
)
LABELS = tuple(label for label, *_ in SETUPS)
PHASES = ("prefill", "decode", "logprob pass", "update", "host")
# Issue 24's first table (bench/tpu_plan.md at 499a4d2): update MFU, decode vs its HBM
# roofline (then counting every cache slot), tokens/s/chip and the step, all without host time.
BEFORE = {
    "Qwen2.5-Math-1.5B": ("15.7%", "42%", "1785", "115 s"),
    "Qwen2.5-Math-7B": ("45.8%", "67%", "1935", "106 s"),
    "Llama-3.1-8B": ("38.1%", "79%", "1288", "80 s"),
    "Qwen2.5-Math-1.5B, v5e-8": ("15.8%", "53%", "988", "52 s"),
    "Qwen2.5-Math-1.5B, v6e-8": ("7.9%", "54%", "2691", "38 s"),
}
COLUMNS = (
    "setup",
    "TPU (topology)",
    "compile here",
    "peak / HBM per chip",
    "step (est.)",
    "prefill",
    "decode",
    "logprob pass",
    "update",
    "host (CPU, measured)",
    "update MFU",
    "decode share of step",
    "decode vs its HBM roofline",
    "tokens/s/chip",
)
ANCHORS = """\
Published anchors (measurements on GPUs; nothing comparable has been published for RL
training on TPU): NeMo RL reports Llama-3.1-8B GRPO on 16 H100s at 1,581 tokens/s/GPU
on-policy, and prime-rl's trainer runs at 11–14 % MFU on H100. The estimates above assume
every completion runs to max_new_tokens and no overlap of collectives with compute. The
host column is measured, not estimated: one host's share of decoding, scoring and packing
the step's completions on this project's 2-core CPU machine (daro_jax/plan/host.py,
bench/host_time.py), which a TPU host's many cores would cut. tokens/s/chip counts the
step's prompt and completion tokens, B·(P + K·N), over the step (host included) and the
chips. † A row compiled before the host's current figure: its host share (and so its step
and tokens/s/chip) is from the figure its report names."""


def load_recipe(name: str, overrides: dict):
    """get_config() of configs/<name>.py, locked, with the dotted `overrides` applied."""
    spec = importlib.util.spec_from_file_location(name, os.path.join("configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    config.update_from_flattened_dict(overrides)
    return config


def row(label: str, p, config) -> list[str]:
    """The table row of one setup's plan `p`."""
    phases = p.step_seconds()
    step = sum(phases.values())
    t, s = config.train, config.sampler
    tokens = t.batch_prompts * (s.max_prompt_tokens + config.algo.k * s.max_new_tokens)
    compile_s = sum(c.compile_s for c in p.programs)
    scaled = " (2 + 4 layers, scaled)" if "(scaled from" in p.title else ""
    peak = p.peak_program
    return [
        label,
        f"{config.tpu.accelerator} ({p.topology})",
        f"{compile_s:.0f} s{scaled}",
        f"{peak.peak / 2**30:.1f} / {p.chip.hbm_gib:g} GiB ({peak.name})"
        + ("" if p.fits else " **does not fit**"),
        f"{step:.0f} s",
        *(f"{phases[name]:.1f} s" for name in PHASES),
        f"{p.update_mfu():.1%}",
        f"{p.decode_share():.0%}",
        f"{p.decode_roofline_share():.0%}",
        f"{tokens / step / p.chips:.0f}",
    ]


def figures(p, config) -> dict[str, str]:
    """The before/after table's figures of a plan: update MFU, decode vs its HBM roofline,
    tokens/s/chip and the step (host included)."""
    row_ = row("", p, config)
    named = dict(zip(COLUMNS, row_, strict=True))
    keys = ("update MFU", "decode vs its HBM roofline", "tokens/s/chip", "step (est.)")
    return {k: named[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="labels of SETUPS to recompile (default: all)")
    parser.add_argument("--out", default="bench/tpu_plan.md")
    parser.add_argument(
        "--search", action="store_true", help="also run each setup's mesh search (slow)"
    )
    parser.add_argument(
        "--scaled", action="store_true", help="compile 2 and 4 layers and extrapolate"
    )
    args = parser.parse_args()
    unknown = sorted(set(args.only or ()) - set(LABELS))
    if unknown:
        parser.error(f"--only: no setup named {unknown}; the setups: {list(LABELS)}")
    from daro_jax import plan

    plan.compile_only("v5p-8")
    for label, recipe, overrides, why in SETUPS:
        if args.only and label not in args.only:
            continue
        config = load_recipe(recipe, overrides)
        start = time.perf_counter()
        make = plan.scaled_plan if args.scaled else plan.make_plan
        p = make(config, title=f"configs/{recipe}.py {overrides or ''}".strip())
        print(f"{label}: {p.verdict()} ({time.perf_counter() - start:.0f} s)", flush=True)
        row_ = row(label, p, config) if p.compiled else [label, p.verdict()]
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        found = ""
        if args.search:
            from daro_jax.plan import search

            found = search.format_table(search.search(config), p.topology)
        result = {
            "row": row_,
            "figures": figures(p, config) if p.compiled else {},
            "search": found,
            "why": why,
            "report": p.format(),
            "date": str(datetime.date.today()),
            "commit": commit,
        }
        kept = keep(label, result, fresh=not args.only)
    write(kept, args.out)
    print(f"wrote {args.out}")


def keep(label: str, result: dict, fresh: bool) -> dict:
    """All setups' results with `label`'s replaced (a search table kept when this run made
    none), saved to RESULTS under a lock, so that several `--only` runs can go at once."""
    with open(RESULTS + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = {}
        if os.path.exists(RESULTS) and not fresh:
            with open(RESULTS) as f:
                kept = json.load(f)
        result["search"] = result["search"] or kept.get(label, {}).get("search", "")
        kept[label] = result
        with open(RESULTS, "w") as f:
            json.dump(kept, f, indent=1)
    return kept


def padded(result: dict) -> list[str]:
    """A setup's table row; a row kept from a run before the host column ("–" there, with
    its commit after the setup's name); a host figure other than `plan.host`'s current one
    marked † (its report's host line says which)."""
    from daro_jax.plan import host

    row_ = list(result["row"])
    if len(row_) == len(COLUMNS) - 1:
        row_[0] += f" (at {result['commit']})"
        row_.insert(COLUMNS.index("host (CPU, measured)"), "–")
    elif host.where() not in result["report"]:
        row_[COLUMNS.index("host (CPU, measured)")] += " †"
    return row_


def write(results: dict, out: str) -> None:
    """bench/tpu_plan.md from the setups' results, in the order of SETUPS."""
    done = [label for label in LABELS if label in results]
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(padded(results[label])) + " |" for label in done]
    change = [
        "| setup | update MFU | decode vs HBM roofline | tokens/s/chip | step |",
        "|---|---|---|---|---|",
    ]
    for label in done:
        after = results[label].get("figures") or {}
        now = after.values() or ("not recompiled",) * 4
        pairs = zip(BEFORE.get(label, ("–",) * 4), now, strict=True)
        change.append(f"| {label} | " + " | ".join(f"{b} → {a}" for b, a in pairs) + " |")
    details = []
    for label in done:
        why, found = results[label]["why"], results[label].get("search", "")
        details += [f"### {label}", "", *([why, ""] if why else [])]
        details += [*([found, ""] if found else []), "```", results[label]["report"], "```", ""]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    commits = sorted({results[label]["commit"] for label in done})
    dates = sorted({results[label]["date"] for label in done})
    text = [
        "# TPU plan of the paper recipes (compiler estimates, not measurements)",
        "",
        f"Generated by `nice -n 5 python -m bench.tpu_plan` on {', '.join(dates)} at commit "
        f"{', '.join(commits)} ({machine}; no TPU): every RL-step program compiled by libtpu "
        "for the recipe's TPU topology (daro_jax/plan/report.py). "
        "Times are rooflines of the compiled programs' counted FLOPs and bytes, not "
        "measurements; the compile time is this machine's, shared with other jobs. A row whose "
        'compile time says "2 + 4 layers, scaled" was made with `--scaled`: compiled at 2 '
        "and 4 layers and extrapolated to the model's depth (`daro_jax.plan.scaled_plan`; "
        "bench/plan_scaling.py checks it against a whole compile).",
        "",
        *table,
        "",
        "Before (issue 24's first table, bench/tpu_plan.md at 499a4d2: no host time, the decode "
        "roofline counting every cache slot) → after (this table; host time included):",
        "",
        *change,
        "",
        ANCHORS,
        "",
        "## Each setup",
        "",
        *details,
    ]
    with open(out, "w") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    main()
