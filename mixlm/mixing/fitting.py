"""Regression from mixture weights to a proxy run's loss: the regressors of `mixlm.mixing.regressors`
(LightGBM, RegMix's model; linear and log-linear; Data Mixing Laws' exponential; a Gaussian process; BiMix-
style; per-domain; stacked), each scored by repeated k-fold Spearman and Pearson correlation on held-out
runs; `choose_model` picks the one `predict` and `optimize` use, never one whose held-out score is
undefined. `save_model` / `load_model` write and read the fit (every kind round-trips).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.regressors import (
    DEFAULT_REGRESSORS,
    REGRESSORS,
    GaussianProcessRegression,
    LightGBMRegression,
    LinearRegression,
    default_regressors,
    fit_regressor,
    load_regressor,
    make_regressor,
)
from mixlm.mixing.stats import mean_std_se, pearson, spearman, undefined_reason
from mixlm.mixing.tables import Table, read_csv, write_csv

__all__ = [  # the regressors are re-exported: callers import them from here as before
    "DEFAULT_REGRESSORS",
    "REGRESSORS",
    "CVScore",
    "FitResult",
    "GaussianProcessRegression",
    "LightGBMRegression",
    "LinearRegression",
    "choose_model",
    "cv_table",
    "default_regressors",
    "fit",
    "join_runs",
    "load_model",
    "make_regressor",
    "parse_target",
    "save_model",
]

@dataclass(frozen=True)
class CVScore:
    """Held-out scores of one regressor over `repeats` x `folds` folds (repeated k-fold, a fresh shuffle per
    repeat). spearman / pearson (with std and standard error `*_se`): the per-fold mean over the folds where
    the correlation is defined (`defined_folds` of them); `undefined`: {reason: folds} for the rest
    ('tied predictions', 'constant targets', 'non-finite predictions'), never folded into the mean as NaN.
    pooled_*: one correlation over all runs of the out-of-fold predictions (averaged over repeats), what
    the scatter plot shows. Undefined scores are NaN (null in model.json)."""

    spearman: float
    spearman_std: float
    pearson: float
    pearson_std: float
    folds: int
    repeats: int = 1
    spearman_se: float = float("nan")
    pearson_se: float = float("nan")
    defined_folds: int | None = None  # None: written before folds were counted, all taken as defined
    undefined: dict[str, int] = field(default_factory=dict)
    pooled_spearman: float = float("nan")
    pooled_pearson: float = float("nan")

    @property
    def total_folds(self) -> int:
        return self.folds * self.repeats

    @property
    def scored_folds(self) -> int:
        return self.total_folds if self.defined_folds is None else self.defined_folds

    @property
    def eligible(self) -> bool:
        """A defined score in at least half of the folds: only such a regressor may be chosen."""
        return math.isfinite(self.spearman) and 2 * (self.total_folds - self.scored_folds) <= self.total_folds

    def undefined_note(self) -> str:
        """'' or e.g. '1 of 15 folds undefined: 1 tied predictions'."""
        missing = self.total_folds - self.scored_folds
        if not missing:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.undefined.items())
        return f"{missing} of {self.total_folds} folds undefined" + (f": {reasons}" if reasons else "")


@dataclass
class FitResult:
    """domains: feature order; target: the loss columns averaged into the target; regressors: fitted
    on all rows; cv: repeated k-fold scores per regressor; actual_N / oof_N: the target and each regressor's
    out-of-fold predictions per run (index_N; the mean over repeats), for the scatter plot; primary: the
    regressor that `predict` and `optimize` use unless told otherwise (see `choose_model`), choice: why;
    warnings: what makes the fit less trustworthy (too few runs, undefined folds)."""

    domains: tuple[str, ...]
    target: tuple[str, ...]
    regressors: dict
    cv: dict[str, CVScore]
    index_N: np.ndarray
    actual_N: np.ndarray
    oof_N: dict[str, np.ndarray] = field(default_factory=dict)
    primary: str = "lightgbm"
    choice: str = ""
    warnings: list[str] = field(default_factory=list)

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

    def predict_std(self, weights_MxD: np.ndarray, regressor: str | None = None) -> np.ndarray | None:
        """The regressor's predictive standard deviation per mixture ([M]; the GP's posterior), or None
        for a regressor without one."""
        kind = regressor or self.primary
        self.predict(weights_MxD[:1] if len(weights_MxD) else weights_MxD, kind)  # same checks as predict
        model = self.regressors[kind]
        if not getattr(model, "has_std", False):
            return None
        return model.predict_std(np.asarray(weights_MxD, dtype=np.float64))


def _format_score(mean: float, se: float) -> str:
    if not math.isfinite(mean):
        return "undefined"
    return f"{mean:.3f} ± {se:.3f}" if math.isfinite(se) else f"{mean:.3f} (one fold, no SE)"


def choose_model(result: FitResult) -> tuple[str, str]:
    """(regressor, reason): the eligible regressor (a defined Spearman in at least half of its folds) with
    the highest per-fold mean Spearman, ties broken by per-fold Pearson, then by order. A regressor whose
    score is undefined in more than half of its folds is never chosen; when none is eligible this raises
    ConfigError saying so."""
    eligible = [k for k, s in result.cv.items() if s.eligible]
    excluded = [
        f"{k} ({s.undefined_note() or 'Spearman undefined'})" for k, s in result.cv.items() if not s.eligible
    ]
    if not eligible:
        raise ConfigError(
            f"no regressor has a defined held-out Spearman in at least half of its folds over "
            f"{len(result.actual_N)} runs: {'; '.join(excluded)}. Run more proxies (see the warnings), "
            f"or use fewer folds (--folds)"
        )
    ranked = sorted(
        eligible,
        key=lambda k: (result.cv[k].spearman, np.nan_to_num(result.cv[k].pearson, nan=-2.0)),
        reverse=True,
    )
    best, score = ranked[0], result.cv[ranked[0]]
    reason = (
        f"{best}: highest per-fold Spearman {_format_score(score.spearman, score.spearman_se)} (SE) over "
        f"{score.scored_folds} folds ({score.folds}-fold x {score.repeats})"
    )
    if score.scored_folds < score.total_folds:
        reason += f"; {score.undefined_note()}"
    if len(ranked) > 1:
        runner = result.cv[ranked[1]]
        reason += f"; next {ranked[1]} {_format_score(runner.spearman, runner.spearman_se)}"
    if excluded:
        reason += f"; not eligible: {', '.join(excluded)}"
    return best, reason


# Rough runs a regressor needs before its held-out score means much: a training fold must hold more rows
# than a linear model has coefficients; LightGBM's trees tie (constant predictions) below ~10 runs a domain.
RUNS_PER_DOMAIN = 2
LIGHTGBM_RUNS_PER_DOMAIN = 10


def runs_needed(kind: str, domains: int, folds: int) -> int:
    """Runs `kind` needs for `domains` weights under k-fold CV (a heuristic, see RUNS_PER_DOMAIN)."""
    if "lightgbm" in kind:  # lightgbm itself, or a per-domain / stacked model built on it
        return LIGHTGBM_RUNS_PER_DOMAIN * domains
    coefficients = domains + (kind == "loglinear")
    return math.ceil((coefficients + 1) * folds / (folds - 1))


def few_runs_warning(runs: int, domains: int, regressors: Sequence[str], folds: int) -> str | None:
    """A warning naming how many more runs to add when `runs` is small for `domains` (fewer than
    RUNS_PER_DOMAIN per domain, or than a regressor needs), else None."""
    needs = {f"{RUNS_PER_DOMAIN} per domain": RUNS_PER_DOMAIN * domains}
    needs.update({kind: runs_needed(kind, domains, folds) for kind in regressors})
    short = {what: n for what, n in needs.items() if runs < n}
    if not short:
        return None
    need = max(short.values())
    parts = ", ".join(f"{what}: {n}" for what, n in short.items())
    return (
        f"only {runs} runs for {domains} domains, fewer than this fit needs ({parts}); run {need - runs} more "
        f"proxies ({need} in all) before trusting the scores or the chosen model"
    )


SMALL_SWEEP_RUNS = 200  # below this, k-fold is repeated (3 shuffles) by default: one split is noisy


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
    index_N, weights_NxD, target_N, _ = join_run_losses(mixtures, results, target)
    return index_N, weights_NxD, target_N


def join_run_losses(
    mixtures: Table, results: Table, target: str | Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """As `join_runs`, plus the target's loss columns per run, [N, T] (their mean is target_N)."""
    target = parse_target(target)
    domains = mixtures.weight_columns()
    if not domains:
        raise ConfigError("the mixtures table has no weight columns (all columns are metric/...)")
    losses_NxT = results.select(target, source="results")
    common = np.intersect1d(mixtures.index_N, results.index_N)
    at_results = {int(i): r for r, i in enumerate(results.index_N)}
    parts_NxT = np.array([losses_NxT[at_results[int(i)]] for i in common]).reshape(len(common), len(target))
    target_N = parts_NxT.mean(axis=1)
    finite = np.isfinite(target_N)
    index_N = common[finite]
    weights_NxD = mixtures.rows(index_N).select(domains)
    return index_N, weights_NxD, target_N[finite], parts_NxT[finite]


def fit(
    mixtures: Table,
    results: Table,
    target: str | Sequence[str],
    *,
    regressors: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    repeats: int | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> FitResult:
    """Fits each regressor on every run and scores it by repeated k-fold cross-validation.

    mixtures: index + one weight column per domain (RegMix's train_mixture CSV, or a sweep table:
        `metric/...` columns are ignored). results: index + loss columns (RegMix's train_pile_loss CSV).
        The tables join on index; runs missing from either, or with a NaN target, are left out.
    target: a loss column, or several ('a,b' or a list) whose mean is the target.
    regressors: the kinds to score (default: `default_regressors(number of target columns)`).
    repeats: shuffles of the k-fold split (default 3 below SMALL_SWEEP_RUNS runs, else 1); the first
        shuffle is the same as with one repeat.
    progress: called as progress(kind, seconds) after each regressor's folds and final fit.
    Returns a FitResult (see there) with the model `choose_model` picks as primary; `save_model` writes it.
    """
    target = parse_target(target)
    if regressors is None:
        regressors = default_regressors(len(target))
    index_N, weights_NxD, target_N, parts_NxT = join_run_losses(mixtures, results, target)
    if folds < 2 or len(target_N) < 2 * folds:
        raise ConfigError(
            f"{len(target_N)} runs with a target cannot be split into {folds} folds (need >= 2 per fold)"
        )
    if not regressors:
        raise ConfigError(f"no regressors chosen; choose from {', '.join(REGRESSORS)}")
    if repeats is None:
        repeats = 3 if len(target_N) < SMALL_SWEEP_RUNS else 1
    if repeats < 1:
        raise ConfigError(f"repeats={repeats}: repeat the k-fold split at least once")
    rng = np.random.default_rng(seed)
    fold_of_RxN = np.empty((repeats, len(target_N)), dtype=np.int64)
    for r in range(repeats):
        for k, rows in enumerate(np.array_split(rng.permutation(len(target_N)), folds)):
            fold_of_RxN[r, rows] = k
    fitted, cv, oof = {}, {}, {}
    for kind in regressors:
        started = time.perf_counter()
        oof_RxN = np.empty((repeats, len(target_N)))
        spearman_F, pearson_F, undefined = [], [], {}
        for r in range(repeats):
            for k in range(folds):
                held = fold_of_RxN[r] == k
                model = fit_regressor(
                    make_regressor(kind, seed), weights_NxD[~held], target_N[~held], parts_NxT[~held]
                )
                oof_RxN[r, held] = model.predict(weights_NxD[held])
                reason = undefined_reason(target_N[held], oof_RxN[r, held])
                if reason:
                    undefined[reason] = undefined.get(reason, 0) + 1
                    continue
                spearman_F.append(spearman(target_N[held], oof_RxN[r, held]))
                pearson_F.append(pearson(target_N[held], oof_RxN[r, held]))
        oof_N = oof_RxN.mean(axis=0)
        spearman_mean, spearman_std, spearman_se = mean_std_se(spearman_F)
        pearson_mean, pearson_std, pearson_se = mean_std_se(pearson_F)
        cv[kind] = CVScore(
            spearman_mean,
            spearman_std,
            pearson_mean,
            pearson_std,
            folds,
            repeats=repeats,
            spearman_se=spearman_se,
            pearson_se=pearson_se,
            defined_folds=len(spearman_F),
            undefined=undefined,
            pooled_spearman=spearman(target_N, oof_N),
            pooled_pearson=pearson(target_N, oof_N),
        )
        oof[kind] = oof_N
        fitted[kind] = fit_regressor(make_regressor(kind, seed), weights_NxD, target_N, parts_NxT)
        if progress is not None:
            progress(kind, time.perf_counter() - started)
    result = FitResult(mixtures.weight_columns(), target, fitted, cv, index_N, target_N, oof)
    few = few_runs_warning(len(target_N), len(result.domains), regressors, folds)
    result.warnings = [few] if few else []
    result.warnings += [f"{kind}: {s.undefined_note()}" for kind, s in cv.items() if s.undefined_note()]
    result.primary, result.choice = choose_model(result)
    return result


def cv_table(result: FitResult) -> str:
    """The held-out scores as a Markdown table, one row per regressor: per-fold mean ± standard error
    (over the folds where the correlation is defined), the pooled correlation over all out-of-fold
    predictions, the folds scored, and which regressor `choose_model` chose."""
    score = next(iter(result.cv.values()))
    header = (
        "| regressor | Spearman per-fold mean ± SE | Pearson per-fold mean ± SE | Spearman pooled "
        f"| Pearson pooled | folds scored ({score.folds}-fold x {score.repeats}) | chosen |"
    )
    lines = [
        header,
        "|---|---|---|---|---|---|---|",
    ]

    def pooled(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else "undefined"

    for kind, score in result.cv.items():
        scored = f"{score.scored_folds} of {score.total_folds}"
        if score.undefined:
            scored += " (" + ", ".join(f"{n} {reason}" for reason, n in score.undefined.items()) + ")"
        lines.append(
            f"| {kind} | {_format_score(score.spearman, score.spearman_se)} | "
            f"{_format_score(score.pearson, score.pearson_se)} | {pooled(score.pooled_spearman)} | "
            f"{pooled(score.pooled_pearson)} | {scored} | {'yes' if kind == result.primary else ''} |"
        )
    return "\n".join(lines)


def _json_safe(value):
    """NaN -> None (strict JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


_CV_FLOATS = (
    "spearman",
    "spearman_std",
    "pearson",
    "pearson_std",
    "spearman_se",
    "pearson_se",
    "pooled_spearman",
    "pooled_pearson",
)


_OWN_FILE_NAMES = ("lightgbm", "linear", "loglinear")  # saved under their own names (lightgbm.txt) since the start


def _save_regressor(kind: str, model, directory: Path) -> dict:
    """model.save's state; every kind but those three writes files named after itself (no clashes)."""
    if kind in _OWN_FILE_NAMES:
        return model.save(directory)
    return model.save(directory, kind.replace(":", "_").replace("+", "_"))


def save_model(result: FitResult, directory: str | Path) -> Path:
    """Writes DIR/model.json (domains, target, primary and the reason it was chosen, warnings, k-fold scores,
    every regressor's state: coefficients, law parameters, the GP's rows and kernel),
    DIR/lightgbm.txt (and DIR/<kind>_*.txt for LightGBM inside other kinds) when fitted and DIR/cv_predictions.csv (out-of-fold predictions). Returns the
    directory. The figure of the fit (DIR/scatter.png) is drawn by `mixlm.mixing.plots.plot_fit`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "domains": list(result.domains),
        "target": list(result.target),
        "primary": result.primary,
        "choice": {"model": result.primary, "reason": result.choice},
        "warnings": list(result.warnings),
        "runs": len(result.actual_N),
        "cv": {kind: _json_safe(dict(vars(score))) for kind, score in result.cv.items()},
        "regressors": {kind: _save_regressor(kind, model, directory) for kind, model in result.regressors.items()},
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
    regressors = {kind: load_regressor(kind, directory, state) for kind, state in meta["regressors"].items()}
    cv = {
        kind: CVScore(**{k: float("nan") if k in _CV_FLOATS and v is None else v for k, v in score.items()})
        for kind, score in meta["cv"].items()
    }
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
        meta.get("choice", {}).get("reason", ""),
        list(meta.get("warnings", [])),
    )
