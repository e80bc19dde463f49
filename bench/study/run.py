"""The study's training runs (`python -m bench.study run`): the recipe with overrides, trained
in a temporary workdir, every step's metrics written to one JSON per run.

Each run is the recipe (default: the embedded default, configs/smollm2_135m.py) with a few
overrides (algorithm, seed, steps, periodic evaluation, no intermediate checkpoint). Every
step's metrics are written to `<out>/<algo>_s<seed>[_<variant>].json` as they arrive; a run
whose JSON is complete with the same overrides is skipped, so an interrupted study resumes
and loses at most the run in progress. `--sweep` adds DARO seed 0 at weight lr
{1e-3, 1e-2, 1e-1} x parameterisation {log, direct}, reusing the convergence run for the
setting equal to the recipe's own. The base model's held-out accuracy (step 0) is evaluated
once into `<out>/base_eval.json`.

The study's settings (algorithms, seeds, the sweep grid, the held-out metric) are defined
here; `bench.study.simulate` and `bench.study.report` read them. JAX and daro_jax are
imported inside the functions that use them (see `bench.study`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STUDY_DIR = REPO / "bench" / "study"
DEFAULT_CONFIG = REPO / "configs" / "smollm2_135m.py"
ALGOS = ("daro", "grpo", "dr_grpo", "lipo", "dapo")
SEEDS = (0, 1, 2)
WEIGHT_LRS = (1e-3, 1e-2, 1e-1)
PARAMETERIZATIONS = ("log", "direct")  # presets.PARAMETERIZATIONS
HELDOUT = "eval/generated_heldout/mean_at_1"  # the embedded default's eval metric


def lr_label(lr: float) -> str:
    """1e-3 -> "1e-3"."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: algorithm, seed and the config overrides of its variant."""

    algo: str
    seed: int
    variant: str = ""  # "" for the recipe's own setting
    extra: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        """File stem: <algo>_s<seed>[_<variant>]."""
        return f"{self.algo}_s{self.seed}" + (f"_{self.variant}" if self.variant else "")


def load_config(path: str | Path, overrides: dict | None = None):
    """get_config() of the recipe file `path`, locked (a misspelt override is an error) as
    daro_jax.main's config flag does, with the dotted `overrides` applied."""
    spec = importlib.util.spec_from_file_location("study_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    config.update_from_flattened_dict(overrides or {})
    return config


def run_overrides(run: RunSpec, steps: int, eval_every: int) -> dict:
    """Every config override of a run: algorithm, seed, budget, periodic evaluation, only the
    final (forced) checkpoint, then the variant's own."""
    return {
        "algo.name": run.algo,
        "seed": run.seed,
        "train.steps": steps,
        "eval.every_steps": eval_every,
        "train.ckpt_every": 0,
        **dict(run.extra),
    }


def sweep_runs(config_file: Path) -> list[RunSpec]:
    """DARO seed 0 at each weight lr x parameterisation; the setting equal to the recipe's own
    is the plain convergence run (same name, so it is trained once)."""
    recipe = load_config(config_file, {"algo.name": "daro"})
    runs = []
    for param in PARAMETERIZATIONS:
        for lr in WEIGHT_LRS:
            multiplier = float(f"{lr / recipe.optim.lr:.6g}")
            extra = (
                ("optim.weight_lr_multiplier", multiplier),
                ("algo.daro_parameterization", param),
            )
            variant = load_config(config_file, {"algo.name": "daro", **dict(extra)})
            same = variant.to_json() == recipe.to_json()
            runs.append(
                RunSpec("daro", 0)
                if same
                else RunSpec("daro", 0, f"wlr{lr_label(lr)}_{param}", extra)
            )
    return runs


def git_state() -> dict:
    """HEAD commit and whether daro_jax/ or configs/ differ from it."""

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "--", "daro_jax", "configs").strip()
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(dirty)}


def rss_gb() -> float:
    """Resident memory of this process in GiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def now() -> str:
    """Local time, ISO 8601 to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class RunLog:
    """The JSON of one run, rewritten atomically (temporary file + rename) after each step."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "steps": [], "complete": False}
        self.t0 = time.perf_counter()
        self.save()

    def add_step(self, step: int, metrics: dict) -> None:
        """train.loop.train's on_step: record step `step` + 1 (1-based, as TensorBoard)."""
        self.data["steps"].append(
            {
                "step": step + 1,
                "elapsed_s": round(time.perf_counter() - self.t0, 2),
                "loadavg_1m": os.getloadavg()[0],
                "rss_gb": round(rss_gb(), 2),
                "metrics": {k: float(v) for k, v in metrics.items()},
            }
        )
        self.save()

    def finish(self, complete: bool) -> None:
        self.data |= {
            "complete": complete,
            "end_time": now(),
            "wall_s": round(time.perf_counter() - self.t0, 1),
            "loadavg_end": os.getloadavg(),
        }
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def run_header(run: RunSpec, config_file: Path, overrides: dict, config) -> dict:
    """What a run's JSON records besides its steps."""
    return {
        "name": run.name,
        "algo": run.algo,
        "seed": run.seed,
        "variant": run.variant,
        "config_file": str(config_file),
        "overrides": overrides,
        "weight_lr": config.optim.weight_lr_multiplier * config.optim.lr,
        "daro_parameterization": config.algo.daro_parameterization,
        "git": git_state(),
        "start_time": now(),
        "loadavg_start": os.getloadavg(),
        "config": json.loads(config.to_json()),
    }


def read_json(path: Path) -> dict | None:
    """The JSON at `path`, or None when there is no file."""
    return json.loads(path.read_text()) if path.exists() else None


def train_run(run: RunSpec, config_file: Path, overrides: dict, out: Path) -> dict:
    """Train `run` in a temporary workdir, logging to `<out>/<name>.json`; returns the log.

    Complete = every step recorded and no SIGTERM (the trainer saves and stops early on one).
    """
    import jax

    from daro_jax import checkpoint
    from daro_jax.train import loop

    config = load_config(config_file, overrides)
    log = RunLog(out / f"{run.name}.json", run_header(run, config_file, overrides, config))
    workdir = tempfile.mkdtemp(prefix=f"study_{run.name}_")
    try:
        loop.train(config, workdir, on_step=log.add_step)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        jax.clear_caches()
        gc.collect()
    steps = overrides["train.steps"]
    log.finish(len(log.data["steps"]) == steps and not checkpoint.preemption_requested())
    return log.data


def base_eval(config_file: Path, eval_every: int, out: Path) -> None:
    """Held-out accuracy of the untrained model (seed 0; the generated held-out set is the
    same problems for every seed), once, into `<out>/base_eval.json` as step 0."""
    path = out / "base_eval.json"
    if path.exists():
        return
    from daro_jax import evaluation, models, rewards, sharding

    config = load_config(config_file, {"eval.every_steps": eval_every})
    mesh = sharding.make_mesh(config.mesh.shape)
    model = models.from_config(config.model, mesh, seed=config.seed)
    r = config.reward
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as workdir,
        rewards.RewardPool(r.num_workers, r.timeout_s, fallback=r.fallback) as pool,
    ):
        scalars = evaluation.PeriodicEval(config, workdir).run(model, 0, pool)
    record = {"step": 0, "metrics": scalars, "wall_s": round(time.perf_counter() - t0, 1)}
    record |= {"config_file": str(config_file), "git": git_state(), "time": now()}
    path.write_text(json.dumps(record, indent=1))
    print(f"base model: {HELDOUT} = {scalars.get(HELDOUT, math.nan):.3f}", flush=True)


def progress_line(i: int, n: int, data: dict) -> str:
    """One line per finished run: time, training accuracy and held-out accuracy at the end."""
    last = data["steps"][-1]["metrics"] if data["steps"] else {}
    status = "done" if data["complete"] else "INCOMPLETE"
    return (
        f"[{i}/{n}] {data['name']}: {status}, {len(data['steps'])} steps in "
        f"{data['wall_s'] / 60:.1f} min | acc {last.get('accuracy', math.nan):.3f} | "
        f"heldout {last.get(HELDOUT, math.nan):.3f} | load {data['loadavg_end'][0]:.1f}"
    )


def cmd_run(args) -> None:
    from daro_jax import checkpoint

    steps = args.steps or load_config(args.config).train.steps
    eval_every = min(args.eval_every, steps)
    if steps % eval_every:
        raise SystemExit(
            f"--steps {steps} is not a multiple of --eval-every {eval_every}: the last step "
            "would not be evaluated; change one of them."
        )
    runs = [RunSpec(a, s) for a in args.algos for s in args.seeds]
    if args.sweep:
        runs += [r for r in sweep_runs(args.config) if r not in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    base_eval(args.config, eval_every, args.out)
    t_start = time.perf_counter()
    for i, run in enumerate(runs, start=1):
        overrides = run_overrides(run, steps, eval_every)
        done = read_json(args.out / f"{run.name}.json")
        if done and done["complete"]:
            if done["overrides"] != json.loads(json.dumps(overrides)):
                raise SystemExit(
                    f"{run.name}.json is complete with other overrides {done['overrides']}; "
                    "use another --out or delete it."
                )
            print(f"[{i}/{len(runs)}] {run.name}: complete, skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.name}: training ({overrides})", flush=True)
        data = train_run(run, args.config, overrides, args.out)
        print(progress_line(i, len(runs), data), flush=True)
        if checkpoint.preemption_requested():
            raise SystemExit("SIGTERM: stopped; rerun the same command to resume.")
    print(f"study runs finished in {(time.perf_counter() - t_start) / 60:.1f} min")
