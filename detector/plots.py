"""PNG figures of a run, drawn with matplotlib's object API (no pyplot state, any backend):
confusion matrix, precision-recall and F1-confidence curves, and the training curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

LEGEND_MAX = 20  # classes named in a legend or written into matrix cells; more make the figure unreadable


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_confusion_matrix(matrix: Tensor, class_names: Sequence[str], path: Path, title: str) -> Path:
    """``matrix [K + 1, K + 1]`` counts (rows true, columns predicted, last: background) as a heat map
    coloured by the share of each row (each true class's objects; for background, its false
    positives), with the counts written in the cells when K <= 20."""
    counts = matrix.double().numpy()
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    names = [*class_names, "background"]
    side = min(4 + 0.45 * len(names), 30)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    if len(names) <= LEGEND_MAX + 1:
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, f"{int(n)}", ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90 if len(names) > 8 else 0)
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _per_class(ax: Axes, x: np.ndarray, ys: np.ndarray, labels: list[str]) -> None:
    """One thin line per class with data (rows of ``ys`` without NaN), their mean in bold."""
    shown = [k for k in range(len(ys)) if not np.isnan(ys[k]).any()]
    for k in shown:
        ax.plot(x, ys[k], linewidth=1, alpha=0.7, label=labels[k] if len(shown) <= LEGEND_MAX else None)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)


def plot_pr_curves(recall: Tensor, precision: Tensor, class_names: Sequence[str], path: Path, title: str) -> Path:
    """COCO's interpolated precision ``[K, R]`` against the recall thresholds ``[R]`` per class (NaN rows:
    classes without ground truth, left out) and their mean; the legend gives each AP (mean precision)."""
    p, r = precision.numpy(), recall.double().numpy()
    with_gt = ~np.isnan(p).any(1)
    ap = np.where(with_gt, np.nan_to_num(p).mean(1), np.nan)  # a class's AP: its mean interpolated precision
    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot()
    _per_class(ax, r, p, [f"{name} {a:.3f}" for name, a in zip(class_names, ap)])
    if with_gt.any():
        ax.plot(r, p[with_gt].mean(0), color="black", linewidth=3, label=f"all classes {ap[with_gt].mean():.3f} AP")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_f1_curves(
    thresholds: Tensor, f1: Tensor, class_names: Sequence[str], best: tuple[float, float] | None, path: Path, title: str
) -> Path:
    """F1 ``[K, T]`` against the confidence thresholds ``[T]`` per class and their mean (bold); ``best``
    (confidence, mean F1) is marked."""
    x, y = thresholds.double().numpy(), f1.numpy()
    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot()
    _per_class(ax, x, y, list(class_names))
    with_gt = ~np.isnan(y).any(1)
    if with_gt.any():
        label = "all classes" if best is None else f"all classes {best[1]:.3f} at {best[0]:.3f}"
        ax.plot(x, y[with_gt].mean(0), color="black", linewidth=3, label=label)
    if best is not None:
        ax.axvline(best[0], color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_results(rows: list[dict[str, float]], panels: Sequence[str], path: Path, title: str = "") -> Path:
    """One panel per key of ``panels``: its logged values against ``step`` (from ``rows``, each a dict
    with ``step`` and the scalars logged at that step); a key never logged says so."""
    cols = min(4, max(len(panels), 1))
    fig = Figure(figsize=(4 * cols, 3.2 * math.ceil(len(panels) / cols)))
    for i, key in enumerate(panels):
        ax = fig.add_subplot(math.ceil(len(panels) / cols), cols, i + 1)
        points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
