"""Figures of a mixture search: a mixture as bars, predicted against actual loss (of any predictions, or of
a fit's out-of-fold ones), loss against weight. Plots read regression results; regression never plots.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot): no global backend or figure
state, so plotting from a worker process or a test never needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixlm.mixing.fitting import FitResult
from mixlm.mixing.stats import pearson, spearman


def plot_mixture(mixtures: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of domain weights; several mixtures ({label: {domain: weight}}) are grouped
    per domain, domains ordered by the first mixture's weight."""
    from matplotlib.figure import Figure

    labels = list(mixtures)
    first = mixtures[labels[0]]
    domains = sorted({d for m in mixtures.values() for d in m}, key=lambda d: first.get(d, 0.0))
    height = 0.8 / len(labels)
    fig = Figure(figsize=(8, 1.5 + 0.3 * len(domains) * max(1, len(labels) / 2)))
    ax = fig.add_subplot()
    y_D = np.arange(len(domains))
    for j, label in enumerate(labels):
        ax.barh(
            y_D + (j - (len(labels) - 1) / 2) * height,
            [mixtures[label].get(d, 0.0) for d in domains],
            height=height,
            label=label,
        )
    ax.set_yticks(y_D, domains, fontsize=8)
    ax.set_xlabel("weight")
    ax.set_title(title)
    if len(labels) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_predictions(
    actual_N: np.ndarray,
    predicted: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    notes: Mapping[str, str] | None = None,
) -> Path:
    """One panel per regressor: predicted (x) against actual (y) loss with the y = x line, the pooled
    Spearman and Pearson correlations (over all points of the panel) in its title, and notes[kind] (e.g.
    the per-fold scores) on a second line."""
    from matplotlib.figure import Figure

    cols = min(len(predicted), 4)  # a panel of 8 regressors wraps onto two rows
    rows = math.ceil(len(predicted) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * rows))
    lo = min(actual_N.min(), *(p.min() for p in predicted.values()))
    hi = max(actual_N.max(), *(p.max() for p in predicted.values()))
    for j, (kind, predicted_N) in enumerate(predicted.items()):
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.scatter(predicted_N, actual_N, s=8, alpha=0.6)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        line = (
            f"{kind}: pooled ρ={_correlation(spearman(actual_N, predicted_N))}, "
            f"r={_correlation(pearson(actual_N, predicted_N))}"
        )
        if notes and notes.get(kind):
            line += f"\n{notes[kind]}"
        ax.set_title(line, fontsize=8)
        ax.set_xlabel("predicted loss")
        ax.set_ylabel("actual loss")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_fit(result: FitResult, path: str | Path) -> Path:
    """`plot_predictions` of a fit's out-of-fold predictions against the actual target, one panel per
    regressor (what `mixlm mix fit` writes as DIR/scatter.png): the pooled correlations over every run,
    and below them the per-fold mean Spearman ± SE of the table (they differ: pooling also rewards
    getting the level right across folds), the chosen regressor marked."""
    notes = {}
    for kind, score in result.cv.items():
        if kind not in result.oof_N:
            continue
        if math.isfinite(score.spearman):
            se = f" ± {score.spearman_se:.3f}" if math.isfinite(score.spearman_se) else ""
            note = f"per-fold mean ρ={score.spearman:.3f}{se} (SE, {score.scored_folds}/{score.total_folds} folds)"
        else:
            note = f"per-fold ρ undefined in all {score.total_folds} folds"
        notes[kind] = note + (" — chosen" if kind == result.primary else "")
    score = result.cv[result.primary]
    repeats = f" x {score.repeats} repeats" if score.repeats > 1 else ""
    return plot_predictions(
        result.actual_N,
        result.oof_N,
        path,
        title=f"{result.target_label}: {score.folds}-fold{repeats} out-of-fold predictions",
        notes=notes,
    )


def loss_vs_weight_figure(
    weights_NxD: np.ndarray,
    domains: Sequence[str],
    losses: Mapping[str, np.ndarray],
    target: tuple[str, np.ndarray] | None = None,
):
    """The Figure of plot_loss_vs_weight: one panel per domain that has a weight, its weight (x, log scale, zero
    weights at the left edge) against its own validation loss (`losses[domain]`, blue, where given) and the
    search target's loss (`target` = (label, loss per run [N]), orange) over the proxy runs."""
    from matplotlib.figure import Figure

    names = [d for d in domains if d in losses or target is not None]
    cols = math.ceil(math.sqrt(len(names)))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols + (1.6 if target is not None else 0), 2.8 * rows), layout="constrained")
    for j, domain in enumerate(names):
        ax = fig.add_subplot(rows, cols, j + 1)
        weight_N = weights_NxD[:, list(domains).index(domain)]
        floor = weight_N[weight_N > 0].min() / 2 if np.any(weight_N > 0) else 1e-4
        x_N = np.maximum(weight_N, floor)
        if domain in losses:
            ax.scatter(x_N, losses[domain], s=5, alpha=0.5, color="C0", label="the domain's own loss")
        if target is not None:
            ax.scatter(x_N, target[1], s=7, alpha=0.7, color="C1", marker="^", label=f"target: {target[0]}")
        ax.set_xscale("log")
        ax.set_title(domain, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.supxlabel("domain weight")
    fig.supylabel("validation loss" if target is not None else "domain validation loss")
    if target is not None and fig.axes:
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7, markerscale=2)
    return fig


def plot_loss_vs_weight(
    weights_NxD: np.ndarray,
    domains: Sequence[str],
    losses: Mapping[str, np.ndarray],
    path: str | Path,
    target: tuple[str, np.ndarray] | None = None,
) -> Path:
    """loss_vs_weight_figure written as a PNG at `path` ({domain: loss per run [N]}; `target`: (label, the search
    target's loss per run [N]) drawn in every panel); returns the path."""
    return _save(loss_vs_weight_figure(weights_NxD, domains, losses, target), path)


def _correlation(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "undefined (tied)"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
