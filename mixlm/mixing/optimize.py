"""RegMix's optimizer: simulate many mixtures from the prior, predict their loss with the fitted
regression, and average the top-k lowest. Averaging many good mixtures instead of taking the single
best one keeps the answer away from the regression's noise at one point."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mixlm.config import ConfigError
from mixlm.mixing.prior import DomainPrior
from mixlm.mixing.regression import FitResult
from mixlm.mixing.sample import DRAW_CHUNK, as_prior, dirichlet_draws, strength_grid
from mixlm.mixing.tables import clean_weights


def optimize(
    model: FitResult,
    prior: DomainPrior | Mapping[str, float],
    *,
    n_samples: int = 100_000,
    top_k: int = 128,
    seed: int = 0,
    temperature: float = 0.5,
    min_strength: float = 0.1,
    max_strength: float = 5.0,
    num_strengths: int = 15,
    max_usage: float = 15.0,
    token_budget: float | None = None,
    regressor: str | None = None,
) -> dict[str, float]:
    """The predicted-best mixture {domain: weight} over `model.domains` (sums to 1).

    Draws n_samples mixtures the way `sample_mixtures` does (same temperature, strength grid and
    repetition bound; no minimum or rounding), drops those over the bound, predicts each with the
    model's `regressor` (default: its primary one) and returns the mean of the top_k lowest. A mean
    of mixtures within the bound is within it too, so the result honours the bound. Shares below
    NEGLIGIBLE_WEIGHT are 0 (the rest renormalised).
    """
    # In the model's order; a prior over more domains (a prepared folder with eval-only ones) is narrowed.
    prior = as_prior(prior).subset(model.domains)
    if n_samples < 1 or top_k < 1:
        raise ConfigError(f"n_samples={n_samples} and top_k={top_k} must both be >= 1")
    rng = np.random.default_rng(seed)
    base_D = prior.tempered(temperature)
    strengths_S = strength_grid(min_strength, max_strength, num_strengths)
    bound_D = prior.usage_bounds(max_usage, token_budget)
    best_weights, best_losses = np.zeros((0, len(base_D))), np.zeros(0)
    remaining, accepted = n_samples, 0
    while remaining > 0:
        m = min(remaining, DRAW_CHUNK)
        remaining -= m
        weights_MxD = dirichlet_draws(base_D, strengths_S, m, rng)
        weights_MxD = weights_MxD[np.all(weights_MxD <= bound_D, axis=1)]
        accepted += len(weights_MxD)
        # Keep a running top-k so memory stays one chunk whatever n_samples is.
        best_weights = np.concatenate([best_weights, weights_MxD])
        best_losses = np.concatenate([best_losses, model.predict(weights_MxD, regressor)])
        keep = np.argsort(best_losses, kind="stable")[:top_k]
        best_weights, best_losses = best_weights[keep], best_losses[keep]
    if accepted < top_k:
        raise ConfigError(
            f"only {accepted} of {n_samples} simulated mixtures passed the repetition bound, fewer than "
            f"top_k={top_k}; raise n_samples or max_usage"
        )
    mean_D = best_weights.mean(axis=0)
    # A domain no top-k mixture used averages to ~1e-37, not 0: written and printed as 0 (clean_weights).
    return clean_weights({d: float(w) for d, w in zip(model.domains, mean_D / mean_D.sum())})
