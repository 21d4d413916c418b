"""The report's own figures (the fit's scatter and loss-vs-weight plots, the mixture bars and the training curves
come from `mix fit`, mixlm.mixing.plot_mixture and `mixlm plot`). Built on matplotlib's Figure, no pyplot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path.name


def plot_rounds(rounds: list[dict], target: str, path: Path) -> str:
    """Per round: the proposal's predicted loss with its interval, its loss measured at the search scale (the next
    round's first run, or the candidates' sweep), the round's best proxy; and how far the proposal moved."""
    fig = _figure(8, 4.2)
    ax = fig.add_subplot()
    r_R = np.array([r["round"] for r in rounds])
    predicted = np.array([r["predicted"] for r in rounds])
    low = np.array([r["low"] for r in rounds])
    high = np.array([r["high"] for r in rounds])
    ax.errorbar(r_R, predicted, yerr=[predicted - low, high - predicted], fmt="o-", capsize=4,
                label="proposal, predicted (interval: out-of-fold error)")
    achieved = [(r["round"], r["achieved"]) for r in rounds if r["achieved"] is not None]
    if achieved:
        ax.plot(*zip(*achieved), "s", markersize=8, label="proposal, measured at the search scale")
    ax.plot(r_R, [r["best_loss"] for r in rounds], "v--", label="best proxy of the round")
    ax.set_xlabel("round")
    ax.set_ylabel(target)
    ax.set_xticks(r_R)
    moved = [(r["round"], r["moved"]) for r in rounds if r["moved"] is not None]
    if moved:
        twin = ax.twinx()
        twin.bar(*zip(*moved), width=0.25, alpha=0.25, color="gray", label="moved (L1)")
        twin.set_ylabel("proposal moved (L1)")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("refinement rounds")
    return _save(fig, path)


def plot_transfer(panels: list[tuple[str, str, list[float], list[float], list[str]]], target: str, path: Path) -> str:
    """One scatter per step (small scale's loss against the larger one's, each point a mixture)."""
    fig = _figure(4.2 * max(1, len(panels)), 4)
    for k, (small, large, x, y, labels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.plot(x, y, "o")
        for xi, yi, label in zip(x, y, labels):
            if label:
                ax.annotate(label, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{small}: {target}")
        ax.set_ylabel(f"{large}: {target}")
        ax.set_title(f"{small} -> {large} ({len(x)} mixtures)", fontsize=9)
    return _save(fig, path)


def plot_validation(validation: dict, target: str, path: Path) -> str:
    """The target loss of each validated model: the mean over seeds with its interval, and every seed."""
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    names = list(validation)
    for i, name in enumerate(names):
        v = validation[name]
        seeds = [x for x in v["seeds"].values() if x is not None and math.isfinite(x)]
        ax.plot([i] * len(seeds), seeds, ".", color="gray")
        if math.isfinite(v["low"]):
            ax.errorbar([i], [v["mean"]], yerr=[[v["mean"] - v["low"]], [v["high"] - v["mean"]]], fmt="o",
                        capsize=5, color="C0")
        else:
            ax.plot([i], [v["mean"]], "o", color="C0")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(target)
    ax.set_title("target-scale validation: mean over seeds (interval), each seed (gray)")
    return _save(fig, path)
