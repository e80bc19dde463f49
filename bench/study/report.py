"""The study's report (`python -m bench.study plot`): loss_scale.png, convergence.png,
entropy.png, sweep.png and study.md from the run JSONs of `bench.study.run`; runs that are
missing or incomplete are listed, and the rest is plotted. Needs neither JAX nor daro_jax.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench.study.run import (
    ALGOS,
    DEFAULT_CONFIG,
    HELDOUT,
    PARAMETERIZATIONS,
    SEEDS,
    WEIGHT_LRS,
    RunSpec,
    lr_label,
    now,
    read_json,
    sweep_runs,
)

LAST_STEPS = 3  # "final" training accuracy and entropy: mean over the last 3 steps
DPI = 90  # figures are committed: keep them small


def step_axis(ax) -> None:
    """x axis of RL steps: label and integer ticks."""
    ax.set_xlabel("RL step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def group_colors(n: int) -> list:
    """One colour per pass-rate group, light (low mu) to dark (high mu)."""
    return [colormaps["viridis"](x) for x in np.linspace(0.9, 0.0, n)]


class Run:
    """A run JSON with its metrics as arrays over steps (NaN where a metric is absent)."""

    def __init__(self, data: dict):
        self.data = data
        self.name = data["name"]
        self.k = data["config"]["algo"]["k"]
        self.steps = np.array([s["step"] for s in data["steps"]])

    def metric(self, key: str) -> np.ndarray:
        """Metric `key` per step."""
        return np.array([s["metrics"].get(key, math.nan) for s in self.data["steps"]])

    def group(self, name: str, g: int) -> np.ndarray:
        """group/<name>/<g>of<K> per step, NaN at steps where group g had no prompt."""
        present = self.metric(f"group/prompts/{g}of{self.k}") > 0
        return np.where(present, self.metric(f"group/{name}/{g}of{self.k}"), math.nan)

    def mixed_groups(self) -> range:
        """Groups 0 < g < K (the ones with a policy gradient)."""
        return range(1, self.k)


def load_runs(runs_dir: Path) -> tuple[dict[str, Run], list[str]]:
    """Complete runs by name, and one line per incomplete run."""
    complete, incomplete = {}, []
    for path in sorted(runs_dir.glob("*_s*.json")):
        data = json.loads(path.read_text())
        if data["complete"]:
            complete[data["name"]] = Run(data)
        else:
            incomplete.append(f"{data['name']} ({len(data['steps'])} steps recorded)")
    return complete, incomplete


def expected_names() -> list[str]:
    """The full study's run names (default algorithms x seeds, and the sweep)."""
    names = [RunSpec(a, s).name for a in ALGOS for s in SEEDS]
    return names + [r.name for r in sweep_runs(DEFAULT_CONFIG) if r.name not in names]


def nan_stats(x: np.ndarray, axis=None) -> dict[str, np.ndarray]:
    """mean, std, min, max, median ignoring NaN (NaN where nothing is left)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "mean": np.nanmean(x, axis=axis),
            "std": np.nanstd(x, axis=axis),
            "min": np.nanmin(x, axis=axis),
            "max": np.nanmax(x, axis=axis),
            "median": np.nanmedian(x, axis=axis),
        }


def by_algo(runs: dict[str, Run]) -> dict[str, list[Run]]:
    """The convergence runs (no variant) of each algorithm, in ALGOS order."""
    out = {
        a: [r for r in runs.values() if r.data["algo"] == a and not r.data["variant"]]
        for a in ALGOS
    }
    return {a: rs for a, rs in out.items() if rs}


def stacked(runs: list[Run], values: Callable[[Run], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, [n_runs, n_steps]) of `values` per run, NaN-padded to the longest run."""
    steps = max((r.steps for r in runs), key=len)
    out = np.full((len(runs), len(steps)), math.nan)
    for i, r in enumerate(runs):
        v = values(r)
        out[i, : len(v)] = v
    return steps, out


def band_plot(ax, steps: np.ndarray, values: np.ndarray, label: str, color) -> None:
    """Mean over runs (rows) as a line with markers, min-max band; NaN steps skipped."""
    stats = nan_stats(values, axis=0)
    keep = np.isfinite(stats["mean"])
    n = values.shape[0]
    ax.plot(steps[keep], stats["mean"][keep], "o-", ms=3, color=color, label=f"{label} (n={n})")
    ax.fill_between(steps[keep], stats["min"][keep], stats["max"][keep], color=color, alpha=0.2)


ALGO_COLORS = dict(zip(ALGOS, ("C3", "C0", "C1", "C2", "C4"), strict=True))


def missing_panel(ax, what: str) -> None:
    """An empty panel that says which run it is waiting for."""
    ax.text(0.5, 0.5, f"missing: {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def loss_value_share(run: Run) -> dict[int, np.ndarray]:
    """|m_g L_g| / sum over mixed groups of |m_nu L_nu| per step (m_g L_g = group/wL: the
    aggregation's mass of the group times its token-mean loss)."""
    wl = {g: np.abs(run.group("wL", g)) for g in run.mixed_groups()}
    total = np.nansum(np.stack(list(wl.values())), axis=0)
    return {g: v / np.where(total > 0, total, math.nan) for g, v in wl.items()}


def advantage_share(run: Run) -> dict[int, np.ndarray]:
    """Share of sum_i c_i len_i |A_i| (the coefficient mass on grad log pi) per mixed group,
    for seq-mean aggregation with group-std advantages (GRPO): c_i len_i = 1 / n_seq and a
    prompt's mean |A| is 2 sqrt(mu (1 - mu)), so the share is prompts_g sqrt(mu(1-mu)) / sum."""
    mass = {}
    for g in run.mixed_groups():
        mu = g / run.k
        mass[g] = run.group("prompts", g) * math.sqrt(mu * (1 - mu))
    total = np.nansum(np.stack(list(mass.values())), axis=0)
    return {g: v / np.where(total > 0, total, math.nan) for g, v in mass.items()}


def group_panel(ax, run: Run, series: dict[int, np.ndarray], title: str) -> None:
    """One line per pass-rate group (NaN steps leave gaps)."""
    colors = group_colors(run.k - 1)
    for g, values in series.items():
        ax.plot(run.steps, values, "o-", ms=3, color=colors[g - 1], label=f"mu={g}/{run.k}")
    ax.set_title(title, fontsize=9)
    step_axis(ax)


def plot_loss_scale(runs: dict[str, Run], path: Path) -> None:
    """loss_scale.png: GRPO seed 0 (L_g, loss-value share, advantage-mass share) over DARO
    seed 0 (w_g, L_g, w_g L_g)."""
    fig = Figure(figsize=(14, 7.5), layout="constrained")
    axes = fig.subplots(2, 3)
    grpo, daro = runs.get("grpo_s0"), runs.get("daro_s0")
    if grpo is None:
        for ax in axes[0]:
            missing_panel(ax, "grpo_s0")
    else:
        groups = grpo.mixed_groups()
        group_panel(axes[0, 0], grpo, {g: grpo.group("L", g) for g in groups}, "GRPO: L_mu")
        group_panel(axes[0, 1], grpo, loss_value_share(grpo), "GRPO: share of |loss value|")
        group_panel(axes[0, 2], grpo, advantage_share(grpo), "GRPO: share of |advantage| mass")
    if daro is None:
        for ax in axes[1]:
            missing_panel(ax, "daro_s0")
    else:
        for ax, name, title in zip(
            axes[1], ("w", "L", "wL"), ("w_mu", "L_mu", "w_mu L_mu"), strict=True
        ):
            group_panel(
                ax, daro, {g: daro.group(name, g) for g in daro.mixed_groups()}, f"DARO: {title}"
            )
        axes[1, 2].axhline(1.0, color="k", lw=0.8, ls="--")
    for row in axes:
        if row[0].has_data():
            row[0].legend(fontsize=7)
    fig.suptitle("Loss scale per pass-rate group mu (seed 0; missing points: group absent)")
    fig.savefig(path, dpi=DPI)


def plot_convergence(runs: dict[str, Run], base: float, path: Path) -> None:
    """convergence.png: training accuracy and held-out accuracy vs step per algorithm."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_train, ax_eval = fig.subplots(1, 2)
    for algo, rs in by_algo(runs).items():
        band_plot(ax_train, *stacked(rs, lambda r: r.metric("accuracy")), algo, ALGO_COLORS[algo])
        steps, values = stacked(rs, lambda r: r.metric(HELDOUT))
        steps = np.concatenate([[0], steps])  # step 0: the base model, shared by all runs
        values = np.hstack([np.full((len(rs), 1), base), values])
        band_plot(ax_eval, steps, values, algo, ALGO_COLORS[algo])
    ax_train.set_title("training accuracy (DAPO: on its kept prompts, 0 < mu < 1)", fontsize=9)
    ax_eval.set_title("held-out accuracy (generated_heldout, greedy; step 0 = base)", fontsize=9)
    for ax in (ax_train, ax_eval):
        step_axis(ax)
        ax.legend(fontsize=8)
    fig.suptitle("Convergence: mean over seeds, band = min-max")
    fig.savefig(path, dpi=DPI)


def plot_entropy(runs: dict[str, Run], path: Path) -> None:
    """entropy.png: token-mean policy entropy of the trained rollouts vs step per algorithm."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for algo, rs in by_algo(runs).items():
        band_plot(ax, *stacked(rs, lambda r: r.metric("entropy")), algo, ALGO_COLORS[algo])
    step_axis(ax)
    ax.set_ylabel("entropy (nats / token)")
    ax.set_title("Policy entropy: mean over seeds, band = min-max")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=DPI)


def sweep_settings(runs: dict[str, Run]) -> dict[tuple[float, str], Run]:
    """DARO seed-0 runs by (weight lr, parameterisation), the convergence run included."""
    out = {}
    for r in runs.values():
        if r.data["algo"] == "daro" and r.data["seed"] == 0:
            lr = float(f"{r.data['weight_lr']:.6g}")
            out[(lr, r.data["daro_parameterization"])] = r
    return dict(
        sorted(out.items(), key=lambda item: (PARAMETERIZATIONS.index(item[0][1]), item[0][0]))
    )


def plot_sweep(runs: dict[str, Run], path: Path) -> None:
    """sweep.png: w_mu L_mu per group for each setting (rows: parameterisation, columns: weight
    lr), and training accuracy and entropy of every setting."""
    settings = sweep_settings(runs)
    fig = Figure(figsize=(14, 10), layout="constrained")
    grid = fig.add_gridspec(3, 6)
    for row, param in enumerate(PARAMETERIZATIONS):
        for col, lr in enumerate(WEIGHT_LRS):
            ax = fig.add_subplot(grid[row, 2 * col : 2 * col + 2])
            run = settings.get((lr, param))
            if run is None:
                missing_panel(ax, f"weight lr {lr_label(lr)}, {param}")
                continue
            series = {g: run.group("wL", g) for g in run.mixed_groups()}
            group_panel(ax, run, series, f"w L, weight lr {lr_label(lr)}, {param} ({run.name})")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax_acc, ax_ent = fig.add_subplot(grid[2, :3]), fig.add_subplot(grid[2, 3:])
    for (lr, param), run in settings.items():
        style = "-" if param == "log" else "--"
        label = f"{lr_label(lr)} {param}"
        ax_acc.plot(run.steps, run.metric("accuracy"), style, marker="o", ms=3, label=label)
        ax_ent.plot(run.steps, run.metric("entropy"), style, marker="o", ms=3, label=label)
    ax_acc.set_title("training accuracy")
    ax_ent.set_title("entropy")
    for ax in (ax_acc, ax_ent):
        step_axis(ax)
        if settings:
            ax.legend(fontsize=7)
    fig.suptitle("DARO weight lr x parameterisation sweep (seed 0)")
    fig.savefig(path, dpi=DPI)


# -- study.md ---------------------------------------------------------------------------


def run_summary(run: Run, base: float) -> dict[str, float]:
    """Per-run numbers of the tables: final training accuracy and entropy (mean over the last
    LAST_STEPS steps), held-out accuracy at the last evaluation and its change from the base
    model, mean entropy over all steps, wall minutes."""
    acc, ent = run.metric("accuracy"), run.metric("entropy")
    evals = run.metric(HELDOUT)
    evals = evals[np.isfinite(evals)]
    final_eval = evals[-1] if evals.size else math.nan
    return {
        "final train acc": float(np.mean(acc[-LAST_STEPS:])),
        "final held-out": float(final_eval),
        "held-out gain": float(final_eval - base),
        "mean entropy": float(np.mean(ent)),
        "final entropy": float(np.mean(ent[-LAST_STEPS:])),
        "wall min": run.data["wall_s"] / 60,
    }


def fmt(x: float) -> str:
    """Three decimals, or a dash for NaN."""
    return "—" if not np.isfinite(x) else f"{x:.3f}"


def algo_table(groups: dict[str, list[Run]], base: float) -> list[str]:
    """One row per algorithm; cells: mean ± std [min, max] over seeds of `run_summary`."""
    summaries = {algo: [run_summary(r, base) for r in rs] for algo, rs in groups.items()}
    keys = list(next(iter(summaries.values()))[0])
    lines = ["| algorithm | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---|" * len(keys)]
    for algo, rows in summaries.items():
        cells = []
        for key in keys:
            st = nan_stats(np.array([row[key] for row in rows]))
            cells.append(
                f"{fmt(st['mean'])} ± {fmt(st['std'])} [{fmt(st['min'])}, {fmt(st['max'])}]"
            )
        lines.append(f"| {algo} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def compare(a: np.ndarray, b: np.ndarray) -> str:
    """Whether DARO's values `a` differ from a baseline's `b` by more than the seed spread:
    the min-max ranges do not overlap."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if min(len(a), len(b)) < 2:
        return "not judged (fewer than 2 seeds with a value on one side)"
    if a.min() > b.max():
        return "DARO higher, ranges do not overlap: **exceeds the seed spread**"
    if a.max() < b.min():
        return "DARO lower, ranges do not overlap: **exceeds the seed spread**"
    return "ranges overlap: within the seed spread"


def pair_statements(groups: dict[str, list[Run]], base: float) -> list[str]:
    """One line per (baseline, quantity): DARO vs the baseline over seeds."""
    if "daro" not in groups:
        return ["No DARO convergence run yet: no comparison."]
    values = {
        algo: {
            k: np.array([run_summary(r, base)[k] for r in rs])
            for k in ("final train acc", "final held-out", "mean entropy")
        }
        for algo, rs in groups.items()
    }
    lines = []
    for algo in groups:
        if algo == "daro":
            continue
        for key, d in values["daro"].items():
            if algo == "dapo" and key == "final train acc":
                lines.append(
                    "- DARO vs dapo, final train acc: not comparable (DAPO's `accuracy` covers "
                    "only the prompts its dynamic sampling kept, 0 < mu < 1)."
                )
                continue
            b = values[algo][key]
            lines.append(
                f"- DARO vs {algo}, {key}: {fmt(d.mean())} [{fmt(d.min())}, {fmt(d.max())}] vs "
                f"{fmt(b.mean())} [{fmt(b.min())}, {fmt(b.max())}] "
                f"(diff {d.mean() - b.mean():+.3f}): {compare(d, b)}."
            )
    return lines


def magnitude_table(groups: dict[str, list[Run]]) -> list[str]:
    """Measured L_mu per group: median [min, max] over the steps (all seeds) where present."""
    k = next(iter(groups.values()))[0].k
    head = "| mu | " + " | ".join(groups) + " |"
    lines = [head, "|---|" + "---|" * len(groups)]
    for g in range(1, k):
        cells = []
        for rs in groups.values():
            x = np.concatenate([r.group("L", g) for r in rs])
            s, n = nan_stats(x), int(np.isfinite(x).sum())
            cells.append(f"{fmt(s['median'])} [{fmt(s['min'])}, {fmt(s['max'])}] n={n}")
        lines.append(f"| {g}/{k} | " + " | ".join(cells) + " |")
    return lines


def grpo_share_table(run: Run) -> list[str]:
    """GRPO seed 0 per group: L, loss-value share and advantage-mass share, median [min, max]."""
    shares = loss_value_share(run), advantage_share(run)
    lines = [
        "| mu | steps present | L_mu | share of loss value | share of advantage mass |",
        "|---|---:|---|---|---|",
    ]
    for g in run.mixed_groups():
        cols = [run.group("L", g), shares[0][g], shares[1][g]]
        n = int(np.isfinite(cols[0]).sum())
        cells = []
        for x in cols:
            s = nan_stats(x)
            cells.append(f"{fmt(s['median'])} [{fmt(s['min'])}, {fmt(s['max'])}]")
        lines.append(f"| {g}/{run.k} | {n} | " + " | ".join(cells) + " |")
    return lines


def daro_weight_table(run: Run) -> list[str]:
    """Per group: the w L closest to 1 over the steps and where, the largest w L, final w."""
    lines = [
        "| mu | steps present | w L closest to 1 (step) | max w L | w after the last update |",
        "|---|---:|---|---:|---:|",
    ]
    for g in run.mixed_groups():
        wl = run.group("wL", g)
        final_w = run.metric(f"daro/w_after_update/{g}of{run.k}")[-1]
        if not np.isfinite(wl).any():
            lines.append(f"| {g}/{run.k} | 0 | — | — | {fmt(final_w)} |")
            continue
        best = int(np.nanargmin(np.abs(wl - 1.0)))
        lines.append(
            f"| {g}/{run.k} | {int(np.isfinite(wl).sum())} | {fmt(wl[best])} "
            f"(step {run.steps[best]}) | {fmt(np.nanmax(wl))} | {fmt(final_w)} |"
        )
    return lines


def sweep_table(runs: dict[str, Run], base: float) -> list[str]:
    """Per sweep setting: how far the weights moved and what the run reached."""
    lines = [
        "| weight lr | param. | run | max w | min w | w L range (all steps) | final train acc "
        "| final held-out | mean entropy |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for (lr, param), r in sweep_settings(runs).items():
        w = np.stack([r.metric(f"daro/w_after_update/{g}of{r.k}") for g in r.mixed_groups()])
        wl = np.stack([r.group("wL", g) for g in r.mixed_groups()])
        s, wls = run_summary(r, base), nan_stats(wl)
        lines.append(
            f"| {lr_label(lr)} | {param} | {r.name} | {fmt(w.max())} | {fmt(w.min())} | "
            f"[{fmt(wls['min'])}, {fmt(wls['max'])}] | {fmt(s['final train acc'])} | "
            f"{fmt(s['final held-out'])} | {fmt(s['mean entropy'])} |"
        )
    return lines


def sweep_note(runs: dict[str, Run]) -> list[str]:
    """How far the weights can move in the sweep's budget (Adam's step is about the lr)."""
    n = max((len(r.steps) for r in sweep_settings(runs).values()), default=0)
    if not n:
        return []
    reach = ", ".join(
        f"lr {lr_label(lr)}: w <= {math.exp(n * lr):.2f} / {1 + n * lr:.2f}" for lr in WEIGHT_LRS
    )
    return [
        "Adam moves a parameter by at most about its lr per update (less in warm-up), so in "
        f"{n} updates w stays below (log / direct weights) {reach}. Whether the reweighting "
        "acts at all is read from max w above.",
        "",
    ]


def provenance(runs: dict[str, Run]) -> list[str]:
    """Dates, commits and load averages of the runs."""
    commits = sorted(
        {
            r.data["git"]["commit"][:10] + ("+dirty" if r.data["git"]["dirty"] else "")
            for r in runs.values()
        }
    )
    loads = [s["loadavg_1m"] for r in runs.values() for s in r.data["steps"]]
    starts = sorted(r.data["start_time"] for r in runs.values())
    recipes = sorted({Path(r.data["config_file"]).name for r in runs.values()})
    return [
        f"- recipe: {', '.join(recipes) or '—'}",
        f"- runs: {len(runs)}, started {starts[0]} … {starts[-1]}" if runs else "- runs: none",
        f"- git commits: {', '.join(commits) or '—'}",
        f"- 1-minute load average during the steps: {fmt(min(loads, default=math.nan))} … "
        f"{fmt(max(loads, default=math.nan))}",
    ]


DEFINITIONS = """\
Definitions. Step n (1-based, as TensorBoard) trains on rollouts of the policy after n - 1
updates; held-out accuracy at step n is measured after the n-th update (greedy, mean@1 on the
25 distinct generated held-out sums, so one problem = 0.04), step 0 is the base model.
Training accuracy = fraction of correct rollouts of the step (`accuracy`; for DAPO only over
the prompts its dynamic sampling kept, 0 < mu < 1, so it is not comparable). "final" =
mean over the last {last} steps (held-out: the last evaluation). Entropy = token-mean policy
entropy of the trained rollouts (`entropy`). Spread = min-max over seeds. Equal budget =
the same RL steps and 4 trained prompts per step; DAPO's dynamic sampling draws up to 3
batches per step to fill its batch with mixed prompts (more sampling compute).

L_mu (`group/L/<k>of<K>`) is the token mean, inside pass-rate group mu = k/K, of the
per-token loss l = -min(rho A, clip(rho) A) (+ beta KL for GRPO). On-policy (one update per
step, rho = 1) it is not ~0: the advantages of a prompt sum to zero over its K responses, but
the token mean weights each response by its length, so for one prompt
L_mu = sigma (len_wrong - len_right) / len_mean (sigma = sqrt(mu (1 - mu)), group-std
advantages): positive when right answers are shorter, and of either sign. Its gradient does
not vanish. The loss value each group contributes is m_mu L_mu (`group/wL`), m_mu = the
aggregation's mass of the group (`group/w`; GRPO's sequence mean: the group's share of the
step's prompts). "Share of loss value" = |m_mu L_mu| / sum_nu |m_nu L_nu| over the mixed
groups: the paper's loss-scale quantity. "Share of advantage mass" =
sum_(i in mu) c_i len_i |A_i| / (the same over all groups), the total coefficient the group
puts on grad log pi; for GRPO (c_i len_i = 1 / n_seq, a prompt's mean |A| = 2 sigma) it is
prompts_mu sigma_mu / sum_nu prompts_nu sigma_nu: GRPO's static weighting, which moves only
with the mix of prompts. For DARO, w_mu (`group/w`) is the weight used by the step's update
and w_mu L_mu (`group/wL`) the weighted group loss, whose optimum is 1.
"""


def study_markdown(runs: dict[str, Run], incomplete: list[str], base: float) -> str:
    groups = by_algo(runs)
    missing = [n for n in expected_names() if n not in runs]
    lines = [
        "# DARO vs baselines on the embedded default (`python -m bench.study plot`)",
        "",
        f"Generated {now()} from the run JSONs of `python -m bench.study run [--sweep]` "
        "(configs/smollm2_135m.py: SmolLM2-135M-Instruct, 4 prompts x K = 8, 48 new tokens, "
        "model lr 1e-5; DARO weight lr = optim.weight_lr_multiplier x model lr, default "
        "1000 x 1e-5 = 1e-2, log-weights).",
        "",
        *provenance(runs),
        f"- missing runs: {', '.join(missing) or 'none'}",
        f"- incomplete runs (not used): {', '.join(incomplete) or 'none'}",
        f"- base model held-out accuracy (step 0): {fmt(base)}",
        "",
        DEFINITIONS.format(last=LAST_STEPS),
        "## Loss scale (GRPO seed 0)",
        "",
        "![loss scale](loss_scale.png)",
        "",
        *(grpo_share_table(runs["grpo_s0"]) if "grpo_s0" in runs else ["grpo_s0 missing."]),
        "",
        "## DARO weights (seed 0): how close w_mu L_mu gets to 1",
        "",
        *(daro_weight_table(runs["daro_s0"]) if "daro_s0" in runs else ["daro_s0 missing."]),
        "",
        "## Measured L_mu per group: median [min, max] over steps and seeds, n = group-steps",
        "",
        *(magnitude_table(groups) if groups else ["No run."]),
        "",
        "## Convergence and entropy per algorithm",
        "",
        "![convergence](convergence.png) ![entropy](entropy.png)",
        "",
        *(algo_table(groups, base) if groups else ["No run."]),
        "",
        "DARO vs each baseline (mean [min, max] over seeds):",
        "",
        *pair_statements(groups, base),
        "",
        "## Weight lr x parameterisation sweep (DARO seed 0)",
        "",
        "![sweep](sweep.png)",
        "",
        *sweep_table(runs, base),
        "",
        *sweep_note(runs),
    ]
    return "\n".join(lines)


def cmd_plot(args) -> None:
    runs, incomplete = load_runs(args.runs)
    base_record = read_json(args.runs / "base_eval.json")
    base = base_record["metrics"].get(HELDOUT, math.nan) if base_record else math.nan
    args.out.mkdir(parents=True, exist_ok=True)
    plot_loss_scale(runs, args.out / "loss_scale.png")
    plot_convergence(runs, base, args.out / "convergence.png")
    plot_entropy(runs, args.out / "entropy.png")
    plot_sweep(runs, args.out / "sweep.png")
    text = study_markdown(runs, incomplete, base)
    (args.out / "study.md").write_text(text)
    print(text)
