"""Calibrated transfer statistics against hand computations on fixed numbers: pairwise decision accuracy (ties
included), bootstrap values on given resamples and their percentile interval, the seed t interval, and the
leave-one-out calibration line."""

import math

import numpy as np
import pytest

from mixlm.study.transfer import (
    bootstrap_values,
    calibrated,
    decision_accuracy,
    percentile_interval,
    rank_transfer,
    resample_indices,
    seed_interval,
)

SMALL = np.array([1.0, 2.0, 3.0, 4.0])
LARGE = np.array([1.0, 3.0, 2.0, 4.0])  # swaps the middle two: 1 of 6 pairs disagrees


def test_decision_accuracy_by_hand():
    assert decision_accuracy(SMALL, LARGE) == pytest.approx(5 / 6, abs=1e-15)
    assert decision_accuracy(SMALL, SMALL) == 1.0
    assert decision_accuracy(SMALL, -SMALL) == 0.0
    # a tie at the small scale counts 1/2: (0,1) tied -> 0.5, (0,2) and (1,2) agree -> 2.5 / 3
    assert decision_accuracy([1.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(2.5 / 3, abs=1e-15)
    # a tie at the large scale says nothing: (0,1) left out, the other two agree
    assert decision_accuracy([1.0, 2.0, 3.0], [1.0, 1.0, 2.0]) == 1.0
    assert math.isnan(decision_accuracy([1.0, 2.0], [5.0, 5.0]))


def test_bootstrap_values_and_interval_by_hand():
    draws = np.array([[0, 1, 2, 3], [0, 0, 1, 1], [3, 2, 1, 0], [1, 2, 2, 3]])
    values = bootstrap_values(decision_accuracy, SMALL, LARGE, draws)
    # row 1: items 0,0,1,1: the two pairs of one item twice are tied at both scales (left out); 4 of 4 agree.
    # row 3: items 1,2,2,3: small [2,3,3,4], large [3,2,2,4]: (0,1) and (0,2) disagree, (1,2) is one item
    # twice (left out), (0,3), (1,3), (2,3) agree: 3 of 5.
    assert values.tolist() == pytest.approx([5 / 6, 1.0, 5 / 6, 3 / 5], abs=1e-15)
    # quartiles of [0.6, 5/6, 5/6, 1] with linear interpolation: 0.6 + 0.75 (5/6 - 0.6) and 5/6 + 0.25 (1 - 5/6)
    low, high = percentile_interval(values, 0.5)
    assert low == pytest.approx(0.6 + 0.75 * (5 / 6 - 0.6), abs=1e-12)
    assert high == pytest.approx(5 / 6 + 0.25 * (1 - 5 / 6), abs=1e-12)
    # Spearman of the full row by hand: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    from mixlm.mixing.stats import spearman

    rho = bootstrap_values(spearman, SMALL, LARGE, draws[:2])
    assert rho.tolist() == pytest.approx([0.8, 1.0], abs=1e-12)


def test_rank_transfer_is_its_resamples_interval():
    small, large = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0]), np.array([2.6, 1.1, 5.0, 1.2, 4.5, 9.9])
    step = rank_transfer(small, large, bootstrap=300, confidence=0.9, seed=7)
    draws = resample_indices(6, 300, 7)
    assert draws.shape == (300, 6) and draws.min() >= 0 and draws.max() < 6
    assert step.accuracy == decision_accuracy(small, large) == pytest.approx(14 / 15, abs=1e-15)  # only (2,4) flips
    assert step.accuracy_ci == percentile_interval(bootstrap_values(decision_accuracy, small, large, draws), 0.9)
    assert step.accuracy_ci[0] <= step.accuracy <= step.accuracy_ci[1]
    assert step.n == 6
    # a NaN loss (a failed run) is left out, not ranked
    assert rank_transfer([*small, math.nan], [*large, 3.0], bootstrap=100).n == 6


def test_seed_interval_by_hand():
    mean, low, high = seed_interval([2.0, 4.0], 0.95)
    # sd (ddof 1) = sqrt(2), se = 1, t(0.975, 1 dof) = 12.706204736...
    assert mean == 3.0
    assert (low, high) == pytest.approx((3 - 12.706204736174707, 3 + 12.706204736174707), abs=1e-9)
    mean, low, high = seed_interval([2.5], 0.95)
    assert mean == 2.5 and math.isnan(low) and math.isnan(high)


def test_calibration_line_leaves_the_mixture_out():
    x = {"a": 1.0, "b": 2.0, "c": 3.0}
    y = {"a": 2.0, "b": 4.0, "c": 7.0}
    got = calibrated(x, y, "c", 3.0, 2.5, 3.5)  # the line through a and b: y = 2x
    assert got["predicted"] == pytest.approx(6.0) and (got["low"], got["high"]) == pytest.approx((5.0, 7.0))
    assert got["from"] == ["a", "b"]
    assert calibrated({"a": 1.0, "c": 3.0}, y, "c", 3.0, 2.5, 3.5) is None  # one other point spans no line
