"""RegMix's optimizer with constraints: simulate many mixtures from the prior, keep those that satisfy the
constraints, predict their loss with the fitted regression, and average the top-k lowest. Averaging many
good mixtures instead of taking the single best one keeps the answer away from the regression's noise at
one point.

Constraints (`Constraints`, all optional besides the repetition bound RegMix already had):
  repetition  w_d * token_budget / tokens_d <= max_usage (the per-domain maximum number of epochs; without
              a budget RegMix's w_d <= max_usage * share_d), from `DomainPrior.usage_bounds`.
  min / max   per-domain weight bounds. Candidates are drawn as lo + (1 - sum lo) * Dirichlet, so every one
              meets the minimums.
  max_kl      KL(w || prior token shares) in nats; max_l1: sum_d |w_d - share_d|.
  zero_below  weights below it in the result are written as exactly 0 (the rest renormalised and kept
              within the bounds).
Every constraint is convex in w, so the mean of accepted mixtures satisfies it too; the result is checked
again after zeroing. `propose` reports which constraints bind: those the unconstrained top-k mean (the same
draws, no constraint applied) violates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.fitting import FitResult
from mixlm.mixing.prior import DomainPrior
from mixlm.mixing.sample import DRAW_CHUNK, as_prior, dirichlet_draws, strength_grid
from mixlm.mixing.tables import NEGLIGIBLE_WEIGHT

TOLERANCE = 1e-9  # slack when checking a constraint on floats


@dataclass(frozen=True)
class Constraints:
    """min_weight / max_weight: one bound for every domain, or {domain: bound} (others unbounded);
    max_kl / max_l1: distance to the prior's token shares (None: no bound); zero_below: see the module."""

    min_weight: float | Mapping[str, float] = 0.0
    max_weight: float | Mapping[str, float] = 1.0
    max_kl: float | None = None
    max_l1: float | None = None
    zero_below: float = NEGLIGIBLE_WEIGHT


@dataclass(frozen=True)
class ConstraintCheck:
    """One constraint on the result: its limit, the result's value, the unconstrained top-k mean's value,
    and whether it binds (the unconstrained answer violates it). For per-domain bounds, `domains` names
    the domains at issue."""

    name: str
    limit: str
    value: str
    unconstrained: str
    binds: bool
    domains: tuple[str, ...] = ()

    def line(self) -> str:
        where = f" ({', '.join(self.domains)})" if self.domains else ""
        state = "binds" if self.binds else "slack"
        return f"{self.name} {self.limit}: {self.value}; unconstrained top-k {self.unconstrained}{where} -> {state}"


@dataclass
class Proposal:
    """weights: {domain: weight} in the model's domain order (sums to 1); predicted: the model's loss for it,
    predicted_std: its predictive std where the regressor has one (GP), else None; checks: each constraint
    (see ConstraintCheck); drawn / accepted: simulated mixtures and those meeting every constraint;
    zeroed: domains set to 0 by zero_below."""

    weights: dict[str, float]
    predicted: float
    predicted_std: float | None
    checks: list[ConstraintCheck] = field(default_factory=list)
    drawn: int = 0
    accepted: int = 0
    zeroed: tuple[str, ...] = ()

    @property
    def binding(self) -> list[str]:
        return [c.name for c in self.checks if c.binds]


def kl_to_prior(weights_MxD: np.ndarray, prior_D: np.ndarray) -> np.ndarray:
    """KL(w || prior) in nats per row, [M] (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms_MxD = np.where(weights_MxD > 0, weights_MxD * np.log(weights_MxD / prior_D), 0.0)
    return terms_MxD.sum(axis=1)


def l1_to_prior(weights_MxD: np.ndarray, prior_D: np.ndarray) -> np.ndarray:
    return np.abs(weights_MxD - prior_D).sum(axis=1)


def _per_domain(bound: float | Mapping[str, float], domains: tuple[str, ...], default: float, what: str) -> np.ndarray:
    if isinstance(bound, Mapping):
        unknown = sorted(set(bound) - set(domains))
        if unknown:
            raise ConfigError(f"{what}: domains {unknown} are not in the model's {list(domains)}")
        values_D = np.array([float(bound.get(d, default)) for d in domains])
    else:
        values_D = np.full(len(domains), float(bound))
    if np.any(~np.isfinite(values_D)) or np.any(values_D < 0) or np.any(values_D > 1):
        raise ConfigError(f"{what}: weights must lie in [0, 1], got {dict(zip(domains, values_D.tolist()))}")
    return values_D


def weight_bounds(
    constraints: Constraints, domains: tuple[str, ...], repetition_D: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(lo_D, hi_D): the per-domain bounds, hi the tighter of max_weight and the repetition bound; raises
    a ConfigError naming the conflict when no mixture can meet them."""
    lo_D = _per_domain(constraints.min_weight, domains, 0.0, "min weight")
    hi_D = np.minimum(_per_domain(constraints.max_weight, domains, 1.0, "max weight"), repetition_D)
    clash = [f"{d} (min {lo:g} > max {hi:.4g})" for d, lo, hi in zip(domains, lo_D, hi_D) if lo > hi + TOLERANCE]
    if clash:
        raise ConfigError(
            f"min weight above the max weight or repetition limit for {', '.join(clash)}; lower the minimum, "
            "raise the maximum, or allow more epochs (--max-epochs)"
        )
    if lo_D.sum() > 1 + TOLERANCE:
        raise ConfigError(f"the min weights sum to {lo_D.sum():.4g} > 1: no mixture meets them; lower them")
    if hi_D.sum() < 1 - TOLERANCE:
        raise ConfigError(
            f"the max weights (with the repetition limits) sum to {hi_D.sum():.4g} < 1: no mixture meets them; "
            "raise them or allow more epochs (--max-epochs)"
        )
    if constraints.zero_below < 0 or constraints.zero_below >= 1:
        raise ConfigError(f"zero_below={constraints.zero_below} must be in [0, 1)")
    low = [d for d, lo in zip(domains, lo_D) if 0 < lo < constraints.zero_below]
    if low:
        raise ConfigError(
            f"min weights of {low} are below the zeroing threshold {constraints.zero_below:g}: a weight cannot "
            "be both at least its minimum and written as 0; raise those minimums or lower --zero-below"
        )
    for name, value in (("max_kl", constraints.max_kl), ("max_l1", constraints.max_l1)):
        if value is not None and not value >= 0:
            raise ConfigError(f"{name}={value} must be >= 0")
    return lo_D, hi_D


def _project_to_box(v_D: np.ndarray, lo_D: np.ndarray, hi_D: np.ndarray) -> np.ndarray:
    """The w with sum 1 and lo <= w <= hi closest to v + tau (bisection on the shift tau)."""
    low, high = float((lo_D - v_D).min()) - 1.0, float((hi_D - v_D).max()) + 1.0
    for _ in range(200):
        tau = 0.5 * (low + high)
        if np.clip(v_D + tau, lo_D, hi_D).sum() > 1.0:
            high = tau
        else:
            low = tau
    w_D = np.clip(v_D + 0.5 * (low + high), lo_D, hi_D)
    return w_D / w_D.sum()


def propose(
    model: FitResult,
    prior: DomainPrior | Mapping[str, float],
    *,
    constraints: Constraints | None = None,
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
) -> Proposal:
    """The predicted-best mixture over `model.domains` under `constraints`, as a Proposal.

    Draws n_samples mixtures the way `sample_mixtures` does (same temperature, strength grid; no minimum or
    rounding), shifted onto the min weights, keeps those within every constraint, predicts each with the
    model's `regressor` (default: its primary one) and averages the top_k lowest. max_usage / token_budget:
    the per-domain epoch limit (see the module docstring).
    """
    constraints = constraints or Constraints()
    # In the model's order; a prior over more domains (a prepared folder with eval-only ones) is narrowed.
    prior = as_prior(prior).subset(model.domains)
    if n_samples < 1 or top_k < 1:
        raise ConfigError(f"n_samples={n_samples} and top_k={top_k} must both be >= 1")
    domains = model.domains
    lo_D, hi_D = weight_bounds(constraints, domains, prior.usage_bounds(max_usage, token_budget))
    share_D = prior.shares_D
    rng = np.random.default_rng(seed)
    base_D = prior.tempered(temperature)
    strengths_S = strength_grid(min_strength, max_strength, num_strengths)

    def admissible(w_MxD: np.ndarray) -> np.ndarray:
        ok_M = np.all(w_MxD <= hi_D + TOLERANCE, axis=1) & np.all(w_MxD >= lo_D - TOLERANCE, axis=1)
        if constraints.max_kl is not None:
            ok_M &= kl_to_prior(w_MxD, share_D) <= constraints.max_kl
        if constraints.max_l1 is not None:
            ok_M &= l1_to_prior(w_MxD, share_D) <= constraints.max_l1
        return ok_M

    def keep_best(weights, losses, new_weights, new_losses):
        # A running top-k, so memory stays one chunk whatever n_samples is.
        weights, losses = np.concatenate([weights, new_weights]), np.concatenate([losses, new_losses])
        keep = np.argsort(losses, kind="stable")[:top_k]
        return weights[keep], losses[keep]

    empty = (np.zeros((0, len(domains))), np.zeros(0))
    best, free = empty, empty
    remaining, accepted = n_samples, 0
    while remaining > 0:
        m = min(remaining, DRAW_CHUNK)
        remaining -= m
        raw_MxD = dirichlet_draws(base_D, strengths_S, m, rng)
        raw_M = model.predict(raw_MxD, regressor)
        free = keep_best(*free, raw_MxD, raw_M)
        if lo_D.any():
            shifted_MxD = lo_D + (1.0 - lo_D.sum()) * raw_MxD
            ok_M = admissible(shifted_MxD)
            shifted_MxD = shifted_MxD[ok_M]
            shifted_M = model.predict(shifted_MxD, regressor) if len(shifted_MxD) else np.zeros(0)
        else:  # no minimums: the candidates are the raw draws, already predicted
            ok_M = admissible(raw_MxD)
            shifted_MxD, shifted_M = raw_MxD[ok_M], raw_M[ok_M]
        accepted += len(shifted_MxD)
        best = keep_best(*best, shifted_MxD, shifted_M)
    if accepted < top_k:
        raise ConfigError(
            f"only {accepted} of {n_samples} simulated mixtures met the constraints (repetition bound, "
            f"min/max weights, distance to the prior), fewer than top_k={top_k}; raise n_samples, or loosen "
            "max_usage / --max-kl / --max-l1 / the weight bounds"
        )
    mean_D = best[0].mean(axis=0)
    weights_D, zeroed = _zero_small(mean_D / mean_D.sum(), lo_D, hi_D, constraints.zero_below)
    zeroed = tuple(domains[i] for i in zeroed)
    for name, limit, distance in (("KL", constraints.max_kl, kl_to_prior), ("L1", constraints.max_l1, l1_to_prior)):
        value = float(distance(weights_D[None], share_D)[0]) if limit is not None else 0.0
        if limit is not None and value > limit + 1e-6:
            raise ConfigError(
                f"zeroing weights below {constraints.zero_below:g} ({', '.join(zeroed)}) moved the mixture past "
                f"the {name} bound ({value:.4g} > {limit:g}); lower --zero-below or loosen the bound"
            )
    checks = _checks(weights_D, free[0].mean(axis=0), lo_D, hi_D, share_D, constraints, domains)
    predicted = float(model.predict(weights_D[None], regressor)[0])
    std = model.predict_std(weights_D[None], regressor)
    return Proposal(
        {d: float(w) for d, w in zip(domains, weights_D)},
        predicted,
        None if std is None else float(std[0]),
        checks,
        n_samples,
        accepted,
        zeroed,
    )


def _zero_small(
    w_D: np.ndarray, lo_D: np.ndarray, hi_D: np.ndarray, threshold: float
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Weights below `threshold` (and with no minimum) set to 0, the rest renormalised within [lo, hi]."""
    small_D = (w_D < threshold) & (lo_D == 0)
    if not small_D.any() or small_D.all():
        return w_D, ()
    hi_kept_D = np.where(small_D, 0.0, hi_D)
    if hi_kept_D.sum() < 1 - TOLERANCE:
        return w_D, ()  # the zeroed domains are needed to reach 1 under the bounds: keep them
    kept_D = np.where(small_D, 0.0, w_D)
    w_D = _project_to_box(kept_D / kept_D.sum(), np.where(small_D, 0.0, lo_D), hi_kept_D)
    w_D = np.where(small_D, 0.0, w_D)
    return w_D / w_D.sum(), tuple(np.flatnonzero(small_D).tolist())


def _checks(
    w_D: np.ndarray,
    free_D: np.ndarray,
    lo_D: np.ndarray,
    hi_D: np.ndarray,
    share_D: np.ndarray,
    constraints: Constraints,
    domains: tuple[str, ...],
) -> list[ConstraintCheck]:
    checks = []
    over = tuple(d for d, f, h in zip(domains, free_D, hi_D) if f > h + TOLERANCE)
    if (hi_D < 1).any():
        at = max(range(len(domains)), key=lambda d: w_D[d] / hi_D[d] if hi_D[d] > 0 else math.inf)
        checks.append(ConstraintCheck(
            "max weight / epochs", "w_d <= bound_d", f"highest {domains[at]} {w_D[at]:.4f} of {hi_D[at]:.4f}",
            f"over it in {len(over)} domains", bool(over), over,
        ))
    if lo_D.any():
        under = tuple(d for d, f, lo in zip(domains, free_D, lo_D) if f < lo - TOLERANCE)
        checks.append(ConstraintCheck(
            "min weight", "w_d >= min_d", f"lowest margin {float((w_D - lo_D).min()):.4f}",
            f"under it in {len(under)} domains", bool(under), under,
        ))
    for name, limit, distance in (
        ("KL to prior", constraints.max_kl, kl_to_prior),
        ("L1 to prior", constraints.max_l1, l1_to_prior),
    ):
        if limit is not None:
            value, free = float(distance(w_D[None], share_D)[0]), float(distance(free_D[None], share_D)[0])
            checks.append(ConstraintCheck(name, f"<= {limit:g}", f"{value:.4f}", f"{free:.4f}", free > limit))
    return checks


def optimize(model: FitResult, prior: DomainPrior | Mapping[str, float], **options) -> dict[str, float]:
    """The predicted-best mixture {domain: weight} over `model.domains` (sums to 1): `propose(model, prior,
    **options).weights`, with propose's keyword options (n_samples, top_k, seed, the sampler's temperature and
    strength grid, max_usage / token_budget, regressor, constraints). Shares below constraints.zero_below
    (default NEGLIGIBLE_WEIGHT) are 0 (the rest renormalised)."""
    return propose(model, prior, **options).weights
