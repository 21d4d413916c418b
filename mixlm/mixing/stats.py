"""Correlations that score a mixture regression and label its plots: Pearson and Spearman over runs, why a
correlation is undefined on a set of runs, and the mean and standard error of per-fold scores.

scipy (for the ranks) is imported only by `spearman`.
"""

from __future__ import annotations

import numpy as np


def spearman(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import rankdata

    return pearson(rankdata(a_N), rankdata(b_N))


def pearson(a_N: np.ndarray, b_N: np.ndarray) -> float:
    a_N, b_N = a_N - a_N.mean(), b_N - b_N.mean()
    denom = np.sqrt((a_N * a_N).sum() * (b_N * b_N).sum())
    return float((a_N * b_N).sum() / denom) if denom > 0 else float("nan")


def undefined_reason(actual_N: np.ndarray, predicted_N: np.ndarray) -> str | None:
    """Why a correlation of predicted with actual is undefined on these runs, or None when it is defined:
    'non-finite predictions', 'constant targets' or 'tied predictions' (every prediction equal)."""
    if not np.all(np.isfinite(predicted_N)):
        return "non-finite predictions"
    if len(actual_N) < 2 or np.ptp(actual_N) == 0:
        return "constant targets"
    if np.ptp(predicted_N) == 0:
        return "tied predictions"
    return None


def mean_std_se(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, standard deviation and standard error of the mean of the finite values (NaN where fewer than
    one, resp. two, are finite). The SE treats folds as independent, which overlapping training sets are
    not: read it as a lower bound on the uncertainty."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    std = float(np.std(values))
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(np.mean(values)), std, se
