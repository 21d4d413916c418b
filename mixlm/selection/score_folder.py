"""A signal folder from any batch scorer: the same tables and reports as `signal_tables.compute_tables` writes.

`write_score_folder(inputs, out_dir, scorer, settings=...)` reads every input shard, calls
`scorer(texts) -> {column: float64 [n]}` on batches of documents, and writes per shard
`<index>-<name>.signals.<format>` (file, line, num_chars, the scorer's columns) with its
`<index>-<name>.report.json`, then `signals_report.json` listing the run's tables, so `signal_tables.load_tables`
(and so `select pick` / `select metarater`) joins it with other signal folders on (file, line). A shard
whose saved report has the same `settings` and input size is not recomputed unless `overwrite`.
DSIR (`dsir.py`) writes its columns this way.
"""

from __future__ import annotations

import functools
import json
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import MALFORMED_KINDS
from mixlm.engine import Engine, engine_or_local
from mixlm.selection import SelectionError
from mixlm.selection.documents import BadLines, iter_documents, resolve_inputs
from mixlm.selection.signal_tables import TABLE_FORMATS, shard_name, write_run_report, write_table

Scorer = Callable[[list[str]], Mapping[str, np.ndarray]]
_BATCH = 512


def score_one(common: tuple, job: tuple[int, str]) -> dict:
    """An engine task: (out folder, scorer, settings, text field, format, strict, overwrite), (index, input shard)
    → the shard's table and report; returns the report (a shard whose report matches is kept)."""
    out, scorer, settings, text_field, table_format, strict, overwrite = common
    index, path = job
    out, path = Path(out), Path(path)
    name = shard_name(index, path)
    table_path, report_path = out / f"{name}.signals.{table_format}", out / f"{name}.report.json"
    input_bytes = path.stat().st_size
    if not overwrite and table_path.exists() and report_path.exists():
        old = json.loads(report_path.read_text())
        if (old.get("settings"), old.get("input"), old.get("input_bytes")) == (settings, str(path), input_bytes):
            return old
    start = time.time()
    columns: dict[str, array] = {"line": array("q"), "num_chars": array("q")}
    bad = BadLines()
    pending: list[str] = []

    def flush() -> None:
        if not pending and len(columns) > 2:
            return  # an empty shard still calls scorer([]) once, for its (empty) columns
        for key, values in scorer(pending).items():
            values = np.asarray(values, np.float64)
            if values.shape != (len(pending),):
                raise SelectionError(f"scorer column {key!r}: {values.shape} values for {len(pending)} documents")
            columns.setdefault(key, array("d")).frombytes(values.tobytes())
        pending.clear()

    for number, _, text in iter_documents(path, text_field, bad, strict):
        columns["line"].append(number)
        columns["num_chars"].append(len(text))
        pending.append(text)
        if len(pending) >= _BATCH:
            flush()
    flush()
    write_table(str(path), columns, table_path)
    report = {
        "input": str(path), "input_bytes": input_bytes, "table": table_path.name,
        "documents": len(columns["line"]), "malformed_lines": sum(bad.counts.values()),
        "malformed": {k: bad.counts[k] for k in MALFORMED_KINDS if bad.counts[k]},
        "malformed_examples": bad.examples, "missing_ratings": {},
        "seconds": round(time.time() - start, 3), "settings": settings,
    }
    storage.write_atomic(report_path, json.dumps(report, indent=1))
    return report


def write_score_folder(inputs: Sequence[str | Path], out_dir: str | Path, scorer: Scorer, *, settings: dict,
                       text_field: str = "text", table_format: str = "parquet", strict: bool = False,
                       overwrite: bool = False, workers: int = 1, engine: Engine | None = None,
                       progress: bool = False) -> dict:
    """Score every document of `inputs` into the signal folder `out_dir`; returns the summed report.

    `settings` (JSON values) identifies the scorer: a rerun with equal settings reuses finished shards.
    `engine` scores the shards, a task each (default: `workers` local processes; the scorer is pickled to each).
    """
    if table_format not in TABLE_FORMATS:
        raise SelectionError(f"table format {table_format!r}: use one of {TABLE_FORMATS}")
    paths = resolve_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    common = (str(out), scorer, settings, text_field, table_format, strict, overwrite)
    with engine_or_local(engine, workers, progress) as run_on:
        reports = run_on.map(functools.partial(score_one, common), list(enumerate(map(str, paths))),
                             desc="select: shards", count=lambda r: r["documents"])
    return write_run_report(out, reports, settings, start)
