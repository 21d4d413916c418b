"""The heuristics and classifier stages of `select run` choose their documents on an engine's workers: a task per
input file reads that file's signal (or score) rows, applies the rules or the score cut and saves the kept lines
(`<work>/keep-<k>.lines.npz`, as `documents.write_records` reads them); the driver sums per-file counts and never
holds a per-document column. The result equals the whole-column choice (`heuristics.apply_rules` over
`load_tables`, `pick.select_top` or `scores >= min_score`), documents ordered by (file path, line) as
`load_tables` orders them:

* rules are per document, so a file's keep mask is the rows of the whole mask, and each document dropped is
  counted against the first rule it fails, per file, then summed;
* `keep_top_fraction` is `distributed_pick.budgeted_top` over the scores (ties broken by the lower (file, line),
  as `select_top` breaks them by index), each file then keeping its documents before the cut it found;
* `score_threshold` is the lowest chosen score: the least of the per-file least.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixlm.engine import Engine
from mixlm.selection import SelectionError
from mixlm.selection.heuristics import Rule, apply_rules

WORK = ".choice-work"


@dataclass
class Choice:
    """A stage's choice: the documents read and kept, the write jobs (input file, (its kept lines' .npz, no
    positions to drop)) of the files that keep any, in (file path) order, and the per-file sums."""

    documents_in: int
    documents_out: int
    jobs: list[tuple[str, tuple[str, np.ndarray]]]
    dropped_by: dict[str, int] | None = None
    threshold: float | None = None


def _kept_file(work: str, k: int) -> str:
    return str(Path(work) / f"keep-{k:06d}.lines.npz")


def rules_file(common: tuple[str, Sequence[Rule]], job: tuple[int, str]) -> dict:
    """An engine task: (scratch folder, rules), (file number, its signal table) -> {documents, kept, dropped_by};
    the kept lines, ascending, go to the file's .lines.npz."""
    from mixlm.selection.signal_tables import read_columns

    work, rules = common
    k, table = job
    columns = read_columns(table)
    order = np.argsort(columns["line"], kind="stable")
    line = columns.pop("line")[order]
    if line.size:
        keep, dropped = apply_rules({c: v[order] for c, v in columns.items()}, rules)
    else:  # a table of no rows may lack the signal columns (jsonl): it drops nothing
        keep, dropped = np.zeros(0, bool), {r.name: 0 for r in rules}
    np.savez(_kept_file(work, k), line=line[keep])
    return {"documents": int(line.size), "kept": int(keep.sum()), "dropped_by": dropped}


def choose_by_rules(engine: Engine, signal_dir: Path, rules: Sequence[Rule], work: Path) -> Choice:
    """`apply_rules` over the tables of `signal_dir`, a task per input file."""
    from mixlm.selection.signal_tables import table_entries

    entries = sorted(table_entries(signal_dir))  # (input file, its table), in `load_tables`' file order
    _fresh(work)
    results = engine.map(functools.partial(rules_file, (str(work), list(rules))),
                         [(k, table) for k, (_, table) in enumerate(entries)], desc="select: rules",
                         count=lambda r: r["documents"])
    documents_in = sum(r["documents"] for r in results)
    if not documents_in:
        raise SelectionError(f"no documents in the signal tables of {signal_dir}")
    dropped = {r.name: 0 for r in rules}
    for r in results:
        for name, n in r["dropped_by"].items():
            dropped[name] += n
    jobs = [(source, (_kept_file(str(work), k), np.zeros(0, np.int64)))
            for k, ((source, _), r) in enumerate(zip(entries, results)) if r["kept"]]
    return Choice(documents_in, sum(r["kept"] for r in results), jobs, dropped_by=dropped)


def scores_file(common: tuple[str, str, float | None, object, Sequence[int], Sequence[int]], k: int
                ) -> tuple[int, float | None]:
    """An engine task: file k's chosen documents, those scoring >= `min_score` or (min_score None) the eligible
    documents before `cut` in `budgeted_top`'s order; their lines go to the file's .lines.npz. Returns (documents
    chosen, their lowest score or None)."""
    from mixlm.selection.distributed_pick import load_array
    from mixlm.selection.distributed_pick.boundary import SortedDataset
    from mixlm.selection.distributed_pick.work_files import load_column

    work, signal, min_score, cut, counts, offsets = common
    score = load_column(work, signal, k, counts[k])
    if min_score is not None:
        rows = np.flatnonzero(score >= min_score)
    else:
        data = SortedDataset(work, "order", k, True)
        rows = np.sort(np.asarray(data.idx[:data.position(cut)]) - offsets[k])
    np.savez(_kept_file(work, k), line=load_array(work, "line", k)[rows])
    return int(rows.size), float(score[rows].min()) if rows.size else None


def score_column(common: tuple[str, str, Sequence[int]], k: int) -> None:
    """An engine task: file k's column `signal` as its `score` array (what `budgeted_top` orders by)."""
    from mixlm.selection.distributed_pick import save_array
    from mixlm.selection.distributed_pick.work_files import load_column

    work, signal, counts = common
    save_array(work, "score", k, load_column(work, signal, k, counts[k]))


def choose_by_score(engine: Engine, score_dir: Path, work: Path, *, top_fraction: float | None = None,
                    min_score: float | None = None) -> tuple[str, Choice]:
    """(the score column, the documents of `score_dir`'s tables kept by `top_fraction` (as `pick.select_top`
    keeps them by score and num_chars) or scoring >= `min_score`), a task per input file at each step."""
    from mixlm.selection.distributed_pick import budgeted_top
    from mixlm.selection.distributed_pick.work_files import join_tables

    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise SelectionError(f"top fraction must be in (0, 1], got {top_fraction}")
    _fresh(work)
    layout, names, _ = join_tables(engine, str(work), [score_dir])
    signal = next(c for c in names if c != "num_chars")
    cut = None
    if min_score is None:
        files = range(len(layout.files))
        engine.map(functools.partial(score_column, (str(work), signal, layout.counts)), files, desc="select: scores")
        cut = budgeted_top(engine, layout, "num_chars", top_fraction=top_fraction).cut
    common = (str(work), signal, min_score, cut, layout.counts, layout.offsets.tolist())
    results = engine.map(functools.partial(scores_file, common), range(len(layout.files)), desc="select: choose",
                         count=lambda r: r[0])
    lows = [low for _, low in results if low is not None]
    jobs = [(f, (_kept_file(str(work), k), np.zeros(0, np.int64)))
            for k, (f, (n, _)) in enumerate(zip(layout.files, results)) if n]
    return signal, Choice(layout.total, sum(n for n, _ in results), jobs, threshold=min(lows) if lows else None)


def _fresh(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)  # scratch of an interrupted run: nothing in it is kept
    work.mkdir(parents=True)
