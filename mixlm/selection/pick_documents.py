"""Scores the documents of signal folders and writes the chosen ones: whole columns in this process (the pure
functions of `pick`), or on the engine's workers via `distributed_pick`, which writes the same bytes.

* `select_documents(signal_dirs, weights, out_dir, ...)` — `pick`'s selection over signal tables, writing the
  chosen documents (and the random baseline) with a report; on a Ray engine the same computation runs in the
  engine's tasks without whole columns on the driver (`distributed_pick.select_on_workers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.selection import SelectionError
from mixlm.selection.distributed_pick import select_on_workers
from mixlm.selection.documents import write_selected
from mixlm.selection.pick import (
    SELECTION_MODES,
    SOURCE_FIELD,
    add_random_baseline,
    check_resample_signal,
    combine_scores,
    importance_resample,
    parse_weights,
    plot_selection,
    resample_method,
    select_random,
    selection_report,
    size_column_of,
    summarize,
    top_method,
    top_parts,
)
from mixlm.selection.signal_tables import load_tables


def select_documents(signal_dirs: Sequence[str | Path], weights: Mapping | None, out_dir: str | Path, *,
                     budget: float | None = None, top_fraction: float | None = None,
                     budget_unit: str | None = None, random_out: str | Path | None = None, seed: int = 0,
                     plot: bool = False, mode: str = "top", resample_signal: str | None = None,
                     mix_field: str | None = "domain", engine=None, distributed: bool | None = None) -> dict:
    """Score the documents of `signal_dirs` with `weights`, keep the best, write them out.

    mode "dsir-resample" instead samples without replacement proportional to exp(`resample_signal`), a log
    importance weight column such as `dsir_books` (`importance_resample`, seeded by `seed`); `weights` is
    then unused.

    `budget_unit` (tokens | words | chars) picks the size column; by default tokens, or chars for a
    `top_fraction` when the tables have no token counts. Writes `out_dir/documents.jsonl.zst` (the
    chosen input lines, verbatim but for a `source_file` field naming the input file, added where a line
    has none; parquet rows as JSON) and `out_dir/report.json` (documents and budget units in / out, weights,
    `score_threshold`: the lowest score of the best documents that fit the budget outright, `fill`: what the
    greedy fill after them added (documents, units, their scores), `mix`: documents and units per value of
    `mix_field` (dotted; an input file's name for documents without it), per-signal summaries over all and
    chosen documents, malformed input lines); with `random_out`, the seeded random baseline with the same
    budget (the budget, or the units the top selection took when it was a `top_fraction`) in the same
    layout. Returns the report. `engine` (mixlm.engine; default this process) reads the signal tables and writes
    the chosen documents, a task per file. `distributed` (default: when the engine is Ray, and no `plot`) keeps
    every per-document column in the engine's tasks (`distributed_pick`), with the same output bytes.
    """
    if mode not in SELECTION_MODES:
        raise SelectionError(f"selection mode {mode!r}: use one of {SELECTION_MODES}")
    if mode == "top" and weights is None:
        raise SelectionError("mode 'top' needs --weights")
    if distributed is None:
        distributed = getattr(engine, "name", "local") == "ray" and not plot
    if distributed:
        if plot:
            raise SelectionError("the plot needs whole columns: pick without distributing to plot")
        return select_on_workers(signal_dirs, weights, out_dir, budget=budget, top_fraction=top_fraction,
                                 budget_unit=budget_unit, random_out=random_out, seed=seed, mode=mode,
                                 resample_signal=resample_signal, mix_field=mix_field, engine=engine)
    table = load_tables(signal_dirs, engine=engine)
    columns = table.columns
    budget_unit, size_column = size_column_of(list(columns), budget_unit, top_fraction)
    sizes = columns[size_column].astype(np.int64)
    if mode == "top":
        parsed = parse_weights(weights, list(columns))
        scores = combine_scores(columns, parsed)
        top, fill = top_parts(scores, sizes, budget=budget, top_fraction=top_fraction)
        chosen = np.sort(np.concatenate([top, fill]).astype(np.int64))
        method = top_method(parsed, float(scores[top].min()) if top.size else None, int(top.size), budget_unit,
                            int(fill.size), int(sizes[fill].sum()),
                            float(scores[fill].min()) if fill.size else None,
                            float(scores[fill].max()) if fill.size else None)
    else:
        check_resample_signal(resample_signal, list(columns))
        parsed = []
        scores = columns[resample_signal]
        chosen = importance_resample(scores, sizes, budget=budget, top_fraction=top_fraction, seed=seed)
        method = resample_method(resample_signal, seed)

    def write(where: str | Path, picked: np.ndarray, extra: dict) -> dict:
        where = Path(where)
        groups: dict[int, str] = {}
        written = write_selected(table, picked, where / "documents.jsonl.zst", source_field=SOURCE_FIELD,
                                 group_field=mix_field, groups=groups, engine=engine)
        mix: dict[str, dict] = {}
        for i, group in groups.items():
            entry = mix.setdefault(group, {"documents": 0, budget_unit: 0})
            entry["documents"] += 1
            entry[budget_unit] += int(sizes[i])
        report = selection_report(extra, signal_dirs, budget_unit, int(sizes.size), int(written), int(sizes.sum()),
                                  int(sizes[picked].sum()), mix_field, mix,
                                  summarize({"score": scores, **columns}, picked))
        storage.write_json(where / "report.json", report)
        return report

    report = write(out_dir, chosen, {**method, "budget": budget, "top_fraction": top_fraction})
    random_chosen = None
    if random_out is not None:
        random_budget = budget if budget is not None else int(sizes[chosen].sum())
        random_chosen = select_random(sizes, random_budget, seed)
        baseline = write(random_out, random_chosen, {"method": "random", "seed": seed, "budget": random_budget})
        add_random_baseline(report, random_out, baseline, budget_unit)
        storage.write_json(Path(out_dir) / "report.json", report)
    if plot:
        shown = ["score"] + [w.signal for w in parsed] if parsed else ["score"]
        plot_selection({"score": scores, **columns}, shown, chosen, random_chosen,
                       Path(out_dir) / "signals.png")
    return report
