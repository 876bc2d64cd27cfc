"""The ablation's report: per-recipe statistics over seeds, the markdown table, the plot and the W&B summary run.

Per recipe and metric (``val/map``, ``val/map_50``) over the seeds whose run finished:

    mean = Σ x_s / n        std = sqrt(Σ (x_s − mean)² / (n − 1))      (sample standard deviation)

Against the reference recipe, ``Δ = mean(recipe) − mean(reference)``; the difference is called
*separated* only when the per-seed values do not overlap (every seed of one recipe above every seed
of the other), otherwise *within the spread*. With no ties and 3 seeds each, chance alone separates
two recipes in 2 of the C(6, 3) = 20 orderings, 10 % (the exact two-sided Mann–Whitney test at U = 0).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .loggers import wandb_mode  # noqa: E402

METRICS = ("val/map", "val/map_50")
Verdict = Literal["reference", "above", "below", "within", "too few seeds"]
RULE = (
    "mean ± sample standard deviation (n − 1) over the seeds that finished; Δ = difference of the means "
    "from the reference recipe; a difference counts as separated only when the per-seed values do not "
    "overlap (all seeds above, or all below, every seed of the reference), else it is within the spread"
)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``n − 1`` in the denominator, ``statistics.stdev``); std None for n < 2."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def compare(reference: Sequence[float], other: Sequence[float]) -> tuple[float, Verdict]:
    """``(Δ, verdict)``: Δ = mean(other) − mean(reference); "above"/"below" when every value of ``other``
    is above/below every value of ``reference``, "within" when they overlap, "too few seeds" when a side has n < 2."""
    if not reference or not other:
        return math.nan, "too few seeds"
    delta = statistics.fmean(other) - statistics.fmean(reference)
    if len(reference) < 2 or len(other) < 2:
        return delta, "too few seeds"
    if min(other) > max(reference):
        return delta, "above"
    if max(other) < min(reference):
        return delta, "below"
    return delta, "within"


def summarize(runs: dict[str, dict[str, Any]], recipes: Sequence[str], seeds: Sequence[int], reference: str) -> dict:
    """Per recipe: ``{"runs": ok count, "seeds": len(seeds), metric: {"mean", "std", "values": {seed: x},
    "delta", "verdict"}, "minutes": mean wall time}``. ``runs`` maps ``"<recipe>-s<seed>"`` to run results
    (``status`` "ok" with ``metrics``; failed and missing runs are left out of the statistics)."""
    ok = {name: r for name, r in runs.items() if r.get("status") == "ok"}

    def values(recipe: str, metric: str) -> dict[int, float]:
        return {s: ok[f"{recipe}-s{s}"]["metrics"][metric] for s in seeds if f"{recipe}-s{s}" in ok}

    table: dict[str, dict] = {}
    for recipe in recipes:
        row: dict[str, Any] = {"runs": len(values(recipe, METRICS[0])), "seeds": len(seeds)}
        for metric in METRICS:
            vals = values(recipe, metric)
            mean, std = mean_std(list(vals.values()))
            delta, verdict = compare(list(values(reference, metric).values()), list(vals.values()))
            if recipe == reference:
                delta, verdict = 0.0, "reference"
            row[metric] = {"mean": mean, "std": std, "values": vals, "delta": delta, "verdict": verdict}
        minutes = [ok[f"{recipe}-s{s}"]["minutes"] for s in seeds if f"{recipe}-s{s}" in ok]
        row["minutes"] = statistics.fmean(minutes) if minutes else math.nan
        table[recipe] = row
    return table


LAST = 10  # validations at the end of a run whose val/map spread the report gives


def end_of_training(runs: dict[str, dict[str, Any]], recipes: Sequence[str], last: int = LAST) -> dict:
    """How steady each recipe ends: per run, ``val/map`` over its last ``last`` validations (the run's
    ``curve``): their mean, their sample std (the epoch-to-epoch spread) and min/max, and the final
    validation, and ``drop``, the furthest one of them fell below the best validation before it (0 for a
    curve that never falls: a run still improving has a large std but no drop). Per recipe (runs with at
    least two points only): ``{"runs": n, "final": (mean, std over seeds), "mean": (…), "spread": mean of
    the per-run stds, "drop": the largest per-run drop, "per_run": {run: {...}}}``; ``{}`` when no run has
    a curve."""
    table: dict[str, dict] = {}
    for recipe in recipes:
        per_run = {}
        for name, r in runs.items():
            full = [p["val/map"] for p in r.get("curve") or []]
            curve = full[-last:]
            if r.get("recipe") == recipe and r.get("status") == "ok" and len(curve) >= 2:
                best_so_far = list(accumulate(full, max))[-last:]
                drop = max(
                    b - v for b, v in zip(best_so_far, curve)
                )  # how far a validation fell below the best before it
                per_run[name] = {"n": len(curve), "final": curve[-1], "mean": statistics.fmean(curve),
                                 "std": statistics.stdev(curve), "min": min(curve), "max": max(curve),
                                 "drop": drop}  # fmt: skip
        if per_run:
            rows = list(per_run.values())
            table[recipe] = {
                "runs": len(rows),
                "final": mean_std([r["final"] for r in rows]),
                "mean": mean_std([r["mean"] for r in rows]),
                "spread": statistics.fmean(r["std"] for r in rows),
                "drop": max(r["drop"] for r in rows),
                "per_run": per_run,
            }
    return table


def end_markdown(end: dict, last: int = LAST) -> str:
    """The end-of-training section of the report ("" when no run recorded a curve)."""
    if not end:
        return ""

    def pm(pair: tuple[float, float | None]) -> str:
        return f"{pair[0]:.3f}" + (f" ± {pair[1]:.3f}" if pair[1] is not None else "")

    lines = [
        "",
        f"End of training: `val/map` of each run's last {last} validations (mean ± std over seeds of the run's "
        "final value and of its mean; spread: the mean over seeds of each run's sample std over those "
        "validations; drop: the furthest a validation fell below the best one before it, largest over seeds).",
        "",
        "| recipe | runs | final val/map | last-validations mean | spread | drop |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {recipe} | {row['runs']} | {pm(row['final'])} | {pm(row['mean'])} | {row['spread']:.3f} | {row['drop']:.3f} |"
        for recipe, row in end.items()
    ]
    lines += [
        "",
        "| run | validations | final | mean | std | min | max | drop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in end.values():
        for name, r in row["per_run"].items():
            cells = [f"{r[k]:.4f}" for k in ("final", "mean", "std", "min", "max", "drop")]
            lines.append("| " + " | ".join([name, str(r["n"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _cell(stat: dict) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    return f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["std"] is not None else " (1 seed)")


def _delta(stat: dict) -> str:
    words = {"above": "all seeds above", "below": "all seeds below", "within": "within spread"}
    if stat["verdict"] == "reference":
        return "reference"
    if math.isnan(stat["delta"]):
        return "–"
    return f"{stat['delta']:+.3f} ({words.get(stat['verdict'], stat['verdict'])})"


def markdown(summary: dict, runs: dict[str, dict[str, Any]], seeds: Sequence[int], header: str) -> str:
    """The report: ``header``, the rule, one row per recipe (mean ± std, Δ vs the reference), then one row per run."""
    lines = [header, "", RULE + ".", ""]
    lines += ["| recipe | runs | val/map | Δ val/map | val/map_50 | Δ val/map_50 | min/run |"]
    lines += ["|---|---:|---:|---|---:|---|---:|"]
    for recipe, row in summary.items():
        m, m50 = row["val/map"], row["val/map_50"]
        minutes = "–" if math.isnan(row["minutes"]) else f"{row['minutes']:.1f}"
        cells = [recipe, f"{row['runs']}/{row['seeds']}", _cell(m), _delta(m), _cell(m50), _delta(m50), minutes]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed:",
        "",
        "| recipe | seed | val/map | val/map_50 | min | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for recipe in summary:
        for seed in seeds:
            r = runs.get(f"{recipe}-s{seed}", {"status": "missing"})
            if r.get("status") == "ok":
                mx = r["metrics"]
                cells = [f"{mx['val/map']:.4f}", f"{mx['val/map_50']:.4f}", f"{r['minutes']:.1f}", "ok"]
            else:
                status = r.get("status", "missing")
                cells = ["–", "–", "–", f"{status}: {r['error']}" if r.get("error") else status]
            lines.append("| " + " | ".join([recipe, str(seed), *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, reference: str) -> None:
    """One panel per metric: mean ± std as error bars (sample std), each seed's value as a dot beside it."""
    names = list(summary)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(2 * (0.8 * len(names) + 1.5), 4.5))
    for ax, metric in zip(axes, METRICS):
        for i, name in enumerate(names):
            stat = summary[name][metric]
            colour = "tab:red" if name == reference else "tab:blue"
            vals = list(stat["values"].values())
            ax.plot([i + 0.15] * len(vals), vals, "o", color=colour, alpha=0.5, markersize=4)
            if not math.isnan(stat["mean"]):
                ax.errorbar(i, stat["mean"], yerr=stat["std"] or 0.0, fmt="s", color=colour, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mAP")
    fig.suptitle(f"squares: mean ± sample std over seeds; dots: one seed each; red: {reference} (reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_summary(summary: dict, runs: dict[str, dict[str, Any]], group: str, save_dir: str, image: Path) -> None:
    """One more W&B run ``summary`` in ``group``: ``ablation/table`` (one row per recipe), ``ablation/runs``
    (one row per run) and ``ablation/plot``; offline unless online is possible (``WANDB_MODE`` wins)."""
    import wandb

    mode = wandb_mode("auto")  # the same decision as WandbLogger's (WANDB_MODE wins)
    run = wandb.init(project="detector", group=group, name="summary", job_type="ablation", dir=save_dir, mode=mode)
    columns = ["recipe", "runs"] + [f"{m} {k}" for m in METRICS for k in ("mean", "std", "delta", "verdict")]
    table = wandb.Table(columns=[*columns, "minutes"])
    for recipe, row in summary.items():
        cells = [row[m][k] for m in METRICS for k in ("mean", "std", "delta", "verdict")]
        table.add_data(recipe, row["runs"], *cells, row["minutes"])
    per_run = wandb.Table(columns=["run", "recipe", "seed", "status", *METRICS, "minutes", "error"])
    for name, r in runs.items():
        mx = r.get("metrics", {})
        per_run.add_data(
            name, r["recipe"], r["seed"], r["status"], *[mx.get(m) for m in METRICS], r.get("minutes"), r.get("error")
        )
    run.log({"ablation/table": table, "ablation/runs": per_run, "ablation/plot": wandb.Image(str(image))})
    run.finish()
