"""The mixing-law regressors: models from mixture weights [N, D] (rows on the simplex) to a loss [N], all
under one interface, made by `make_regressor(kind)` and scored and chosen by `mixlm.mixing.fitting`.

    model = make_regressor("gp", seed=0).fit(weights_NxD, loss_N)      # -> the model
    loss_M = model.predict(weights_MxD)
    std_M = model.predict_std(weights_MxD)                           # only where `has_std`
    state = model.save(directory); same = load_regressor("gp", directory, state)

Kinds:
  lightgbm   gbdt, 1000 rounds, learning rate 1e-2, early stopping (3 rounds) on a validation split of the
             training rows: RegMix's settings (sail-sg/regmix regression_fitting); min_data_in_leaf scaled
             down below 200 rows (small sweeps).
  linear     loss = sum_d c_d * w_d (the weights sum to 1, so this already has an intercept).
  loglinear  loss = b + sum_d c_d * log(w_d + eps): diminishing returns per domain (eps picked from a
             small grid by training error).
  dml        Data Mixing Laws (Ye et al. 2024): loss = c + k * exp(sum_d t_d w_d), by scipy least squares
             from several starts (t_D = 0: the weights sum to 1, so one t is redundant with k).
  gp         Gaussian process (scikit-learn): ARD RBF + white noise on standardised log(w + 1e-3), y
             normalised, hyper-parameters by L-BFGS (at most 100 iterations, one start); `predict_std`
             gives the posterior standard deviation.
  bimix      BiMix-style power law (Ge et al. 2024: a domain's loss is A / r^alpha in its own proportion r,
             at a fixed step count), made a mixture -> loss regression: loss = C + A * (eps + sum_d m_d w_d)
             ** -alpha with transfer shares m = softmax(z) >= 0 learned (m on one domain is BiMix's own-
             proportion law; others' mass is transfer). Four starts, seeded on the two domains whose weight
             tracks the loss most.
  perdomain[:BASE]
             for a target that is the mean of several loss columns: one BASE model (default loglinear) per
             column, predictions averaged (std: sqrt(sum std^2) / T, taking the columns' errors as
             independent). With one column it is BASE.
  stacked[:A+B+...]
             non-negative least-squares weights (plus an intercept) over the bases' out-of-fold predictions
             (an inner 5-fold split of the training rows), then every base refit on all rows. Default bases:
             lightgbm, loglinear, dml, bimix (and perdomain, perdomain:lightgbm when the target has several
             columns); the GP only when named (stacked:gp+lightgbm+...): its inner folds reuse the kernel
             hyper-parameters fitted on all of the stack's rows (one search, not six).

Models that use the target's loss columns (perdomain, stacked) have `uses_parts = True` and take them as
`fit(x, y, parts_NxT)`. `default_regressors` is the panel `mix fit` scores unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.mixing_laws import ExponentialLawRegression, PowerLawRegression

# What `mix fit` fits unless told otherwise: RegMix's LightGBM, the linear baselines, and the GP and a stack over
# it, which scored best on RegMix's 512 runs (benchmarks/results/regmix_fit.md). bimix is left out of the stack:
# it carried 0.031 of that blend and is its slowest base on small sweeps (least squares from four starts).
DEFAULT_REGRESSORS = ("lightgbm", "linear", "loglinear", "gp", "stacked:gp+lightgbm+loglinear")
# Added to the default when the target is the mean of several loss columns (best there in regmix_fit.md).
DEFAULT_FOR_SEVERAL_COLUMNS = ("perdomain:lightgbm",)
REGRESSORS = ("lightgbm", "linear", "loglinear", "dml", "gp", "bimix", "perdomain", "stacked")


def default_regressors(target_columns: int = 1) -> tuple[str, ...]:
    """The panel `fit` scores when none is named, for a target averaging `target_columns` loss columns."""
    return DEFAULT_REGRESSORS + (DEFAULT_FOR_SEVERAL_COLUMNS if target_columns > 1 else ())


class LightGBMRegression:
    """RegMix's LightGBM regressor. One thread by default: with a few hundred rows, threads only
    add overhead (and the CPU is shared)."""

    kind = "lightgbm"
    has_std = False

    def __init__(
        self,
        *,
        num_rounds: int = 1000,
        learning_rate: float = 1e-2,
        early_stopping_rounds: int = 3,
        valid_fraction: float = 0.1,
        seed: int = 0,
        num_threads: int = 1,
    ):
        self.num_rounds = num_rounds
        self.learning_rate = learning_rate
        self.early_stopping_rounds = early_stopping_rounds
        self.valid_fraction = valid_fraction
        self.seed = seed
        self.num_threads = num_threads
        self.booster = None
        self.min_data_in_leaf = 20  # LightGBM's (and RegMix's) default; lowered for tiny sweeps in fit()

    def params(self) -> dict:
        return {
            "objective": "regression",
            "boosting": "gbdt",
            "metric": "l2",
            "learning_rate": self.learning_rate,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "min_data_in_leaf": self.min_data_in_leaf,
            "verbosity": -1,
        }

    def fit(self, x_NxD: np.ndarray, y_N: np.ndarray) -> LightGBMRegression:
        import lightgbm as lgb

        order_N = np.random.default_rng(self.seed).permutation(len(y_N))
        n_valid = max(1, round(self.valid_fraction * len(y_N)))
        valid, train = order_N[:n_valid], order_N[n_valid:]
        # RegMix fits hundreds of runs; with a few dozen, 20 rows per leaf allows one split per tree and the
        # model predicts a constant. Keep 20 from 200 rows up, scale down below that.
        self.min_data_in_leaf = int(min(20, max(2, len(train) // 10)))
        train_set = lgb.Dataset(
            x_NxD[train], y_N[train], free_raw_data=False, params={"min_data_in_leaf": self.min_data_in_leaf}
        )
        valid_set = lgb.Dataset(x_NxD[valid], y_N[valid], reference=train_set)
        self.booster = lgb.train(
            self.params(),
            train_set,
            num_boost_round=self.num_rounds,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
        )
        return self

    def predict(self, x_MxD: np.ndarray) -> np.ndarray:
        return self.booster.predict(x_MxD, num_iteration=self.booster.best_iteration or None)

    def save(self, directory: Path, name: str = "lightgbm") -> dict:
        self.booster.save_model(str(directory / f"{name}.txt"))
        return {"file": f"{name}.txt", "best_iteration": int(self.booster.best_iteration or 0)}

    @classmethod
    def load(cls, directory: Path, state: dict) -> LightGBMRegression:
        import lightgbm as lgb

        model = cls()
        model.booster = lgb.Booster(model_file=str(directory / state["file"]))
        model.booster.best_iteration = state.get("best_iteration", 0)
        return model


class LinearRegression:
    """Least squares on w (kind 'linear') or on log(w + eps) with an intercept (kind 'loglinear'; eps
    is picked from EPS_GRID by training error, since how fast returns diminish differs by target)."""

    EPS_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    has_std = False

    def __init__(self, kind: str = "linear", eps: float | None = None):
        if kind not in ("linear", "loglinear"):
            raise ValueError(f"kind={kind!r}")
        self.kind = kind
        self.eps = eps
        self.coef_F: np.ndarray | None = None

    def features(self, x_MxD: np.ndarray, eps: float | None = None) -> np.ndarray:
        if self.kind == "linear":
            return x_MxD
        eps = self.eps if eps is None else eps
        return np.concatenate([np.ones((len(x_MxD), 1)), np.log(x_MxD + eps)], axis=1)

    def fit(self, x_NxD: np.ndarray, y_N: np.ndarray) -> LinearRegression:
        best = None
        for eps in [None] if self.kind == "linear" else self.EPS_GRID:
            features_NxF = self.features(x_NxD, eps)
            coef_F = np.linalg.lstsq(features_NxF, y_N, rcond=None)[0]
            error = float(((features_NxF @ coef_F - y_N) ** 2).sum())
            if best is None or error < best[0]:
                best = (error, eps, coef_F)
        _, self.eps, self.coef_F = best
        return self

    def predict(self, x_MxD: np.ndarray) -> np.ndarray:
        return self.features(x_MxD) @ self.coef_F

    def save(self, directory: Path, name: str = "") -> dict:
        return {"eps": self.eps, "coef": self.coef_F.tolist()}

    @classmethod
    def load(cls, kind: str, state: dict) -> LinearRegression:
        model = cls(kind, state["eps"])
        model.coef_F = np.asarray(state["coef"], dtype=np.float64)
        return model


class GaussianProcessRegression:
    """scikit-learn's GaussianProcessRegressor on standardised log(w + EPS): ARD RBF x constant + white
    noise, y normalised, `restarts` restarts of the hyper-parameter search. Saved as its training rows and
    fitted kernel hyper-parameters (a reload refits nothing)."""

    kind = "gp"
    has_std = True
    EPS = 1e-3

    MAX_ITERATIONS = 100  # of L-BFGS on the hyper-parameters: the fit's cost on a few hundred rows

    def __init__(self, seed: int = 0, restarts: int = 0):
        self.seed = seed
        self.restarts = restarts
        self.gp = None
        self.center_D = self.scale_D = None
        self.fixed_kernel = None  # set by fixed_copy: fit without a hyper-parameter search

    def features(self, x_MxD: np.ndarray) -> np.ndarray:
        return (np.log(np.asarray(x_MxD, dtype=np.float64) + self.EPS) - self.center_D) / self.scale_D

    @staticmethod
    def kernel(dims: int):
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        return ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.ones(dims), (1e-2, 1e3)) + WhiteKernel(
            1e-2, (1e-8, 1.0)
        )

    def _regressor(self, kernel, optimize: bool):
        from sklearn.gaussian_process import GaussianProcessRegressor

        return GaussianProcessRegressor(
            kernel,
            normalize_y=True,
            n_restarts_optimizer=self.restarts if optimize else 0,
            optimizer=self._lbfgs if optimize else None,
            random_state=self.seed,
        )

    def _lbfgs(self, objective, theta, bounds):
        from scipy.optimize import minimize

        found = minimize(objective, theta, method="L-BFGS-B", jac=True, bounds=bounds,
                         options={"maxiter": self.MAX_ITERATIONS})
        return found.x, found.fun

    def fit(self, x_NxD: np.ndarray, y_N: np.ndarray) -> GaussianProcessRegression:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        logs_NxD = np.log(x_NxD + self.EPS)
        self.center_D = logs_NxD.mean(axis=0)
        self.scale_D = np.where(logs_NxD.std(axis=0) > 0, logs_NxD.std(axis=0), 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a bound reached is a fitted value, not an error
            kernel = self.kernel(x_NxD.shape[1]) if self.fixed_kernel is None else self.fixed_kernel
            self.gp = self._regressor(kernel, self.fixed_kernel is None).fit(self.features(x_NxD), y_N)
        return self

    def fixed_copy(self) -> GaussianProcessRegression:
        """An unfitted GP that reuses this one's fitted kernel hyper-parameters (no search): the stacked
        model's inner folds, at a fraction of the cost."""
        copy = GaussianProcessRegression(self.seed, self.restarts)
        copy.fixed_kernel = self.gp.kernel_
        return copy

    def predict(self, x_MxD: np.ndarray) -> np.ndarray:
        return self.gp.predict(self.features(x_MxD))

    def predict_std(self, x_MxD: np.ndarray) -> np.ndarray:
        return self.gp.predict(self.features(x_MxD), return_std=True)[1]

    def save(self, directory: Path, name: str = "") -> dict:
        return {
            "theta": self.gp.kernel_.theta.tolist(),
            "center": self.center_D.tolist(),
            "scale": self.scale_D.tolist(),
            "x": self.gp.X_train_.tolist(),
            "y": (self.gp.y_train_ * self.gp._y_train_std + self.gp._y_train_mean).tolist(),
        }

    @classmethod
    def load(cls, state: dict) -> GaussianProcessRegression:
        model = cls()
        model.center_D, model.scale_D = np.asarray(state["center"]), np.asarray(state["scale"])
        features_NxD, y_N = np.asarray(state["x"]), np.asarray(state["y"])
        kernel = cls.kernel(features_NxD.shape[1]).clone_with_theta(np.asarray(state["theta"]))
        model.gp = model._regressor(kernel, False).fit(features_NxD, y_N)
        return model


class PerDomainRegression:
    """One `base` model per loss column of the target, predictions averaged (the target is their mean)."""

    uses_parts = True

    def __init__(self, base: str = "loglinear", seed: int = 0):
        self.base = base
        self.seed = seed
        self.kind = f"perdomain:{base}" if base != "loglinear" else "perdomain"
        self.models: list = []

    @property
    def has_std(self) -> bool:
        return getattr(make_regressor(self.base), "has_std", False)

    def fit(self, x_NxD: np.ndarray, y_N: np.ndarray, parts_NxT: np.ndarray | None = None):
        columns_TxN = [y_N] if parts_NxT is None or parts_NxT.shape[1] == 1 else list(parts_NxT.T)
        self.models = [fit_regressor(make_regressor(self.base, self.seed), x_NxD, c_N) for c_N in columns_TxN]
        return self

    def predict(self, x_MxD: np.ndarray) -> np.ndarray:
        return np.mean([m.predict(x_MxD) for m in self.models], axis=0)

    def predict_std(self, x_MxD: np.ndarray) -> np.ndarray:
        variance_M = np.sum([m.predict_std(x_MxD) ** 2 for m in self.models], axis=0)
        return np.sqrt(variance_M) / len(self.models)

    def save(self, directory: Path, name: str = "perdomain") -> dict:
        return {
            "base": self.base,
            "models": [m.save(directory, f"{name}_{t}") for t, m in enumerate(self.models)],
        }

    @classmethod
    def load(cls, directory: Path, state: dict) -> PerDomainRegression:
        model = cls(state["base"])
        model.models = [load_regressor(state["base"], directory, s) for s in state["models"]]
        return model


class StackedRegression:
    """Non-negative weights over base models' out-of-fold predictions (see the module docstring)."""

    uses_parts = True
    has_std = False
    DEFAULT_BASES = ("lightgbm", "loglinear", "dml", "bimix")  # no GP by default: its search is the slowest fit
    INNER_FOLDS = 5

    def __init__(self, bases: tuple[str, ...] | None = None, seed: int = 0):
        self.bases = None if bases is None else tuple(bases)
        self.seed = seed
        self.kind = "stacked" if bases is None else "stacked:" + "+".join(bases)
        self.models: dict = {}
        self.weights_B: np.ndarray | None = None
        self.intercept = 0.0

    def base_kinds(self, parts_NxT: np.ndarray | None) -> tuple[str, ...]:
        if self.bases is not None:
            return self.bases
        several = parts_NxT is not None and parts_NxT.shape[1] > 1
        return self.DEFAULT_BASES + (("perdomain", "perdomain:lightgbm") if several else ())

    def fit(self, x_NxD: np.ndarray, y_N: np.ndarray, parts_NxT: np.ndarray | None = None):
        from scipy.optimize import nnls

        kinds = self.base_kinds(parts_NxT)
        folds = min(self.INNER_FOLDS, len(y_N) // 2)
        fold_N = np.empty(len(y_N), dtype=np.int64)
        for k, rows in enumerate(np.array_split(np.random.default_rng(self.seed + 1).permutation(len(y_N)), folds)):
            fold_N[rows] = k
        # Every base on all rows first: the final models, and the GP's hyper-parameters for the inner folds
        # (which only weigh the blend; the rows the stack is scored on are never among these).
        finals = {kind: fit_regressor(make_regressor(kind, self.seed), x_NxD, y_N, parts_NxT) for kind in kinds}
        oof_NxB = np.empty((len(y_N), len(kinds)))
        for k in range(folds):
            held = fold_N == k
            parts = None if parts_NxT is None else parts_NxT[~held]
            for b, kind in enumerate(kinds):
                fresh = finals[kind].fixed_copy() if hasattr(finals[kind], "fixed_copy") else make_regressor(kind, self.seed)
                model = fit_regressor(fresh, x_NxD[~held], y_N[~held], parts)
                oof_NxB[held, b] = model.predict(x_NxD[held])
        usable_B = np.all(np.isfinite(oof_NxB), axis=0)
        weights_B = np.zeros(len(kinds))
        if usable_B.any():
            centered_NxB = oof_NxB[:, usable_B] - oof_NxB[:, usable_B].mean(axis=0)
            weights_B[usable_B] = nnls(centered_NxB, y_N - y_N.mean())[0]
        if weights_B.sum() == 0:  # nothing helps: an equal blend of the usable bases
            weights_B = usable_B / max(usable_B.sum(), 1)
        self.models = {kind: finals[kind] for kind, w in zip(kinds, weights_B) if w > 0}
        self.weights_B = weights_B[weights_B > 0]
        self.intercept = float(y_N.mean() - oof_NxB[:, weights_B > 0].mean(axis=0) @ self.weights_B)
        return self

    @property
    def blend(self) -> dict[str, float]:
        """{base kind: its weight} of the fitted blend."""
        return dict(zip(self.models, self.weights_B.tolist()))

    def predict(self, x_MxD: np.ndarray) -> np.ndarray:
        return self.intercept + sum(w * m.predict(x_MxD) for w, m in zip(self.weights_B, self.models.values()))

    def save(self, directory: Path, name: str = "stacked") -> dict:
        return {
            "bases": None if self.bases is None else list(self.bases),
            "intercept": self.intercept,
            "weights": self.weights_B.tolist(),
            "models": {
                kind: m.save(directory, f"{name}_{kind.replace(':', '_')}") for kind, m in self.models.items()
            },
        }

    @classmethod
    def load(cls, directory: Path, state: dict) -> StackedRegression:
        model = cls(None if state["bases"] is None else tuple(state["bases"]))
        model.intercept = float(state["intercept"])
        model.weights_B = np.asarray(state["weights"], dtype=np.float64)
        model.models = {kind: load_regressor(kind, directory, s) for kind, s in state["models"].items()}
        return model


def _split_kind(kind: str) -> tuple[str, str]:
    family, _, argument = kind.partition(":")
    return family, argument


def make_regressor(kind: str, seed: int = 0):
    """A fresh, unfitted regressor of the given kind (see the module docstring; one of REGRESSORS, or
    perdomain:BASE / stacked:A+B+...)."""
    family, argument = _split_kind(kind)
    if family not in REGRESSORS or (argument and family not in ("perdomain", "stacked")):
        raise ConfigError(
            f"unknown regressor {kind!r}; choose from {', '.join(REGRESSORS)} (or perdomain:BASE, stacked:A+B)"
        )
    if family == "lightgbm":
        return LightGBMRegression(seed=seed)
    if family in ("linear", "loglinear"):
        return LinearRegression(family)
    if family == "dml":
        return ExponentialLawRegression(seed)
    if family == "bimix":
        return PowerLawRegression(seed)
    if family == "gp":
        return GaussianProcessRegression(seed)
    if family == "perdomain":
        base = argument or "loglinear"
        if _split_kind(base)[0] in ("perdomain", "stacked"):
            raise ConfigError(f"regressor {kind!r}: the per-domain base must be a single model, not {base!r}")
        make_regressor(base)  # an unknown base fails here, not at fit time
        return PerDomainRegression(base, seed)
    bases = tuple(b for b in argument.split("+") if b) if argument else None
    for base in bases or ():
        if _split_kind(base)[0] == "stacked":
            raise ConfigError(f"regressor {kind!r}: a stacked model cannot stack another")
        make_regressor(base)
    return StackedRegression(bases, seed)


def fit_regressor(model, x_NxD: np.ndarray, y_N: np.ndarray, parts_NxT: np.ndarray | None = None):
    """model.fit(x, y), passing the target's loss columns to the models that use them. Returns the model."""
    if getattr(model, "uses_parts", False):
        return model.fit(x_NxD, y_N, parts_NxT)
    return model.fit(x_NxD, y_N)


def load_regressor(kind: str, directory: Path, state: dict):
    """The fitted regressor `kind` from the state its `save` returned (files under `directory`)."""
    family, _ = _split_kind(kind)
    if family == "lightgbm":
        return LightGBMRegression.load(directory, state)
    if family in ("linear", "loglinear"):
        return LinearRegression.load(family, state)
    if family == "dml":
        return ExponentialLawRegression.load(state)
    if family == "bimix":
        return PowerLawRegression.load(state)
    if family == "gp":
        return GaussianProcessRegression.load(state)
    if family == "perdomain":
        return PerDomainRegression.load(directory, state)
    if family == "stacked":
        return StackedRegression.load(directory, state)
    raise ConfigError(f"model.json names regressor {kind!r}, which this mixlm cannot load")
