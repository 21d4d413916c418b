"""Regression from mixture weights to a proxy run's loss: LightGBM (RegMix's model) and two linear
baselines, scored by k-fold Spearman and Pearson correlation on held-out runs.

Regressors:
  lightgbm   gbdt, 1000 rounds, learning rate 1e-2, early stopping (3 rounds) on a validation split
             of the training rows: RegMix's settings (sail-sg/regmix regression_fitting).
  linear     loss = sum_d c_d * w_d (the weights sum to 1, so this already has an intercept).
  loglinear  loss = b + sum_d c_d * log(w_d + eps): diminishing returns per domain (eps picked
             from a small grid by training error).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixlm.config import ConfigError
from mixlm.mixing.stats import pearson, spearman
from mixlm.mixing.tables import Table, read_csv, write_csv

REGRESSORS = ("lightgbm", "linear", "loglinear")


class LightGBMRegression:
    """RegMix's LightGBM regressor. One thread by default: with a few hundred rows, threads only
    add overhead (and the CPU is shared)."""

    kind = "lightgbm"

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

    def save(self, directory: Path) -> dict:
        self.booster.save_model(str(directory / "lightgbm.txt"))
        return {"file": "lightgbm.txt", "best_iteration": int(self.booster.best_iteration or 0)}

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

    def save(self, directory: Path) -> dict:
        return {"eps": self.eps, "coef": self.coef_F.tolist()}

    @classmethod
    def load(cls, kind: str, state: dict) -> LinearRegression:
        model = cls(kind, state["eps"])
        model.coef_F = np.asarray(state["coef"], dtype=np.float64)
        return model


def make_regressor(kind: str, seed: int = 0):
    """A fresh, unfitted regressor of the given kind (one of REGRESSORS)."""
    if kind == "lightgbm":
        return LightGBMRegression(seed=seed)
    if kind in ("linear", "loglinear"):
        return LinearRegression(kind)
    raise ConfigError(f"unknown regressor {kind!r}; choose from {', '.join(REGRESSORS)}")


@dataclass(frozen=True)
class CVScore:
    """Mean and standard deviation over the k held-out folds."""

    spearman: float
    spearman_std: float
    pearson: float
    pearson_std: float
    folds: int


@dataclass
class FitResult:
    """domains: feature order; target: the loss columns averaged into the target; regressors: fitted
    on all rows; cv: k-fold scores per regressor; actual_N / oof_N: the target and each regressor's
    out-of-fold predictions per run (index_N), for the scatter plot; primary: the regressor that
    `predict` and `optimize` use unless told otherwise."""

    domains: tuple[str, ...]
    target: tuple[str, ...]
    regressors: dict
    cv: dict[str, CVScore]
    index_N: np.ndarray
    actual_N: np.ndarray
    oof_N: dict[str, np.ndarray] = field(default_factory=dict)
    primary: str = "lightgbm"

    @property
    def target_label(self) -> str:
        return self.target[0] if len(self.target) == 1 else f"mean({', '.join(self.target)})"

    def predict(self, weights_MxD: np.ndarray, regressor: str | None = None) -> np.ndarray:
        """Predicted target for mixtures given as [M, D] in `domains` order."""
        kind = regressor or self.primary
        if kind not in self.regressors:
            raise ConfigError(f"regressor {kind!r} was not fitted; this model has {sorted(self.regressors)}")
        weights_MxD = np.asarray(weights_MxD, dtype=np.float64)
        if weights_MxD.ndim != 2 or weights_MxD.shape[1] != len(self.domains):
            raise ConfigError(f"mixtures have shape {weights_MxD.shape}; expected [M, {len(self.domains)}]")
        return self.regressors[kind].predict(weights_MxD)


def parse_target(target: str | Sequence[str]) -> tuple[str, ...]:
    """'a' -> ('a',); 'a,b' or ['a', 'b'] -> ('a', 'b') (the target is their mean)."""
    names = target.split(",") if isinstance(target, str) else list(target)
    names = tuple(n.strip() for n in names if n.strip())
    if not names:
        raise ConfigError("target is empty: name one loss column, or several separated by commas")
    return names


def join_runs(
    mixtures: Table, results: Table, target: str | Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs present in both tables with a finite target: (index_N, weights_NxD, target_N), the
    weights in `mixtures.weight_columns()` order and the target the mean of its columns."""
    target = parse_target(target)
    domains = mixtures.weight_columns()
    if not domains:
        raise ConfigError("the mixtures table has no weight columns (all columns are metric/...)")
    losses_NxT = results.select(target, source="results")
    common = np.intersect1d(mixtures.index_N, results.index_N)
    at_results = {int(i): r for r, i in enumerate(results.index_N)}
    target_N = np.array([losses_NxT[at_results[int(i)]].mean() for i in common])
    finite = np.isfinite(target_N)
    index_N = common[finite]
    weights_NxD = mixtures.rows(index_N).select(domains)
    return index_N, weights_NxD, target_N[finite]


def fit(
    mixtures: Table,
    results: Table,
    target: str | Sequence[str],
    *,
    regressors: Sequence[str] = REGRESSORS,
    folds: int = 5,
    seed: int = 0,
) -> FitResult:
    """Fits each regressor on every run and scores it by k-fold cross-validation.

    mixtures: index + one weight column per domain (RegMix's train_mixture CSV, or a sweep table:
        `metric/...` columns are ignored). results: index + loss columns (RegMix's train_pile_loss CSV).
        The tables join on index; runs missing from either, or with a NaN target, are left out.
    target: a loss column, or several ('a,b' or a list) whose mean is the target.
    Returns a FitResult (see there); `save_model` writes it to a directory.
    """
    target = parse_target(target)
    index_N, weights_NxD, target_N = join_runs(mixtures, results, target)
    if folds < 2 or len(target_N) < 2 * folds:
        raise ConfigError(
            f"{len(target_N)} runs with a target cannot be split into {folds} folds (need >= 2 per fold)"
        )
    if not regressors:
        raise ConfigError(f"no regressors chosen; choose from {', '.join(REGRESSORS)}")
    fold_of_N = np.empty(len(target_N), dtype=np.int64)
    for k, rows in enumerate(np.array_split(np.random.default_rng(seed).permutation(len(target_N)), folds)):
        fold_of_N[rows] = k
    fitted, cv, oof = {}, {}, {}
    for kind in regressors:
        oof_N = np.empty_like(target_N)
        spearman_K, pearson_K = [], []
        for k in range(folds):
            held = fold_of_N == k
            model = make_regressor(kind, seed).fit(weights_NxD[~held], target_N[~held])
            oof_N[held] = model.predict(weights_NxD[held])
            spearman_K.append(spearman(target_N[held], oof_N[held]))
            pearson_K.append(pearson(target_N[held], oof_N[held]))
        cv[kind] = CVScore(
            float(np.mean(spearman_K)),
            float(np.std(spearman_K)),
            float(np.mean(pearson_K)),
            float(np.std(pearson_K)),
            folds,
        )
        oof[kind] = oof_N
        fitted[kind] = make_regressor(kind, seed).fit(weights_NxD, target_N)
    primary = "lightgbm" if "lightgbm" in fitted else regressors[0]
    return FitResult(mixtures.weight_columns(), target, fitted, cv, index_N, target_N, oof, primary)


def cv_table(result: FitResult) -> str:
    """The k-fold scores as a Markdown table, one row per regressor."""
    lines = [
        f"| regressor | Spearman ({result.cv[result.primary].folds}-fold) | Pearson |",
        "|---|---|---|",
    ]
    for kind, score in result.cv.items():
        lines.append(
            f"| {kind} | {score.spearman:.4f} ± {score.spearman_std:.4f} | "
            f"{score.pearson:.4f} ± {score.pearson_std:.4f} |"
        )
    return "\n".join(lines)


def save_model(result: FitResult, directory: str | Path) -> Path:
    """Writes DIR/model.json (domains, target, primary, k-fold scores, linear coefficients),
    DIR/lightgbm.txt when fitted and DIR/cv_predictions.csv (out-of-fold predictions). Returns the
    directory. The figure of the fit (DIR/scatter.png) is drawn by `mixlm.mixing.plots.plot_fit`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "domains": list(result.domains),
        "target": list(result.target),
        "primary": result.primary,
        "runs": len(result.actual_N),
        "cv": {kind: vars(score) for kind, score in result.cv.items()},
        "regressors": {kind: model.save(directory) for kind, model in result.regressors.items()},
    }
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    kinds = list(result.oof_N)
    write_csv(
        directory / "cv_predictions.csv",
        Table(
            result.index_N,
            ("actual", *kinds),
            np.stack([result.actual_N, *(result.oof_N[k] for k in kinds)], axis=1),
        ),
    )
    return directory


def load_model(directory: str | Path) -> FitResult:
    """A FitResult from a directory written by `save_model` (out-of-fold predictions included)."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise ConfigError(f"{directory}: no model.json; write one with `mixlm mix fit --out {directory}`")
    meta = json.loads(meta_path.read_text())
    regressors = {}
    for kind, state in meta["regressors"].items():
        regressors[kind] = (
            LightGBMRegression.load(directory, state)
            if kind == "lightgbm"
            else LinearRegression.load(kind, state)
        )
    cv = {kind: CVScore(**score) for kind, score in meta["cv"].items()}
    index_N, actual_N, oof_N = np.zeros(0, np.int64), np.zeros(0), {}
    if (directory / "cv_predictions.csv").is_file():
        table = read_csv(directory / "cv_predictions.csv")
        index_N, actual_N = table.index_N, table.select(["actual"])[:, 0]
        oof_N = {c: table.select([c])[:, 0] for c in table.columns if c != "actual"}
    return FitResult(
        tuple(meta["domains"]),
        tuple(meta["target"]),
        regressors,
        cv,
        index_N,
        actual_N,
        oof_N,
        meta["primary"],
    )
