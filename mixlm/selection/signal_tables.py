"""Signal tables over document shards: one row of signals per document, computed resumably, read back as a
`SignalTable`. (Reading input documents and writing a selection back out: mixlm.selection.documents.)

Input shards are jsonl, jsonl.gz or jsonl.zst files, one JSON object per line with a text field, or parquet
files with a text column (a row's number stands for the line), read by `mixlm.data.inputs.iter_records`.
`compute_tables` writes, per input shard, `OUT/<index>-<name>.signals.parquet` (or `.signals.jsonl`)
with one row per readable document: `file` (absolute path), `line` (1-based), `num_chars`, then
`num_tokens` (with a tokenizer), the rule-based signals, the requested rating columns of the input,
the classifier score, the model raters' columns (`mixlm.selection.model_raters`) and the perplexity
columns (`mixlm.selection.perplexity`); beside it `<index>-<name>.report.json` (documents, malformed lines,
settings, the rule signal names) so an interrupted run redoes only unfinished shards, and a table made before
a rule signal was added is made again. `OUT/signals_report.json`, written last, sums
the shard reports and lists the run's tables; `load_tables` reads those back as a `SignalTable`.

A malformed line (invalid UTF-8 or JSON, text field missing or not a string, blank text) is skipped
and counted by kind, as `mixlm prepare` counts them, with the first few locations; `strict=True`
raises instead. A compressed input cut short or corrupt raises InputFileError naming it. `num_tokens` counts the text's tokens without special tokens (prepare adds an EOS).

Each shard is one task of an engine (mixlm.engine: processes on this host, or Ray tasks on a cluster); the
tables are the same bytes on either. Model columns are computed where the shard is read: with a classifier,
model raters or perplexity the shards run on long-lived workers (Ray actors, one GPU each when the cluster has
GPUs and the device allows), each loading each model once and keeping it for all its shards, with torch
limited to its share of the CPU threads. On one accelerator, or with a large model, `workers=1` keeps a single
copy; the rule signals are cheap beside a model's forward pass anyway.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import MALFORMED_KINDS, record_field
from mixlm.engine import Engine, engine_or_local
from mixlm.selection import SelectionError
from mixlm.selection.documents import MAX_EXAMPLES, BadLines, iter_documents, resolve_inputs
from mixlm.selection.signals import SIGNAL_NAMES, compute_signals

TABLE_FORMATS = ("parquet", "jsonl")
_BATCH = 512  # documents per classifier / tokenizer call


@dataclass(frozen=True)
class TableSettings:
    """What a signal table holds; a shard whose saved settings differ is recomputed."""

    text_field: str = "text"
    rules: bool = True
    rating_columns: tuple[str, ...] = ()
    classifier: str | None = None  # model directory
    classifier_signal: str | None = None  # column name; default: the one saved with the classifier
    tokenizer: str | None = None  # HF tokenizer folder or hub name, loaded as `mixlm prepare` loads it
    table_format: str = "parquet"
    # (name, folder, column names or (), activation) per model rater (mixlm.selection.model_raters)
    model_raters: tuple[tuple[str, str, tuple[str, ...], str], ...] = ()
    perplexity: str | None = None  # causal LM folder or mixlm checkpoint (mixlm.selection.perplexity)
    batch_size: int = 32  # model raters and perplexity
    max_length: int = 512  # tokens per document for model raters; perplexity's window (at most the context)
    device: str = "auto"  # torch device of HF models: auto | cpu | cuda[:i]

    def to_dict(self) -> dict:
        """JSON-able (lists for tuples), as saved in the reports; the model fields only when set, so tables
        computed before they existed still match."""
        d = json.loads(json.dumps(asdict(self)))
        if not (self.model_raters or self.perplexity):
            for key in _MODEL_FIELDS:
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TableSettings:
        raters = tuple((n, f, tuple(c), a) for n, f, c, a in d.get("model_raters", ()))
        return cls(**{**d, "rating_columns": tuple(d["rating_columns"]), "model_raters": raters})


_MODEL_FIELDS = ("model_raters", "perplexity", "batch_size", "max_length", "device")


def shard_name(index: int, path: Path) -> str:
    stem = re.sub(r"(\.jsonl?(\.gz|\.zst)?|\.parquet)$", "", path.name)
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}"


@functools.lru_cache(maxsize=2)
def _load_classifier(model_dir: str, signal: str | None):
    # Once per worker process, not once per shard (a fastText model is hundreds of MiB).
    from mixlm.selection.classifier import load_classifier

    return load_classifier(model_dir, signal)


@functools.lru_cache(maxsize=16)
def _load_model_rater(name: str, folder: str, columns: tuple[str, ...], activation: str, device: str,
                      batch_size: int, max_length: int):
    from mixlm.selection.model_raters import load_rater

    _limit_torch_threads()
    return load_rater(name, folder, columns=columns, activation=activation, device=device,
                      batch_size=batch_size, max_length=max_length)


@functools.lru_cache(maxsize=2)
def _load_perplexity(folder: str, device: str, batch_size: int, max_length: int):
    from mixlm.selection.perplexity import load_perplexity_scorer

    _limit_torch_threads()
    return load_perplexity_scorer(folder, device=device, batch_size=batch_size, max_length=max_length)


def _limit_torch_threads() -> None:
    from mixlm.engine import worker_threads

    if worker_threads():  # in an engine's worker process: its share of the host's CPU threads
        import torch

        torch.set_num_threads(worker_threads())


@functools.lru_cache(maxsize=2)
def _load_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def score_shard(common: tuple[str, dict, str | None, bool, bool], job: tuple[int, str]) -> dict:
    """An engine task: (out folder, settings, tokenizer JSON, strict, overwrite), (index, input shard) → the
    shard's table and report in the out folder. Returns the report; a shard whose report matches is kept."""
    out_dir, settings_dict, tokenizer_json, strict, overwrite = common
    index, path = job
    settings = TableSettings.from_dict(settings_dict)
    name = shard_name(index, Path(path))
    table_path = Path(out_dir) / f"{name}.signals.{settings.table_format}"
    report_path = Path(out_dir) / f"{name}.report.json"
    input_bytes = Path(path).stat().st_size
    # A table of an older mixlm lacks rule signals added since: recompute it.
    signal_names = list(SIGNAL_NAMES) if settings.rules else []
    if not overwrite and table_path.exists() and report_path.exists():
        old = json.loads(report_path.read_text())
        if (old.get("settings"), old.get("input"), old.get("input_bytes"), old.get("signals", [])) == (
                settings_dict, path, input_bytes, signal_names):
            return old

    start = time.time()
    classifier = _load_classifier(settings.classifier, settings.classifier_signal) if settings.classifier else None
    tokenizer = _load_tokenizer(tokenizer_json) if tokenizer_json else None
    raters = [_load_model_rater(name, folder, cols, activation, settings.device, settings.batch_size,
                                settings.max_length) for name, folder, cols, activation in settings.model_raters]
    perplexity = _load_perplexity(settings.perplexity, settings.device, settings.batch_size,
                                  settings.max_length) if settings.perplexity else None
    # Compact typed arrays, not lists of Python floats: a shard may hold millions of documents.
    columns: dict[str, array] = {"line": array("q"), "num_chars": array("q")}
    if tokenizer is not None:
        columns["num_tokens"] = array("q")
    if settings.rules:
        columns.update({key: array("d") for key in SIGNAL_NAMES if key != "num_chars"})
    columns.update({col: array("d") for col in settings.rating_columns})
    if classifier is not None:
        columns[classifier.signal] = array("d")
    model_columns = [col for rater in raters for col in rater.columns]
    if perplexity is not None:
        from mixlm.selection.model_scoring import COLUMNS as PERPLEXITY_COLUMNS

        model_columns += PERPLEXITY_COLUMNS
    for col in model_columns:
        if col in columns:
            raise SelectionError(f"column {col!r} would be written twice (a model rater's name or output clashes "
                                 "with another column); rename the rater (--model OTHER=DIR or --columns)")
        columns[col] = array("d")

    bad = BadLines()
    missing_ratings: Counter = Counter()
    pending: list[str] = []

    def flush() -> None:
        if tokenizer is not None:
            columns["num_tokens"].extend(len(e.ids) for e in tokenizer.encode_batch(pending, add_special_tokens=False))
        if classifier is not None:
            columns[classifier.signal].extend(classifier.score(pending).tolist())
        for rater in raters if pending else ():
            scores_NxK = rater.score(pending)
            for k, col in enumerate(rater.columns):
                columns[col].extend(scores_NxK[:, k].tolist())
        if perplexity is not None and pending:
            for col, values in perplexity.score(pending).items():
                columns[col].extend(values.tolist())
        pending.clear()

    for number, obj, text in iter_documents(path, settings.text_field, bad, strict):
        columns["line"].append(number)
        columns["num_chars"].append(len(text))
        if settings.rules:
            for key, value in compute_signals(text).items():
                if key != "num_chars":
                    columns[key].append(value)
        for col in settings.rating_columns:
            try:
                value = record_field(obj, col)
            except KeyError:
                value = None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                missing_ratings[col] += 1  # missing or not a number
                value = math.nan
            columns[col].append(float(value))
        pending.append(text)
        if len(pending) >= _BATCH:
            flush()
    flush()

    write_table(path, columns, table_path)
    report = {
        "input": path,
        "input_bytes": input_bytes,
        "table": table_path.name,
        "documents": len(columns["line"]),
        "malformed_lines": sum(bad.counts.values()),
        "malformed": {k: bad.counts[k] for k in MALFORMED_KINDS if bad.counts[k]},
        "malformed_examples": bad.examples,
        "missing_ratings": dict(missing_ratings),
        "seconds": round(time.time() - start, 3),
        "settings": settings_dict,
        "signals": signal_names,
    }
    storage.write_atomic(report_path, json.dumps(report, indent=1))
    return report


def write_table(path: str, columns: dict[str, array], out: Path) -> None:
    """One row per document: file, then `columns` (int64 'q' / float64 'd' arrays of equal length); written
    whole (storage.atomic_writer), so a reader never sees part of a table."""
    rows = len(columns["line"])
    with storage.atomic_writer(out) as f:
        if out.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({
                "file": pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([path])),
                **{k: pa.array(np.frombuffer(v, np.int64 if v.typecode == "q" else np.float64))
                   for k, v in columns.items()},
            })
            pq.write_table(table, f)
        else:
            names = list(columns)
            for row in zip(*(columns[k] for k in names)):
                clean = [None if isinstance(v, float) and math.isnan(v) else v for v in row]
                f.write((json.dumps({"file": path, **dict(zip(names, clean))}) + "\n").encode())


def compute_tables(inputs: Sequence[str | Path], out_dir: str | Path, settings: TableSettings = TableSettings(),
                   *, workers: int = 1, strict: bool = False, overwrite: bool = False,
                   progress: bool = False, engine: Engine | None = None) -> dict:
    """Signal tables for every input shard (see the module docstring); returns the summed report.

    `engine` runs the shards (default: `workers` local processes, spawned, so safe beside jax / tokenizers
    threads). progress=True: a tqdm line on stderr (shards done, documents/s, ETA).
    """
    if settings.table_format not in TABLE_FORMATS:
        raise SelectionError(f"table format {settings.table_format!r}: use one of {TABLE_FORMATS}")
    if not (settings.rules or settings.rating_columns or settings.classifier or settings.model_raters
            or settings.perplexity):
        raise SelectionError("nothing to compute: enable the rule signals, a rating column, a classifier, a model "
                             "rater or perplexity")
    _check_model_folders(settings)
    paths = resolve_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings_dict = settings.to_dict()
    tokenizer_json = None
    if settings.tokenizer:
        from mixlm.data.tokenizer import load_tokenizer_spec

        tokenizer_json = load_tokenizer_spec(settings.tokenizer).backend_json
    common = (str(out), settings_dict, tokenizer_json, strict, overwrite)
    models = bool(settings.classifier or settings.model_raters or settings.perplexity)
    start = time.time()
    with engine_or_local(engine, workers, progress) as run_on:
        gpus = 1 if (settings.model_raters or settings.perplexity) and settings.device != "cpu" and run_on.gpus() \
            else 0
        reports = run_on.map(functools.partial(score_shard, common), list(enumerate(map(str, paths))),
                             desc="select: shards", count=lambda r: r["documents"], stateful=models, gpus=gpus)
    return write_run_report(out, reports, settings_dict, start)


def write_run_report(out: Path, reports: Sequence[dict], settings: dict, start: float) -> dict:
    """Sums the shard reports of a run into `out/signals_report.json` (written last, atomically) and returns it."""
    reasons: Counter = Counter()
    missing_ratings: Counter = Counter()
    for r in reports:
        reasons.update(r["malformed"])
        missing_ratings.update(r["missing_ratings"])
    summary = {
        "shards": len(reports),
        "documents": sum(r["documents"] for r in reports),
        "malformed_lines": sum(r["malformed_lines"] for r in reports),
        "malformed": dict(reasons),
        "malformed_examples": [e for r in reports for e in r["malformed_examples"]][:MAX_EXAMPLES],
        "missing_ratings": dict(missing_ratings),
        "seconds": round(time.time() - start, 3),
        "settings": settings,
        # The tables of this run: `load_tables` reads these and no stale file of an earlier run.
        "tables": [{k: r[k] for k in ("table", "input", "input_bytes")} for r in reports],
    }
    storage.write_atomic(out / "signals_report.json", json.dumps(summary, indent=1))
    return summary


def _check_model_folders(settings: TableSettings) -> None:
    """Fails before any shard starts when a model folder is missing (a worker would fail per shard)."""
    from mixlm.selection.model_scoring import rater_folder_problem

    for name, folder, _, _ in settings.model_raters:
        problem = rater_folder_problem(folder)
        if problem:
            raise SelectionError(f"rater {name}: {problem}; pass --model {name}=DIR with a local model folder")
    if settings.perplexity and not Path(settings.perplexity).is_dir():
        raise SelectionError(f"--perplexity {settings.perplexity}: no such folder; pass a HF causal LM folder "
                             "(mixlm export output included) or a mixlm run / checkpoint folder")


def read_columns(path: str | Path) -> dict[str, np.ndarray]:
    """A table's columns except `file`, as numpy: line int64, every other column float64 (NaN = null); an
    engine task of `load_tables`."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = {k: table[k].to_numpy() for k in table.column_names if k != "file"}
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        names = [k for k in rows[0] if k != "file"] if rows else ["line"]
        raw = {k: np.array([np.nan if r[k] is None else r[k] for r in rows]) for k in names}
    return {k: v.astype(np.int64 if k == "line" else np.float64) for k, v in raw.items()}


@dataclass
class SignalTable:
    """Signals of n documents, sorted by (file path, line). `files[file_id[i]]` is document i's shard."""

    files: list[str]
    file_id: np.ndarray  # int64 [n]
    line: np.ndarray  # int64 [n]
    columns: dict[str, np.ndarray]  # float64 [n] each: num_chars, signals, ratings, scores ...

    def __len__(self) -> int:
        return int(self.line.size)


def table_entries(d: Path) -> list[tuple[str, str]]:
    """(input file, its table) of each table of the last `compute_tables` run in `d`; raises when the run never
    finished there or an input shard is gone or changed size since (lines would no longer match)."""
    report_path = d / "signals_report.json"
    if not report_path.is_file():
        raise SelectionError(f"{d}: no signals_report.json; run (or finish) `mixlm select signals` there")
    entries = json.loads(report_path.read_text())["tables"]
    for entry in entries:
        source = Path(entry["input"])
        if not source.is_file():
            raise SelectionError(f"{source} (signals in {d}) no longer exists; restore it or recompute")
        if source.stat().st_size != entry["input_bytes"]:
            raise SelectionError(f"{source} changed since its signals in {d} were computed; "
                                 "rerun `mixlm select signals` on it")
    return [(str(Path(entry["input"])), str(d / entry["table"])) for entry in entries]


def _load_dir(d: Path, engine: Engine) -> dict[str, list]:
    entries = table_entries(d)
    tables = engine.map(read_columns, [table for _, table in entries], desc=f"read {d.name}")
    parts: dict[str, list] = {}
    for (source, _), cols in zip(entries, tables):
        parts.setdefault(source, []).append(cols)
    return parts


def load_tables(dirs: Sequence[str | Path], engine: Engine | None = None) -> SignalTable:
    """The signal tables of the last `compute_tables` run in each of `dirs`, joined on (file, line); the tables
    are read on `engine` (default: this process), a task each.

    Only documents present in every dir are kept. A column found in several dirs (num_chars, say) is
    kept once when the values agree and is an error when they do not. Raises when an input shard is
    gone or changed size since its signals were computed (lines would no longer match).
    """
    with engine_or_local(engine, 1, False) as run_on:
        loaded = [_load_dir(Path(d), run_on) for d in dirs]
    files = sorted({f for parts in loaded for f in parts})
    file_index = {f: i for i, f in enumerate(files)}
    joined: SignalTable | None = None
    for d, parts in zip(dirs, loaded):
        chunks = [(file_index[f], cols) for f, tables in parts.items() for cols in tables]
        names = sorted({k for _, cols in chunks for k in cols}, key=lambda k: (k != "line", k))
        missing = [k for k in names if any(k not in cols for _, cols in chunks)]
        if missing:
            raise SelectionError(f"{d}: tables disagree on columns {missing}; recompute with --overwrite")
        file_id = np.concatenate([np.full(cols["line"].size, i, np.int64) for i, cols in chunks]) \
            if chunks else np.zeros(0, np.int64)
        merged = {k: np.concatenate([cols[k] for _, cols in chunks]) if chunks else np.zeros(0) for k in names}
        order = np.lexsort((merged["line"], file_id))
        table = SignalTable(files, file_id[order], merged.pop("line")[order],
                            {k: v[order] for k, v in merged.items()})
        if joined is None:
            joined = table
            continue
        key_a, key_b = (t.file_id * 2**32 + t.line for t in (joined, table))
        _, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
        columns = {k: v[ia] for k, v in joined.columns.items()}
        for k, v in table.columns.items():
            if k in columns and not np.array_equal(columns[k], v[ib], equal_nan=True):
                raise SelectionError(f"column {k!r} differs between {d} and an earlier signals folder; "
                                     "were they computed with different settings (tokenizer, say)?")
            columns[k] = v[ib]
        joined = SignalTable(files, joined.file_id[ia], joined.line[ia], columns)
    if joined is None or not len(joined):
        raise SelectionError(f"no documents in the signal tables of {', '.join(map(str, dirs))}")
    return joined
