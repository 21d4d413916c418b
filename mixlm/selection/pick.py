"""From signal columns to a chosen set of documents: percentiles, weights, budgeted top-k, random baseline.

* `percentile_ranks(values, higher_is_better)` — the mid-rank percentile of each document in (0, 1):
  (number of worse documents + half the number of equal ones) / n. NaN counts as worse than any number.
* `parse_weights(spec, available)` — a weighting `{signal: weight}` or
  `{signal: {weight: w, higher_is_better: bool}}` (the direction defaults to the signal's own, see
  `signals.SIGNALS`; columns from the input or a classifier default to higher-is-better).
* `combine_scores(columns, weights)` — sum_i w_i * percentile_i / sum_i w_i, in [0, 1].
* `select_top(scores, sizes, budget=... | top_fraction=...)` (`top_parts`: the documents that fit outright and
  the greedy fill after them) and `select_random(sizes, budget, seed)`.
* `importance_resample(log_weights, sizes, budget=..., seed=...)` — DSIR's resampling (Gumbel top-k).
* `sample_rater_weightings(signals, n, seed, alpha)` — Meta-rater's Dirichlet weightings over raters.
* `summarize`, `size_column_of`, `selection_report` and the report's other parts — shared by the two ways of
  running a selection over signal tables (`pick_documents.select_documents`: whole columns in this process, or
  `distributed_pick` on an engine's workers), so both write the same report.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixlm.selection import SelectionError
from mixlm.selection.signals import DIRECTIONS

# Directions of the rule-based signals, plus model perplexity (selection/perplexity.py); any other
# column (model ratings, classifier scores) defaults to higher-is-better.
DEFAULT_DIRECTIONS: dict[str, bool | None] = {**DIRECTIONS, "perplexity": False}


@dataclass(frozen=True)
class SignalWeight:
    signal: str
    weight: float
    higher_is_better: bool


def rank_key(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """float64 [n] -> the key percentiles rank by: better is larger, NaN is -inf (below every number)."""
    key = values if higher_is_better else -values
    return np.where(np.isnan(key), -np.inf, key)


def percentile_ranks(values: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """float64 [n] → float64 [n] mid-rank percentiles in (0, 1); the best document is nearest 1.

    [1, 2, 2, 4] → [0.125, 0.5, 0.5, 0.875]; lower-is-better gives 1 minus those. NaNs tie with each
    other below every number, in either direction.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return np.zeros(0)
    _, inverse, counts = np.unique(rank_key(values, higher_is_better), return_inverse=True, return_counts=True)
    worse = np.cumsum(counts) - counts
    return (worse[inverse] + 0.5 * counts[inverse]) / n


def _closest(name: str, available: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else f"; available: {', '.join(sorted(available))}"


def parse_weights(spec: Mapping, available: Sequence[str],
                  directions: Mapping[str, bool | None] = DEFAULT_DIRECTIONS) -> list[SignalWeight]:
    """Validate a weighting against the signal columns `available`; returns one entry per signal.

    Errors name the signal and, for an unknown one, the closest available names.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise SelectionError(f"weights must be a non-empty mapping {{signal: weight}}, got {spec!r}")
    out = []
    for name, value in spec.items():
        if name not in available:
            raise SelectionError(f"weights: unknown signal {name!r}{_closest(str(name), available)}")
        direction = directions.get(name, True)
        if isinstance(value, Mapping):
            extra = set(value) - {"weight", "higher_is_better"}
            if extra or "weight" not in value:
                raise SelectionError(f"weights: {name}: expected {{weight: w, higher_is_better: true|false}}, "
                                     f"got {dict(value)!r}")
            direction = value.get("higher_is_better", direction)
            value = value["weight"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SelectionError(f"weights: {name}: weight must be a finite number >= 0, got {value!r} "
                                 "(to prefer low values set higher_is_better: false)")
        if direction is None:
            raise SelectionError(f"weights: {name} has no natural direction; write "
                                 f"{name}: {{weight: {value}, higher_is_better: true}} (or false)")
        if not isinstance(direction, bool):
            raise SelectionError(f"weights: {name}: higher_is_better must be true or false, got {direction!r}")
        out.append(SignalWeight(str(name), float(value), direction))
    if sum(w.weight for w in out) <= 0:
        raise SelectionError("weights: all weights are 0; give at least one signal a positive weight")
    return out


def combine_scores(columns: Mapping[str, np.ndarray], weights: Sequence[SignalWeight]) -> np.ndarray:
    """float64 [n]: sum_i w_i * percentile_ranks(columns[s_i], direction_i) / sum_i w_i."""
    total = sum(w.weight for w in weights)
    score = None
    for w in weights:
        part = w.weight / total * percentile_ranks(columns[w.signal], w.higher_is_better)
        score = part if score is None else score + part
    return score


def top_parts(scores: np.ndarray, sizes: np.ndarray, *, budget: float | None = None,
              top_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(top, fill): indices of the best documents by `scores` (ties: the earlier index wins), in score order.

    `budget`: `top` is the longest run of best documents whose sizes fit the budget outright; then a greedy
    fill goes on in score order, taking each document that still fits what is left of the budget (`fill`),
    so sum(sizes[top]) + sum(sizes[fill]) <= budget always. `top_fraction`: `top` is the best
    floor(top_fraction * n) documents, `fill` is empty. Documents of size 0 are never chosen (they would add
    nothing to train on). Give exactly one of `budget` and `top_fraction`.
    """
    scores, sizes = np.asarray(scores, np.float64), np.asarray(sizes, np.int64)
    if (budget is None) == (top_fraction is None):
        raise SelectionError("give exactly one of a token budget and a top fraction")
    order = np.lexsort((np.arange(scores.size), -scores))
    order = order[sizes[order] > 0]
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise SelectionError(f"top fraction must be in (0, 1], got {top_fraction}")
        return order[: math.floor(top_fraction * scores.size + 1e-9)], np.zeros(0, np.int64)
    if budget < 0:
        raise SelectionError(f"budget must be >= 0, got {budget}")
    ordered = sizes[order]
    # The prefix that fits outright, then a greedy pass over the rest while anything can still fit.
    prefix = int(np.searchsorted(np.cumsum(ordered), budget, side="right"))
    fill = []
    left = budget - int(ordered[:prefix].sum())
    tail_min = np.minimum.accumulate(ordered[::-1])[::-1] if ordered.size else ordered
    for i in range(prefix, order.size):
        if left < tail_min[i]:
            break
        if ordered[i] <= left:
            fill.append(order[i])
            left -= int(ordered[i])
    return order[:prefix], np.asarray(fill, dtype=np.int64)


def select_top(scores: np.ndarray, sizes: np.ndarray, *, budget: float | None = None,
               top_fraction: float | None = None) -> np.ndarray:
    """Indices (ascending) of the best documents by `scores`: both parts of `top_parts` (the best documents
    that fit the budget outright and the greedy fill after them)."""
    top, fill = top_parts(scores, sizes, budget=budget, top_fraction=top_fraction)
    return np.sort(np.concatenate([top, fill]).astype(np.int64))


def select_random(sizes: np.ndarray, budget: float, seed: int) -> np.ndarray:
    """Indices (ascending) of a seeded random selection of documents up to `budget`.

    Documents (size > 0) are taken in a random order until the next one would overflow the budget,
    so the total is within one document of the budget and never above it.
    """
    sizes = np.asarray(sizes, np.int64)
    eligible = np.flatnonzero(sizes > 0)
    order = np.random.default_rng(seed).permutation(eligible)
    take = int(np.searchsorted(np.cumsum(sizes[order]), budget, side="right"))
    return np.sort(order[:take])


def importance_resample(log_weights: np.ndarray, sizes: np.ndarray, *, budget: float | None = None,
                        top_fraction: float | None = None, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of a seeded sample without replacement, proportional to exp(log_weights) (DSIR's
    importance resampling), to a `budget` or a `top_fraction` of the documents.

    Gumbel top-k: each document's key is its log weight plus standard Gumbel noise; the documents in
    descending key order are a draw without replacement with probabilities proportional to the weights
    (Vieira 2014), then filled greedily to the budget as `select_top` does. NaN weights are never chosen.
    """
    log_weights = np.asarray(log_weights, np.float64)
    noise = np.random.default_rng(seed).gumbel(size=log_weights.size)
    keys = np.where(np.isnan(log_weights), -np.inf, log_weights + noise)
    sizes = np.where(np.isnan(log_weights), 0, np.asarray(sizes, np.int64))
    return select_top(keys, sizes, budget=budget, top_fraction=top_fraction)


def sample_rater_weightings(signals: Sequence[str], n: int, seed: int,
                            alpha: float | Sequence[float] = 1.0) -> list[dict[str, float]]:
    """`n` weightings {signal: weight} (weights sum to 1) drawn from Dirichlet(alpha) over `signals`.

    `alpha` is one concentration for every rater or one per rater. Same seed, same weightings.
    """
    signals = list(signals)
    if not signals or len(set(signals)) != len(signals):
        raise SelectionError(f"rater weightings need distinct signal names, got {signals}")
    if n < 1:
        raise SelectionError(f"number of weightings must be >= 1, got {n}")
    alphas = np.broadcast_to(np.asarray(alpha, np.float64), (len(signals),)) if np.ndim(alpha) == 0 \
        else np.asarray(alpha, np.float64)
    if alphas.shape != (len(signals),) or not np.all(alphas > 0):
        raise SelectionError(f"alpha must be > 0, one value or one per signal ({len(signals)}), got {alpha}")
    draws_NxK = np.random.default_rng(seed).dirichlet(alphas, size=n)
    return [{s: float(w) for s, w in zip(signals, row)} for row in draws_NxK]


def summarize(columns: Mapping[str, np.ndarray], chosen: np.ndarray) -> dict[str, dict]:
    """Per signal: mean, 10th / 50th / 90th percentile over all documents and over `chosen` (NaN ignored)."""

    def stats(values: np.ndarray) -> dict[str, float | None]:
        values = values[~np.isnan(values)]
        if values.size == 0:
            return {"mean": None, "p10": None, "p50": None, "p90": None}
        p10, p50, p90 = np.percentile(values, [10, 50, 90])
        return {"mean": float(values.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}

    return {
        name: {"all": stats(np.asarray(v, np.float64)), "selected": stats(np.asarray(v, np.float64)[chosen])}
        for name, v in columns.items()
    }


BUDGET_COLUMNS = {"tokens": "num_tokens", "words": "word_count", "chars": "num_chars"}


SELECTION_MODES = ("top", "dsir-resample")


SOURCE_FIELD = "source_file"  # added to each selected document without it: the input file it came from


def size_column_of(columns: Sequence[str], budget_unit: str | None, top_fraction: float | None
                   ) -> tuple[str, str]:
    """(budget unit, the signal column holding each document's size in it); errors say what to compute."""
    if budget_unit is None:
        # A top fraction counts documents; its unit only feeds the report.
        budget_unit = "tokens" if "num_tokens" in columns or top_fraction is None else "chars"
    if budget_unit not in BUDGET_COLUMNS:
        raise SelectionError(f"budget unit {budget_unit!r}: use one of {sorted(BUDGET_COLUMNS)}")
    size_column = BUDGET_COLUMNS[budget_unit]
    if size_column not in columns:
        hint = "pass --tokenizer to `mixlm select signals`" if budget_unit == "tokens" else \
            "compute the rule signals (drop --no-rules)"
        raise SelectionError(f"budget unit {budget_unit!r} needs column {size_column!r}, which the signal "
                             f"tables lack: {hint}, or choose another --budget-unit")
    return budget_unit, size_column


def check_resample_signal(resample_signal: str | None, columns: Sequence[str]) -> None:
    if resample_signal not in columns:
        raise SelectionError(f"--signal {resample_signal!r}: not a column of the signal tables"
                             f"{_closest(str(resample_signal), columns)}")


def top_method(parsed: Sequence[SignalWeight], threshold: float | None, top_documents: int, budget_unit: str,
               fill_documents: int, fill_units: int, fill_min: float | None, fill_max: float | None) -> dict:
    """The report's account of a top selection."""
    return {"method": "top", "weights": [asdict(w) for w in parsed],
            # the real cutoff: the greedy fill may add small documents of any lower score after it
            "score_threshold": threshold, "top_documents": top_documents,
            "fill": {"documents": fill_documents, budget_unit: fill_units, "score_min": fill_min,
                     "score_max": fill_max}}


def resample_method(resample_signal: str, seed: int) -> dict:
    return {"method": "dsir-resample", "signal": resample_signal, "seed": seed, "score_threshold": None}


def selection_report(extra: dict, signal_dirs: Sequence[str | Path], budget_unit: str, documents_in: int,
                     documents_out: int, units_in: int, units_out: int, mix_field: str | None,
                     mix: dict[str, dict], signals: dict) -> dict:
    """A selection's report.json, whichever way it was computed."""
    return {
        **extra,
        "signal_dirs": [str(d) for d in signal_dirs],
        "budget_unit": budget_unit,
        "documents_in": documents_in,
        "documents_out": documents_out,
        f"{budget_unit}_in": units_in,
        f"{budget_unit}_out": units_out,
        "malformed_input_lines": _malformed_lines(signal_dirs),
        "output": "documents.jsonl.zst",
        "mix": {"field": mix_field, "groups": dict(sorted(mix.items(), key=lambda kv: -kv[1][budget_unit]))},
        "signals": signals,
    }


def add_random_baseline(report: dict, random_out: str | Path, baseline: dict, budget_unit: str) -> None:
    report["random_baseline"] = {"out": str(random_out), "documents_out": baseline["documents_out"],
                                 f"{budget_unit}_out": baseline[f"{budget_unit}_out"], "mix": baseline["mix"]}


def _malformed_lines(signal_dirs: Sequence[str | Path]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in signal_dirs:
        path = Path(d) / "signals_report.json"
        if path.is_file():
            out[str(d)] = json.loads(path.read_text())["malformed_lines"]
    return out


def plot_selection(columns: Mapping[str, np.ndarray], names: Sequence[str], chosen: np.ndarray,
                   random_chosen: np.ndarray | None, path: str | Path) -> None:
    """One histogram per signal in `names`: all documents, the top selection and the random baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = np.asarray(columns[name], np.float64)
        finite = values[np.isfinite(values)]
        bins = np.histogram_bin_edges(finite, bins=30) if finite.size else 10
        groups = [("all", np.ones(values.size, bool)), ("top", np.isin(np.arange(values.size), chosen))]
        if random_chosen is not None:
            groups.append(("random", np.isin(np.arange(values.size), random_chosen)))
        for label, mask in groups:
            v = values[mask & np.isfinite(values)]
            if v.size:
                ax.hist(v, bins=bins, density=True, histtype="step", label=f"{label} ({mask.sum()})")
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
