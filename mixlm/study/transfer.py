"""How far a smaller scale's ranking of mixtures carries to a larger one, with bootstrap confidence intervals.

    step = rank_transfer(small_N, large_N, bootstrap=2000, confidence=0.95, seed=0)
    step.spearman, step.spearman_ci, step.accuracy, step.accuracy_ci

Pairwise decision accuracy (DataDecide, Magnusson et al. 2025): over every pair of mixtures, whether the smaller
scale orders the two as the larger one does. A pair tied at the larger scale says nothing and is left out; a
pair tied at the smaller scale (and not at the larger) counts one half, a coin flip. Intervals are percentile
bootstrap intervals over mixtures: each resample draws N mixtures with replacement (seeded, so a report is the
same on a rerun); a mixture drawn twice makes a pair tied at both scales, which is left out. A resample where a
statistic is undefined (constant losses) is left out of its interval, and the count of those left is kept.

`calibrated` carries a prediction at one scale to another through a straight line fitted on the other
mixtures measured at both (leave-one-out), and `seed_interval` is the t interval of a mean over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mixlm.mixing.stats import spearman


def decision_accuracy(small_N: np.ndarray, large_N: np.ndarray) -> float:
    """The share of mixture pairs the small scale orders as the large one does (module docstring); NaN when no
    pair is untied at the large scale."""
    small_N, large_N = np.asarray(small_N, dtype=float), np.asarray(large_N, dtype=float)
    i, j = np.triu_indices(len(small_N), k=1)
    large_sign = np.sign(large_N[i] - large_N[j])
    small_sign = np.sign(small_N[i] - small_N[j])
    kept = large_sign != 0
    if not kept.any():
        return math.nan
    score = np.where(small_sign[kept] == 0, 0.5, (small_sign[kept] == large_sign[kept]).astype(float))
    return float(score.mean())


def resample_indices(n: int, draws: int, seed: int) -> np.ndarray:
    """[draws, n] indices into n items, drawn with replacement (one bootstrap resample per row)."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap_values(statistic, small_N: np.ndarray, large_N: np.ndarray, draws_BxN: np.ndarray) -> np.ndarray:
    """statistic(small[rows], large[rows]) for each row of resample indices, [B] (NaN where undefined)."""
    small_N, large_N = np.asarray(small_N, dtype=float), np.asarray(large_N, dtype=float)
    return np.array([statistic(small_N[rows], large_N[rows]) for rows in draws_BxN], dtype=float)


def percentile_interval(values_B: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` percentile interval of the finite values (linear interpolation between order
    statistics, numpy's default); (NaN, NaN) when none is finite."""
    finite = np.asarray(values_B, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return math.nan, math.nan
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class TransferStep:
    """One step from a smaller to a larger scale over `n` shared mixtures: Spearman and decision accuracy with
    their bootstrap intervals; `undefined` counts resamples where a statistic was undefined."""

    small: str
    large: str
    n: int
    spearman: float
    spearman_ci: tuple[float, float]
    accuracy: float
    accuracy_ci: tuple[float, float]
    undefined: int = 0

    def to_dict(self) -> dict:
        return {"small": self.small, "large": self.large, "n": self.n, "spearman": self.spearman,
                "spearman_ci": list(self.spearman_ci), "accuracy": self.accuracy,
                "accuracy_ci": list(self.accuracy_ci), "undefined_resamples": self.undefined}


def rank_transfer(small_N, large_N, *, small: str = "small", large: str = "large", bootstrap: int = 2000,
                  confidence: float = 0.95, seed: int = 0) -> TransferStep:
    """Spearman and decision accuracy of `small_N` against `large_N` (the same mixtures, in the same order) with
    percentile bootstrap intervals over `bootstrap` resamples of the mixtures."""
    small_N, large_N = np.asarray(small_N, dtype=float), np.asarray(large_N, dtype=float)
    finite = np.isfinite(small_N) & np.isfinite(large_N)
    small_N, large_N = small_N[finite], large_N[finite]
    n = len(small_N)
    if n < 2:
        nan = (math.nan, math.nan)
        return TransferStep(small, large, n, math.nan, nan, math.nan, nan)
    draws = resample_indices(n, bootstrap, seed)
    rho_B = bootstrap_values(spearman, small_N, large_N, draws)
    acc_B = bootstrap_values(decision_accuracy, small_N, large_N, draws)
    undefined = int((~np.isfinite(rho_B) | ~np.isfinite(acc_B)).sum())
    return TransferStep(small, large, n, spearman(small_N, large_N), percentile_interval(rho_B, confidence),
                        decision_accuracy(small_N, large_N), percentile_interval(acc_B, confidence), undefined)


def seed_interval(values, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean of per-seed values (NaN bounds with one seed)."""
    from scipy.stats import t

    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(values):
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def line_fit(x_N: np.ndarray, y_N: np.ndarray) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line, or None with fewer than two distinct x."""
    x_N, y_N = np.asarray(x_N, dtype=float), np.asarray(y_N, dtype=float)
    if len(x_N) < 2 or np.ptp(x_N) == 0:
        return None
    slope, intercept = np.polyfit(x_N, y_N, 1)
    return float(intercept), float(slope)


def calibrated(measured_x: dict, measured_y: dict, name: str, value: float, low: float, high: float) -> dict | None:
    """The prediction `value` [low, high] of mixture `name` at scale x carried to scale y by the line through the
    other mixtures measured at both ({name: loss} each); None when fewer than two others span a line."""
    others = [k for k in measured_x if k != name and k in measured_y
              and math.isfinite(measured_x[k]) and math.isfinite(measured_y[k])]
    fitted = line_fit(np.array([measured_x[k] for k in others]), np.array([measured_y[k] for k in others]))
    if fitted is None:
        return None
    a, b = fitted
    ends = sorted([a + b * low, a + b * high]) if math.isfinite(low) and math.isfinite(high) else [math.nan] * 2
    return {"predicted": a + b * value, "low": ends[0], "high": ends[1], "from": others, "slope": b}
