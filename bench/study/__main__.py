"""The DARO-vs-baselines study (issue 7): weight simulation, training runs and their plots.

    python -m bench.study simulate          # seconds, no model: DARO weight dynamics
    python -m bench.study run [--algos daro,grpo,dr_grpo,lipo,dapo] [--seeds 0,1,2]
                              [--sweep] [--steps N] [--config FILE] [--out bench/study/runs]
    python -m bench.study plot [--runs bench/study/runs] [--out bench/study]

One module per job: `bench.study.simulate` (simulate), `bench.study.run` (run, and the
study's settings), `bench.study.report` (plot: figures and study.md).

JAX and daro_jax are imported inside the commands that use them: the verifier's worker
processes re-import this module (forkserver), and `plot` needs neither.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from bench.study.report import cmd_plot
from bench.study.run import ALGOS, DEFAULT_CONFIG, SEEDS, STUDY_DIR, cmd_run
from bench.study.simulate import cmd_simulate


def csv(kind: type) -> Callable[[str], tuple]:
    """argparse type: "a,b,c" -> (kind(a), kind(b), kind(c))."""
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="DARO weights on constant losses (no model)")
    sim.add_argument("--out", type=Path, default=STUDY_DIR)
    run = sub.add_parser("run", help="train the study's runs (resumable)")
    run.add_argument("--algos", type=csv(str), default=ALGOS)
    run.add_argument("--seeds", type=csv(int), default=SEEDS)
    run.add_argument("--sweep", action="store_true", help="DARO seed 0 weight lr x param. sweep")
    run.add_argument("--steps", type=int, default=0, help="RL steps (0: the recipe's)")
    run.add_argument("--eval-every", type=int, default=4, help="held-out eval interval")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    run.add_argument("--out", type=Path, default=STUDY_DIR / "runs")
    plot = sub.add_parser("plot", help="figures and study.md from the run JSONs")
    plot.add_argument("--runs", type=Path, default=STUDY_DIR / "runs")
    plot.add_argument("--out", type=Path, default=STUDY_DIR)
    args = parser.parse_args()
    {"simulate": cmd_simulate, "run": cmd_run, "plot": cmd_plot}[args.command](args)


if __name__ == "__main__":
    main()
