"""`ado`: Adaptive Data Optimization, per-domain scaling laws fitted online (Jiang et al. 2025, "Adaptive Data
Optimization: Dynamic Sample Selection with Scaling Laws", ICLR 2025, arXiv 2410.11820; JAX code yidingjiang/ado).

Each domain k's training loss is fitted as a power law of the data seen, L_k(n) = eps_k + beta_k * n^(-alpha_k)
(Huber loss on log L, from a grid of starts; alpha_k in [0, 0.8]). At each update, with the prior mu (the natural
token shares) and h the exponential moving average (decay 0.9) of the sampled shares ("credit assignment"):

    slope_k = alpha_k * (L_k(n) - eps_k) / n                 (-dL_k/dn: how fast domain k still learns)
    rho     = clip_min(normalise(slope * mu * h^0.5), 0.01)   (the paper's preference, at least 0.01 each)
    p       = 0.9 * p_avg + 0.1 * rho                          (smoothed towards the time-average of rho)

and p_avg is the step-weighted average of rho (the configured weights before the first fit). n is the total
number of tokens trained on (the public code's default; `x_axis: domain` fits each domain against its own tokens).
Points before warmup_steps are not fitted (the early transient), as in the paper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.online.base import Decision, DomainSignal, OnlineStrategy, normalised, vector

ALPHA_MAX = 0.8  # the fit's bound on the exponent, as in the public code


@dataclasses.dataclass(frozen=True)
class ADO(OnlineStrategy):
    kind = "ado"
    default_every = 10

    prior: str = "natural"  # natural (token shares) | uniform | configured (data.mixture)
    min_weight: float = 0.01  # rho's floor per domain
    smoothing: float = 0.9  # weight of p_avg in p
    credit_decay: float = 0.9  # gamma of h, per update
    credit_power: float = 0.5
    min_exponent: float = 0.05  # alpha_k is taken as at least this in the slope (the public code's floor)
    min_points: int = 4  # windows a fit needs
    x_axis: str = "total"  # total | domain

    def __post_init__(self):
        for key in ("smoothing", "credit_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"mixing.options.{key}={getattr(self, key)}: must be in [0, 1)")
        if not 0 <= self.min_weight < 1:
            raise ConfigError(f"mixing.options.min_weight={self.min_weight}: must be in [0, 1)")
        if self.prior not in ("natural", "uniform", "configured"):
            raise ConfigError(f"mixing.options.prior={self.prior!r}: expected natural, uniform or configured")
        if self.x_axis not in ("total", "domain"):
            raise ConfigError(f"mixing.options.x_axis={self.x_axis!r}: expected total or domain")
        if self.min_points < 3:
            raise ConfigError(f"mixing.options.min_points={self.min_points}: a 3-parameter law needs at least 3")

    def start(self, domains: Sequence[str], weights: np.ndarray, natural: np.ndarray) -> tuple[dict, None]:
        if self.min_weight * len(domains) >= 1:
            raise ConfigError(f"mixing.options.min_weight={self.min_weight} x {len(domains)} domains >= 1: no "
                              f"mixture can give every domain that much; lower it below {1 / len(domains):.3g}")
        prior = {"natural": natural, "uniform": np.ones(len(domains)), "configured": weights}[self.prior]
        return {"prior": normalised(prior).tolist(), "h": list(map(float, weights)), "p_avg": list(map(float, weights)),
                "n": [], "loss": [], "fits": None}, None

    def update(self, state: dict, signal: DomainSignal) -> tuple[dict, Decision | None]:
        loss = signal.mean_loss()
        last = vector(state["loss"][-1]) if state["loss"] else np.full(len(loss), np.nanmean(loss))
        loss = np.where(np.isfinite(loss), loss, last)  # a domain absent from the window keeps its last loss
        n = signal.tokens_seen.sum() * np.ones(len(loss)) if self.x_axis == "total" else signal.tokens_seen
        share = signal.tokens / max(signal.tokens.sum(), 1.0)
        state = {**state, "h": (self.credit_decay * vector(state["h"]) + (1 - self.credit_decay) * share).tolist(),
                 "n": [*state["n"], n.tolist()], "loss": [*state["loss"], loss.tolist()]}
        if signal.step < self.warmup_steps or len(state["n"]) < self.min_points or np.any(n <= 0):
            return state, None
        n_TxD, loss_TxD = vector(state["n"]), vector(state["loss"])
        fits = [fit_power_law(n_TxD[:, d], loss_TxD[:, d]) for d in range(len(loss))]
        a, e, alpha = (np.array(column) for column in zip(*fits))
        predicted = np.exp(e) + np.exp(a) * n ** -alpha
        slope = np.maximum(alpha, self.min_exponent) * np.maximum(predicted - np.exp(e), 0.0) / n
        preference = slope * vector(state["prior"]) * vector(state["h"]) ** self.credit_power
        rho = clip_min(normalised(preference) if preference.sum() > 0 else vector(state["prior"]), self.min_weight)
        p_avg = vector(state["p_avg"])
        p = self.smoothing * p_avg + (1 - self.smoothing) * rho
        weight = min(1.0, self.interval / (signal.step + 1))
        state = {**state, "fits": [list(f) for f in fits], "p_avg": ((1 - weight) * p_avg + weight * rho).tolist()}
        return state, Decision(normalised(p))


def clip_min(p: np.ndarray, floor: float) -> np.ndarray:
    """p with every entry at least `floor`, summing to 1: entries below it are raised to it and the others
    scaled down to make room, until none is below (the public code's one shrink-and-floor pass can leave an
    entry under the floor after renormalising)."""
    p = np.asarray(p, np.float64) / np.sum(p)
    low = p < floor
    while True:
        free = ~low
        q = np.where(low, floor, p * (1 - floor * low.sum()) / p[free].sum())
        if not np.any(q[free] < floor):
            return q
        low = low | (q < floor)


HUBER_DELTA = 1e-3


def fit_power_law(n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """(a, e, alpha) of log L = logsumexp(a - alpha * log n, e), i.e. L = exp(e) + exp(a) * n^-alpha, minimising
    the Huber loss (delta 1e-3) on log L (alpha in [0, 0.8]): the best of a grid over (exp(e), alpha), with exp(a)
    by least squares for each, refined by L-BFGS-B. Deterministic; a few ms for 100 points."""
    from scipy.optimize import minimize

    log_n, log_loss = np.log(np.asarray(n, np.float64)), np.log(np.asarray(loss, np.float64))
    upper_e = float(np.log(np.max(loss)) + 1.0)
    bounds = [(-20.0, 20.0), (-5.0, upper_e), (0.0, ALPHA_MAX)]

    def objective(theta):
        a, e, alpha = theta
        u, v = a - alpha * log_n, np.full_like(log_n, e)
        top = np.maximum(u, v)
        pred = top + np.log(np.exp(u - top) + np.exp(v - top))
        r = pred - log_loss
        big = np.abs(r) > HUBER_DELTA
        value = np.sum(np.where(big, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA), 0.5 * r * r))
        d_r = np.where(big, HUBER_DELTA * np.sign(r), r)
        w_u = np.exp(u - pred)  # d pred / d u; d pred / d v = 1 - w_u
        return value, np.array([np.sum(d_r * w_u), np.sum(d_r * (1 - w_u)), np.sum(d_r * w_u * -log_n)])

    # The grid: irreducible loss eps below the lowest loss seen, exponent alpha; beta = exp(a) fits L - eps.
    eps_G = np.exp(-5.0) + (np.min(loss) - np.exp(-5.0)) * np.linspace(0.0, 0.98, 25)
    alpha_H = np.linspace(0.0, ALPHA_MAX, 17)
    x_HxT = np.exp(-alpha_H[:, None] * log_n[None, :])
    target_GxT = np.asarray(loss)[None, :] - eps_G[:, None]
    beta_GxH = np.maximum((target_GxT @ x_HxT.T) / np.sum(x_HxT * x_HxT, axis=1)[None, :], 1e-8)
    pred_GxHxT = np.log(eps_G[:, None, None] + beta_GxH[:, :, None] * x_HxT[None, :, :])
    r = pred_GxHxT - log_loss
    score_GxH = np.sum(np.where(np.abs(r) > HUBER_DELTA, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA), 0.5 * r * r),
                       axis=-1)
    # At alpha = 0 the law is flat and any split of the loss between eps and beta fits alike: the largest eps
    # among the best fits wins (the loss no decrease explains is irreducible), else a flat domain keeps a slope.
    best_GxH = score_GxH <= score_GxH.min() * (1 + 1e-9) + 1e-12
    g = int(np.flatnonzero(best_GxH.any(axis=1)).max())
    h = int(np.argmin(np.where(best_GxH[g], score_GxH[g], np.inf)))
    start = np.clip([np.log(beta_GxH[g, h]), np.log(eps_G[g]), alpha_H[h]], [b[0] for b in bounds],
                    [b[1] for b in bounds])
    result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds)
    best = result.x if np.isfinite(result.fun) and result.fun <= score_GxH[g, h] else start
    return tuple(float(x) for x in best)
