"""Meta-rater's learned rater weights: proxies trained on selections made with random rater weightings,
a regression from the weighting to the proxy's held-out loss, and the weighting it predicts best.

    raters = ["stop_word_frac", "frac_no_alpha_words", "qurating:high"]   # :high / :low state a direction
    result = learn_rater_weights(
        ["runs/sig"], raters, sample_rater_weightings(parse_raters(raters)[0], 64, seed=0), "runs/metarater",
        budget=2e6, base_config="configs/experiments/proxy.yaml", tokenizer="runs/tok",
        heldout=["data/reference.jsonl"])
    result.weights_yaml          # -> mixlm select pick --weights runs/metarater/weights.yaml ...

For weighting i (index i, from 1) the pool's documents are scored and the best kept up to the budget
(`pick_documents.select_documents` → `selections/<i>/`), prepared as the domain `sel_<i>` under `prepared/`,
and a proxy is trained on that domain alone (`runs/<i>/`). Every proxy's mixture also lists the held-out
domain with weight 0: the trainer evaluates every listed domain, so each proxy is scored on the same
held-out documents (prepared once, all but one document in its validation split). The held-out set
must be disjoint from the pool; it stands for the data the model should be good at.

`results.csv` is RegMix's layout (`index`, one column per rater weight, `metric/<heldout>_val_loss`);
`weightings.csv` holds the same weights alone. The rater weights are a point on a simplex like mixture
weights, so `mixlm.mixing.fit` fits them unchanged (`fit/`); the optimum is the mean of the top-k of
many weightings drawn with `sample_rater_weightings` by predicted loss (`weights.yaml`). Rerunning
resumes: a proxy with a finished run is read back, not retrained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mixlm.errors import ProxyRunsFailedError
from mixlm.selection import SelectionError
from mixlm.selection.pick import sample_rater_weightings

HELDOUT = "heldout"


@dataclass
class MetaRaterResult:
    """weightings: {index: {rater: weight}} that were trained; losses: {index: held-out loss};
    fit: the `mixlm.mixing.FitResult`; best: the optimised {rater: weight}; predicted: its predicted
    loss; out_dir / results_csv / weights_yaml: where everything was written."""

    weightings: dict[int, dict[str, float]]
    losses: dict[int, float]
    fit: object
    best: dict[str, float]
    predicted: float
    out_dir: Path
    results_csv: Path
    weights_yaml: Path


def parse_raters(specs: Sequence[str]) -> tuple[list[str], dict[str, bool]]:
    """['a', 'b:low', 'c:high'] → (['a', 'b', 'c'], {'b': False, 'c': True}): a `:high` / `:low` suffix
    states the rater's direction; without one the signal's own (see `mixlm select list`) is used."""
    names, directions = [], {}
    for spec in specs:
        name, _, direction = str(spec).strip().partition(":")
        if direction:
            if direction not in ("high", "low"):
                raise SelectionError(f"rater {spec!r}: the direction suffix must be :high or :low")
            directions[name] = direction == "high"
        names.append(name)
    return names, directions


def weight_spec(weights: Mapping[str, float], directions: Mapping[str, bool]) -> dict:
    """A weighting in the form `select_documents` / `mixlm select pick --weights` take: `{rater: w}`,
    or `{rater: {weight: w, higher_is_better: d}}` for raters with a stated direction."""
    return {r: ({"weight": float(w), "higher_is_better": bool(directions[r])} if r in directions else float(w))
            for r, w in weights.items()}


def _weighting_table(weightings: Mapping[int, Mapping[str, float]], raters: Sequence[str]):
    from mixlm.mixing.tables import Table

    index = np.array(sorted(weightings), dtype=np.int64)
    values = np.array([[weightings[i][r] for r in raters] for i in index], dtype=np.float64)
    return Table(index, tuple(raters), values.reshape(len(index), len(raters)))


def _write_results(path: Path, weightings: Mapping[int, Mapping[str, float]], raters: Sequence[str],
                   losses: Mapping[int, float], heldout: str) -> None:
    """index, one column per rater weight, metric/<heldout>_val_loss; rows of finished proxies only."""
    from mixlm.mixing.tables import Table, loss_column, write_csv

    done = sorted(i for i in weightings if i in losses)
    table = _weighting_table({i: weightings[i] for i in done}, raters)
    values = np.concatenate([table.values_NxC, np.array([[losses[i]] for i in done]).reshape(len(done), 1)], axis=1)
    write_csv(path, Table(table.index_N, (*raters, loss_column(heldout)), values))


def optimize_rater_weights(model, raters: Sequence[str], *, n_samples: int = 100_000, top_k: int = 128,
                           alpha: float | Sequence[float] = 1.0, seed: int = 0,
                           regressor: str | None = None) -> tuple[dict[str, float], float]:
    """The mean of the `top_k` weightings with the lowest predicted loss among `n_samples` drawn from
    Dirichlet(alpha) (`sample_rater_weightings`), and the model's prediction for that mean."""
    if n_samples < 1 or not 1 <= top_k <= n_samples:
        raise SelectionError(f"need n_samples >= top_k >= 1, got n_samples={n_samples}, top_k={top_k}")
    if tuple(model.domains) != tuple(raters):
        raise SelectionError(f"the fitted model's features {list(model.domains)} are not the raters {list(raters)}")
    draws = sample_rater_weightings(list(raters), n_samples, seed, alpha)
    weights_MxK = np.array([[w[r] for r in raters] for w in draws])
    predicted_M = model.predict(weights_MxK, regressor)
    best_K = weights_MxK[np.argsort(predicted_M, kind="stable")[:top_k]].mean(axis=0)
    best_K /= best_K.sum()
    return {r: float(w) for r, w in zip(raters, best_K)}, float(model.predict(best_K[None, :], regressor)[0])


def learn_rater_weights(
    signal_dirs: Sequence[str | Path],
    raters: Sequence[str],
    weightings: Sequence[Mapping[str, float]] | Mapping[int, Mapping[str, float]],
    out_dir: str | Path,
    *,
    budget: float,
    base_config: str | Path,
    tokenizer: str,
    heldout: Sequence[str],
    heldout_name: str = HELDOUT,
    budget_unit: str = "tokens",
    overrides: Sequence[str] = (),
    regressors: Sequence[str] = ("loglinear", "linear", "lightgbm"),
    folds: int = 5,
    n_samples: int = 100_000,
    top_k: int = 128,
    alpha: float | Sequence[float] = 1.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> MetaRaterResult:
    """Selects, prepares and trains one proxy per weighting, then fits and optimises (module docstring).

    signal_dirs: `mixlm select signals` folders of the pool (with `num_tokens` for a token budget).
    raters: signal names, each optionally suffixed `:high` / `:low` to state its direction.
    weightings: [{rater: weight}] (indexed from 1) or {index: {rater: weight}}, e.g. from
        `sample_rater_weightings`. base_config: the proxy's experiment YAML (its model vocab must cover
        `tokenizer`); data.prepared_dir, data.mixture and train.output_dir are set per proxy, and
        `overrides` (section.key=value) apply to every proxy. heldout: document files (jsonl[.gz|.zst])
        disjoint from the pool, prepared once as the domain `heldout_name`.
    regressors / folds: as `mixlm.mixing.fit` (folds is lowered to len(weightings) // 2 when needed);
    the optimiser uses the regressor with the best k-fold Spearman. n_samples / top_k / alpha / seed:
    the weightings simulated by the optimiser.
    """
    from mixlm.data.prepare import PrepareOptions, prepare_domains
    from mixlm.mixing import fit as fit_regression
    from mixlm.mixing import save_model
    from mixlm.mixing.fitting import choose_model
    from mixlm.mixing.plots import plot_fit
    from mixlm.mixing.tables import loss_column, write_csv
    from mixlm.proxies import ProxyRun, plan_proxy, run_proxies
    from mixlm.run_config import load_run_config
    from mixlm.run_dir import RunDir
    from mixlm.selection.pick_documents import select_documents

    names, directions = parse_raters(raters)
    if not names or len(set(names)) != len(names):
        raise SelectionError(f"raters must be distinct signal names, got {list(raters)}")
    weightings = dict(weightings) if isinstance(weightings, Mapping) else \
        {i + 1: dict(w) for i, w in enumerate(weightings)}
    for i, w in weightings.items():
        if set(w) != set(names):
            raise SelectionError(f"weighting {i} has raters {sorted(w)}; expected {sorted(names)}")
    if len(weightings) < 4:
        raise SelectionError(f"{len(weightings)} weightings: need at least 4 to fit and score a regression")
    if not heldout:
        raise SelectionError("a held-out document set is needed: every proxy is scored on it")
    if heldout_name.startswith("sel_"):
        raise SelectionError(f"heldout_name {heldout_name!r} clashes with the selections' sel_<i> domains")
    out = Path(out_dir)
    prepared = out / "prepared"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "weightings.csv", _weighting_table(weightings, names))
    base_cfg = load_run_config(str(base_config), list(overrides))  # a bad base config fails before any work
    if base_cfg.eval.batches < 1:
        raise SelectionError("the proxy config has eval.batches 0: the held-out loss needs at least 1")
    tokenizer = str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer

    # The held-out domain: all but one document go to its validation split (a train split must exist).
    prepare_domains({heldout_name: [str(Path(p).resolve()) for p in heldout]}, prepared,
                    PrepareOptions(tokenizer=tokenizer, validation_fraction=1.0, progress=False))

    key = f"val_loss/{heldout_name}"
    proxies, sizes = [], {}
    for index, weights in sorted(weightings.items()):
        run_dir = out / "runs" / f"{index:04d}"
        domain = f"sel_{index:04d}"
        if RunDir(run_dir).result() is None:  # to train: its selection, prepared as its own domain
            selection = out / "selections" / f"{index:04d}"
            report = select_documents(signal_dirs, weight_spec(weights, directions), selection, budget=budget,
                                      budget_unit=budget_unit)
            if report["documents_out"] < 2:
                raise SelectionError(f"weighting {index} selected {report['documents_out']} documents within the "
                                     f"budget {budget:g} {budget_unit}; raise the budget")
            prepare_domains({domain: [str((selection / "documents.jsonl.zst").resolve())]}, prepared,
                            PrepareOptions(tokenizer=tokenizer, overwrite=True, progress=False))
            sizes[index] = f"{report['documents_out']} documents, {report[budget_unit + '_out']} {budget_unit}"
        cfg = load_run_config(str(base_config), [
            *overrides, f"data.prepared_dir={prepared.resolve()}",
            f"data.mixture={json.dumps({domain: 1.0, heldout_name: 0.0})}", f"train.output_dir={run_dir}",
            "logging.progress=false", "checkpoint.save_at_end=false", "checkpoint.every=0"])
        proxies.append(plan_proxy(index, weights, cfg))

    def describe(run: ProxyRun, result: dict, took: str) -> str:
        size = f" ({sizes[run.index]})" if run.index in sizes else ""
        return f"proxy {run.index}{size} held-out loss {result['eval'][key]:.4f}"

    for run in proxies:
        if run.result() is not None:
            log(f"metarater: proxy {run.index} already trained, held-out loss {run.result()['eval'][key]:.4f}")
    outcome = run_proxies(proxies, parallel=0, log=log, label="metarater", describe=describe)
    losses = {i: float(r["eval"][key]) for i, r in outcome.results.items() if r["status"] == "finished"}
    _write_results(out / "results.csv", weightings, names, losses, heldout_name)
    if outcome.stopped or outcome.failed:
        why = outcome.stopped or "; ".join(f"proxy {i}: {w}" for i, w in sorted(outcome.failed.items()))
        raise ProxyRunsFailedError(f"metarater: not every proxy finished ({why}); rerun the same command to "
                                   "train the missing ones")

    from mixlm.mixing.tables import read_csv

    finite = [i for i in losses if math.isfinite(losses[i])]
    folds = max(2, min(folds, len(finite) // 2))
    result = fit_regression(read_csv(out / "weightings.csv"), read_csv(out / "results.csv"),
                            loss_column(heldout_name), regressors=tuple(regressors), folds=folds, seed=seed)
    result.primary, result.choice = choose_model(result)  # never one whose held-out score is undefined
    save_model(result, out / "fit")
    plot_fit(result, out / "fit" / "scatter.png")
    best, predicted = optimize_rater_weights(result, names, n_samples=n_samples, top_k=min(top_k, n_samples),
                                             alpha=alpha, seed=seed)
    weights_yaml = out / "weights.yaml"
    observed = min(losses.values())
    weights_yaml.write_text(
        f"# Meta-rater weights learned from {len(losses)} proxies ({result.primary} regression, "
        f"{folds}-fold Spearman {result.cv[result.primary].spearman:.3f});\n"
        f"# predicted {loss_column(heldout_name)} {predicted:.4f} (best proxy {observed:.4f}).\n"
        f"# Use: mixlm select pick --signals ... --weights {weights_yaml} --budget ...\n"
        + yaml.safe_dump(weight_spec({r: round(w, 6) for r, w in best.items()}, directions), sort_keys=False))
    shown = ", ".join(f"{r}: {w:.4g}" if w >= 1e-6 else f"{r}: 0" for r, w in best.items())  # no 1e-37
    log(f"metarater: {result.primary} fit, {folds}-fold Spearman {result.cv[result.primary].spearman:.3f}; "
        f"weights {{{shown}}} (predicted {predicted:.4f}) → {weights_yaml}")
    return MetaRaterResult(weightings, losses, result, best, predicted, out, out / "results.csv", weights_yaml)
