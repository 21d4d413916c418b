"""The whole distributed selection (`select_on_workers`): join, score, budget, summaries, and the writing of
the chosen lines (`chosen_lines`) and the records and report."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixlm.engine import Engine
from mixlm.selection import SelectionError, pick
from mixlm.selection.distributed_pick.boundary import Cut, SortedDataset
from mixlm.selection.distributed_pick.budget import budgeted_top, resample_keys
from mixlm.selection.distributed_pick.random_baseline import random_rows
from mixlm.selection.distributed_pick.ranks import rank_scores
from mixlm.selection.distributed_pick.signal_summaries import summaries, summary_sets
from mixlm.selection.distributed_pick.work_files import WORK, Layout, join_tables, load_array, load_column


def chosen_lines(common: tuple[str, str, Sequence[int], Sequence[int]], job: tuple[int, str, Cut, np.ndarray]
                 ) -> tuple[np.ndarray, int, int]:
    """An engine task: file k's chosen rows (the eligible documents before `cut`, all of them when `cut` is None,
    none when it is False; and the `extra` rows), saved as `<set>-<k>.lines.npz` (`line` and `size`, as
    `documents.write_records` reads them). Returns (rows, documents, their size)."""
    work, size_column, counts, offsets = common
    k, set_name, cut, extra = job
    sizes = load_column(work, size_column, k, counts[k]).astype(np.int64)
    rows = np.asarray(extra, np.int64)
    if cut is not False:
        data = SortedDataset(work, "order", k, True)
        top = np.asarray(data.idx[:data.position(cut)]) - offsets[k]
        rows = np.concatenate([top, rows])
    rows = np.sort(rows)
    np.savez(Path(work) / f"{set_name}-{k:06d}.lines.npz", line=load_array(work, "line", k)[rows], size=sizes[rows])
    return rows, int(rows.size), int(sizes[rows].sum())


def select_on_workers(signal_dirs: Sequence[str | Path], weights: Mapping | None, out_dir: str | Path, *,
                      budget: float | None, top_fraction: float | None, budget_unit: str | None,
                      random_out: str | Path | None, seed: int, mode: str, resample_signal: str | None,
                      mix_field: str | None, engine: Engine | None, buckets: int = 64,
                      max_candidates: int = 4096, random_batch: int = 1 << 20) -> dict:
    """`pick_documents.select_documents` (which see) with per-document work in `engine`'s tasks; the same files
    and report. `buckets`: sort intervals per weighted signal; `max_candidates`: documents fetched at once to the
    driver; `random_batch`: the random baseline's documents whose sizes are fetched at once."""
    from mixlm import storage
    from mixlm.engine import engine_or_local

    if (budget is None) == (top_fraction is None):
        raise SelectionError("give exactly one of a token budget and a top fraction")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise SelectionError(f"top fraction must be in (0, 1], got {top_fraction}")
    if budget is not None and budget < 0:
        raise SelectionError(f"budget must be >= 0, got {budget}")
    work = str(Path(out_dir) / WORK)
    shutil.rmtree(work, ignore_errors=True)  # scratch of an interrupted run: nothing in it is kept
    Path(work).mkdir(parents=True)
    try:
        with engine_or_local(engine, 1, False) as run_on:
            layout, names, samples = join_tables(run_on, work, signal_dirs)
            budget_unit, size_column = pick.size_column_of(names, budget_unit, top_fraction)
            if mode == "top":
                parsed = pick.parse_weights(weights, names)
                rank_scores(run_on, layout, parsed, samples, buckets)
                method_parsed, score_source = parsed, None
            else:
                pick.check_resample_signal(resample_signal, names)
                resample_keys(run_on, layout, resample_signal, seed)
                method_parsed, score_source = [], resample_signal
            files = range(len(layout.files))
            offsets = layout.offsets.tolist()
            top = budgeted_top(run_on, layout, size_column, budget=budget, top_fraction=top_fraction,
                               max_candidates=max_candidates)
            per_file, cut, top_count, threshold = top.per_file, top.cut, top.top_count, top.threshold
            fill, fill_keys, fill_sizes = top.fill, top.fill_keys, top.fill_sizes
            units_in = sum(u for _, _, u in per_file)
            if mode == "top":
                method = pick.top_method(method_parsed, threshold, top_count, budget_unit, len(fill),
                                         int(sum(fill_sizes)), float(-max(fill_keys)) if fill else None,
                                         float(-min(fill_keys)) if fill else None)
            else:
                method = pick.resample_method(resample_signal, seed)
            fill_rows = _rows_per_file(layout, np.asarray(fill, np.int64))
            chosen = {"top": run_on.map(functools.partial(chosen_lines, (work, size_column, layout.counts, offsets)),
                                        [(k, "top", cut, fill_rows[k]) for k in files], desc="pick: chosen")}
            if random_out is not None:
                random_budget = budget if budget is not None else sum(units for _, _, units in chosen["top"])
                rows = random_rows(run_on, layout, size_column, [p for _, p, _ in per_file], random_budget, seed,
                                   random_batch)
                chosen["rnd"] = run_on.map(
                    functools.partial(chosen_lines, (work, size_column, layout.counts, offsets)),
                    [(k, "rnd", False, rows[k]) for k in files], desc="pick: chosen")
            sources = list({"score": score_source, **{c: c for c in names}}.items())
            counts = {"all": run_on.map(functools.partial(summary_sets, (work, sources, layout.counts, offsets)),
                                        [(k, "all", None) for k in files], desc="pick: summaries")}
            for s, got in chosen.items():
                counts[s] = run_on.map(functools.partial(summary_sets, (work, sources, layout.counts, offsets)),
                                       [(k, s, rows) for k, (rows, _, _) in zip(files, got)], desc="pick: summaries")
            stats = summaries(run_on, layout, sources, list(counts), counts, max_candidates)

            def write(where: str | Path, s: str, extra: dict) -> dict:
                from mixlm.selection.documents import write_records

                where = Path(where)
                jobs = [(layout.files[k], (str(Path(work) / f"{s}-{k:06d}.lines.npz"), np.zeros(0, np.int64)))
                        for k, (_, n, _) in zip(files, chosen[s]) if n]
                counted: dict[str, list[int]] = {}
                written = write_records(jobs, where / "documents.jsonl.zst", source_field=pick.SOURCE_FIELD,
                                        group_field=mix_field, mix=counted, engine=run_on)
                mix = {group: {"documents": documents, budget_unit: units} for group, (documents, units)
                       in counted.items()}
                signals = {name: {"all": stats["all"][name], "selected": stats[s][name]} for name, _ in sources}
                report = pick.selection_report(extra, signal_dirs, budget_unit, layout.total, int(written), units_in,
                                               sum(u for _, _, u in chosen[s]), mix_field, mix, signals)
                storage.write_json(where / "report.json", report)
                return report

            report = write(out_dir, "top", {**method, "budget": budget, "top_fraction": top_fraction})
            if random_out is not None:
                baseline = write(random_out, "rnd", {"method": "random", "seed": seed, "budget": random_budget})
                pick.add_random_baseline(report, random_out, baseline, budget_unit)
                storage.write_json(Path(out_dir) / "report.json", report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _rows_per_file(layout: Layout, indices: np.ndarray) -> list[np.ndarray]:
    """Global document indices -> the rows of each file."""
    offsets = layout.offsets
    file = np.searchsorted(offsets, indices, side="right") - 1
    return [indices[file == k] - offsets[k] for k in range(len(layout.files))]
