"""The parametric mixing laws of the regressor panel (mixlm.mixing.regressors), each fit by scipy least squares
from several starts: `dml`, Data Mixing Laws' exponential (Ye et al. 2024), and `bimix`, a BiMix-style power law
(Ge et al. 2024) with learned transfer shares. The laws and their starts are in the module docstring of
mixlm.mixing.regressors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mixlm.errors import ConfigError


class _LeastSquaresLaw:
    """A parametric law fit by scipy least squares from several starts (the best training error wins).
    Subclasses define `law(params, x)`, `starts(x, y)` and `bounds(n_params)`."""

    has_std = False
    kind = ""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.params_P: np.ndarray | None = None

    def law(self, params_P: np.ndarray, x_MxD: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def starts(self, x_NxD: np.ndarray, y_N: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def jacobian(self, params_P: np.ndarray, x_MxD: np.ndarray) -> np.ndarray:
        """d law / d params, [M, P]."""
        raise NotImplementedError

    def bounds(self, n_params: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n_params, -np.inf), np.full(n_params, np.inf)

    def fit(self, x_NxD: np.ndarray, y_N: np.ndarray):
        from scipy.optimize import least_squares

        best = None
        for start_P in self.starts(x_NxD, y_N):
            lower_P, upper_P = self.bounds(len(start_P), x_NxD.shape[1])
            start_P = np.clip(start_P, lower_P + 1e-9, upper_P - 1e-9)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if not np.all(np.isfinite(self.law(start_P, x_NxD))):
                    continue
                found = least_squares(
                    lambda p: np.nan_to_num(self.law(p, x_NxD) - y_N, nan=1e6, posinf=1e6, neginf=-1e6),
                    start_P,
                    jac=lambda p: np.nan_to_num(self.jacobian(p, x_NxD), nan=0.0, posinf=1e6, neginf=-1e6),
                    bounds=(lower_P, upper_P),
                    method="trf",
                    x_scale="jac",
                    max_nfev=100 * (len(start_P) + 1),
                )
            if best is None or found.cost < best.cost:
                best = found
        if best is None:
            raise ConfigError(f"{self.kind}: no start gave a finite fit; the law does not suit these losses")
        self.params_P = best.x
        return self

    def predict(self, x_MxD: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self.law(self.params_P, np.asarray(x_MxD, dtype=np.float64))

    def save(self, directory: Path, name: str = "") -> dict:
        return {"params": self.params_P.tolist()}

    @classmethod
    def load(cls, state: dict):
        model = cls()
        model.params_P = np.asarray(state["params"], dtype=np.float64)
        return model


class ExponentialLawRegression(_LeastSquaresLaw):
    """Data Mixing Laws' form: loss = c + exp(b + sum_{d<D} t_d w_d) (k = exp(b) > 0, t_D = 0).
    params: [c, b, t_1 .. t_{D-1}]."""

    kind = "dml"

    def law(self, params_P: np.ndarray, x_MxD: np.ndarray) -> np.ndarray:
        return params_P[0] + np.exp(params_P[1] + x_MxD[:, :-1] @ params_P[2:])

    def jacobian(self, params_P: np.ndarray, x_MxD: np.ndarray) -> np.ndarray:
        e_M = np.exp(params_P[1] + x_MxD[:, :-1] @ params_P[2:])
        return np.concatenate([np.ones((len(x_MxD), 1)), e_M[:, None], e_M[:, None] * x_MxD[:, :-1]], axis=1)

    def starts(self, x_NxD: np.ndarray, y_N: np.ndarray) -> list[np.ndarray]:
        # For a few offsets c below the smallest loss, log(y - c) is linear in w: least squares gives b, t.
        spread = max(float(np.ptp(y_N)), 1e-6)
        design_NxF = np.concatenate([np.ones((len(y_N), 1)), x_NxD[:, :-1]], axis=1)
        starts = []
        for offset in (0.02, 0.1, 0.3, 1.0, 3.0):
            c = float(y_N.min()) - offset * spread
            coef_F = np.linalg.lstsq(design_NxF, np.log(y_N - c), rcond=None)[0]
            starts.append(np.concatenate([[c], coef_F]))
        return starts


class PowerLawRegression(_LeastSquaresLaw):
    """BiMix-style: loss = C + exp(a) * (exp(e) + sum_d m_d w_d) ** -exp(l), m = softmax(z).
    params: [C, a, l, e, z_1 .. z_D]."""

    kind = "bimix"
    STARTS_PER_DOMAIN = 2  # seeded on the domains whose weight tracks the loss most

    def law(self, params_P: np.ndarray, x_MxD: np.ndarray) -> np.ndarray:
        z_D = params_P[4:]
        m_D = np.exp(z_D - z_D.max())
        m_D /= m_D.sum()
        return params_P[0] + np.exp(params_P[1]) * (np.exp(params_P[3]) + x_MxD @ m_D) ** -np.exp(params_P[2])

    def jacobian(self, params_P: np.ndarray, x_MxD: np.ndarray) -> np.ndarray:
        z_D = params_P[4:]
        m_D = np.exp(z_D - z_D.max())
        m_D /= m_D.sum()
        amplitude, alpha, eps = np.exp(params_P[1]), np.exp(params_P[2]), np.exp(params_P[3])
        u_M = eps + x_MxD @ m_D
        power_M = amplitude * u_M**-alpha
        slope_M = -alpha * power_M / u_M  # d law / d u
        du_dz_MxD = m_D * (x_MxD - (x_MxD @ m_D)[:, None])  # softmax: d(m.x)/dz_j = m_j (x_j - m.x)
        return np.concatenate(
            [
                np.ones((len(x_MxD), 1)),
                power_M[:, None],
                (-np.log(u_M) * alpha * power_M)[:, None],
                (slope_M * eps)[:, None],
                slope_M[:, None] * du_dz_MxD,
            ],
            axis=1,
        )

    def bounds(self, n_params: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
        lower_P = np.concatenate([[-np.inf, -20.0, math.log(1e-3), math.log(1e-6)], np.full(dims, -12.0)])
        upper_P = np.concatenate([[np.inf, 20.0, math.log(5.0), 0.0], np.full(dims, 12.0)])
        return lower_P, upper_P

    def starts(self, x_NxD: np.ndarray, y_N: np.ndarray) -> list[np.ndarray]:
        from mixlm.mixing.stats import spearman

        dims = x_NxD.shape[1]
        tracking_D = np.array(
            [-spearman(x_NxD[:, d], y_N) if np.ptp(x_NxD[:, d]) > 0 else -np.inf for d in range(dims)]
        )
        seeds = [z for z in np.argsort(-np.nan_to_num(tracking_D, nan=-np.inf))[: self.STARTS_PER_DOMAIN]]
        # A uniform start converges slowly (thousands of evaluations on RegMix's runs) to the same optimum.
        z_starts = [np.where(np.arange(dims) == d, 4.0, 0.0) for d in seeds] or [np.zeros(dims)]
        starts = []
        for z_D in z_starts:
            for alpha, eps in ((0.3, 1e-2), (1.0, 1e-3)):
                m_D = np.exp(z_D) / np.exp(z_D).sum()
                feature_N = (eps + x_NxD @ m_D) ** -alpha
                design_Nx2 = np.stack([np.ones_like(feature_N), feature_N], axis=1)
                c, a = np.linalg.lstsq(design_Nx2, y_N, rcond=None)[0]
                starts.append(
                    np.concatenate([[c, math.log(max(a, 1e-6)), math.log(alpha), math.log(eps)], z_D])
                )
        return starts
