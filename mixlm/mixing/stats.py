"""Correlations that score a mixture regression and label its plots: Pearson and Spearman over runs.

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
