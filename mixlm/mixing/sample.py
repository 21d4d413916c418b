"""RegMix's mixture sampler: Dirichlet draws around a tempered token prior, a repetition bound,
a minimum weight, rounding, de-duplication.

For each sample a concentration strength s is picked from a log-spaced grid and one mixture is drawn
from Dirichlet(s * base), base ∝ share**temperature. Small s gives mixtures dominated by one or two
domains, large s mixtures near the base; the grid covers both, which is what lets a regression see
the corners and the middle of the simplex.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.prior import DomainPrior, prior_from_mapping

# Mixtures are drawn in chunks of this many rows to bound memory for large n x oversample.
DRAW_CHUNK = 1 << 16


def strength_grid(min_strength: float, max_strength: float, num_strengths: int) -> np.ndarray:
    """Concentration strengths, log-spaced from min to max inclusive, [S]."""
    if not 0 < min_strength <= max_strength or num_strengths < 1:
        raise ConfigError(
            f"strengths need 0 < min_strength <= max_strength and num_strengths >= 1, got "
            f"{min_strength}, {max_strength}, {num_strengths}"
        )
    if min_strength == max_strength:
        return np.array([float(min_strength)])
    return np.logspace(np.log10(min_strength), np.log10(max_strength), num_strengths)


def dirichlet_draws(
    base_D: np.ndarray, strengths_S: np.ndarray, m: int, rng: np.random.Generator
) -> np.ndarray:
    """m mixtures, [m, D]: row i ~ Dirichlet(s_i * base_D) with s_i drawn uniformly from strengths_S.

    Gamma(a) is drawn as Gamma(a + 1) * U**(1/a) in log space: with a ~ 1e-4 (a small domain at a small
    strength) a direct Gamma draw underflows to 0, and a row of zeros cannot be normalised.
    """
    strength_M = strengths_S[rng.integers(len(strengths_S), size=m)]
    alpha_MxD = strength_M[:, None] * base_D[None, :]
    log_gamma_MxD = (
        np.log(rng.standard_gamma(alpha_MxD + 1.0)) + np.log1p(-rng.random(alpha_MxD.shape)) / alpha_MxD
    )
    log_gamma_MxD -= log_gamma_MxD.max(axis=1, keepdims=True)
    weights_MxD = np.exp(log_gamma_MxD)
    return weights_MxD / weights_MxD.sum(axis=1, keepdims=True)


def quantize(weights_MxD: np.ndarray, minimum: float) -> np.ndarray:
    """Drops weights below the grid step q = 1/round(1/minimum), renormalises, and rounds each row to
    integer multiples of q that sum to exactly 1 (largest remainder). Returns int64 units [M, D]
    (weight = units * q); a row whose every weight was dropped comes back all zero."""
    n_units = _units_per_one(minimum)
    kept_MxD = weights_MxD * n_units >= 1.0
    kept_weights_MxD = np.where(kept_MxD, weights_MxD, 0.0)
    total_M = kept_weights_MxD.sum(axis=1, keepdims=True)
    scaled_MxD = kept_weights_MxD / np.where(total_M > 0, total_M, 1.0) * n_units
    units_MxD = np.floor(scaled_MxD + 1e-9).astype(np.int64)
    deficit_M = np.where(total_M[:, 0] > 0, n_units - units_MxD.sum(axis=1), 0)
    # Hand the leftover units to the largest remainders; dropped domains never get one.
    remainder_MxD = np.where(kept_MxD, scaled_MxD - units_MxD, -1.0)
    rank_MxD = np.argsort(np.argsort(-remainder_MxD, axis=1, kind="stable"), axis=1)
    units_MxD += rank_MxD < deficit_M[:, None]
    return units_MxD


def _units_per_one(minimum: float) -> int:
    if not 0 < minimum < 1:
        raise ConfigError(f"minimum={minimum} must be in (0, 1); RegMix used 2e-4")
    return max(1, round(1.0 / minimum))


def as_prior(prior: DomainPrior | Mapping[str, float]) -> DomainPrior:
    """A DomainPrior, or a {domain: tokens or share} mapping turned into one."""
    return prior if isinstance(prior, DomainPrior) else prior_from_mapping(prior)


def sample_mixtures(
    prior: DomainPrior | Mapping[str, float],
    n: int,
    seed: int = 0,
    *,
    temperature: float = 0.5,
    min_strength: float = 0.1,
    max_strength: float = 5.0,
    num_strengths: int = 15,
    max_usage: float = 15.0,
    token_budget: float | None = None,
    minimum: float = 2e-4,
    oversample: int = 100,
) -> list[dict[str, float]]:
    """n distinct mixtures around the prior, each a dict {domain: weight} over all prior domains
    (weights >= 0, summing to 1, each 0 or a multiple of 1/round(1/minimum)).

    prior: a DomainPrior (see `load_prior`) or {domain: tokens or share}.
    temperature: base measure ∝ share**temperature. min/max/num_strengths: the strength grid.
    max_usage, token_budget: a mixture is rejected if any weight exceeds
        max_usage * tokens_d / token_budget (without a budget: max_usage * share_d).
    minimum: weights below it are dropped and the rest renormalised, then rounded to its scale.
    oversample: n * oversample candidates are drawn; the accepted, de-duplicated ones are
        subsampled to n. The same arguments and seed give the same list.
    Defaults are RegMix's (sail-sg/regmix mixture_config/synthesize_mixture.py).
    """
    prior = as_prior(prior)
    if n < 1 or oversample < 1:
        raise ConfigError(f"n={n} and oversample={oversample} must both be >= 1")
    rng = np.random.default_rng(seed)
    base_D = prior.tempered(temperature)
    strengths_S = strength_grid(min_strength, max_strength, num_strengths)
    bound_D = prior.usage_bounds(max_usage, token_budget)
    n_units = _units_per_one(minimum)
    accepted = []
    remaining = n * oversample
    while remaining > 0:
        m = min(remaining, DRAW_CHUNK)
        remaining -= m
        units_MxD = quantize(dirichlet_draws(base_D, strengths_S, m, rng), minimum)
        # The bound is checked on the final, rounded weights: those are what a run will use.
        ok_M = (units_MxD.sum(axis=1) == n_units) & np.all(units_MxD <= bound_D * n_units + 1e-9, axis=1)
        accepted.append(units_MxD[ok_M])
    accepted_AxD = np.concatenate(accepted)
    _, first_U = np.unique(accepted_AxD, axis=0, return_index=True)
    unique_UxD = accepted_AxD[np.sort(first_U)]
    if len(unique_UxD) < n:
        raise ConfigError(
            f"only {len(unique_UxD)} distinct mixtures passed the bound out of {n * oversample} drawn "
            f"({len(accepted_AxD)} accepted) but {n} were asked for; raise oversample or max_usage, or "
            "lower minimum"
        )
    chosen_N = np.sort(rng.choice(len(unique_UxD), size=n, replace=False))
    return [{d: int(u) / n_units for d, u in zip(prior.domains, units_D)} for units_D in unique_UxD[chosen_N]]
