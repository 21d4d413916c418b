"""A chain of selection stages run by one command (`mixlm select run CONFIG --input ... --out OUT`).

A config is YAML: `text_field` (default text) and `stages`, a list of {name, kind, ...options}. Each stage
reads the documents the previous one kept (the first reads `--input`) and writes
`OUT/<NN>-<name>/documents.jsonl.zst` (the kept input lines, verbatim) and `report.json` (documents in and
out, what dropped them, seconds, and a fingerprint of its settings and inputs). The same documents are also kept
a file per input file of the stage, `<stage>/parts/part-<k>.jsonl.zst` (the zstd frames the documents file
joins), and the next stage reads those, so every stage runs a task per input file of the first (`stage_inputs`).
Every stage runs on the engine's workers; the heuristics and classifier stages choose there too
(`stage_choice`), the driver summing per-file counts. Kinds:

* `heuristics` — rules: a preset name (`heuristics.PRESETS`, e.g. refinedweb) or a list of
  {signal, min, max, times}; the rule signals go to `<stage>/signals/` (a signal folder).
* `exact_dedup` — `dedup.exact_keep` (normalised-text hash, first kept).
* `minhash_dedup` — `dedup.fuzzy_keep`; options: ngram, num_perm, bands, rows, threshold, seed, verify.
* `bloom_dedup` — `dedup.bloom_keep` (DCLM's Bloom-filter variant, document level); options: ngram,
  threshold, expected_ngrams, false_positive_rate; with `paragraphs: true`, `dedup.bloom_dedup_paragraphs`
  (DCLM's paragraph + document level): duplicate paragraphs are cut out of the documents, which are then
  written with their text replaced (other fields kept), and a document left with fewer than `min_words`
  words is dropped.
* `classifier` — pos/neg training files (trained into `<stage>/model/`) or a trained `model` folder;
  preset (`classifier.CLASSIFIER_PRESETS`, e.g. dclm), backend, fasttext_options, seed, max_docs; keeps
  `keep_top_fraction` of its input by score (or the documents scoring >= `min_score`); scores in
  `<stage>/scores/`.

`dedup_documents` runs one dedup stage alone (`mixlm select dedup`).

A stage is built in `OUT/.<NN>-<name>.tmp` and renamed into place when complete, so an interrupted run
leaves no half-written stage. An existing stage whose fingerprint matches is reused (its fingerprint covers
the previous stage's, so a stage after a rebuilt one is rebuilt too); one that differs is an error unless
`overwrite`, which replaces it. `OUT/report.json` lists the documents kept per stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from mixlm import storage
from mixlm.engine import Engine, engine_or_local
from mixlm.selection import SelectionError, load_yaml_file
from mixlm.selection.dedup import BloomSettings

STAGE_KINDS = ("heuristics", "exact_dedup", "minhash_dedup", "bloom_dedup", "classifier")
DOCUMENTS = "documents.jsonl.zst"
PARTS = "parts"  # in a stage folder: its documents a file per input file of the stage, the next stage's inputs
_STAGE_OPTIONS = {
    "heuristics": {"rules"},
    "exact_dedup": set(),
    "minhash_dedup": {"ngram", "num_perm", "bands", "rows", "threshold", "seed", "verify"},
    "bloom_dedup": {"ngram", "threshold", "expected_ngrams", "false_positive_rate", "paragraphs", "min_words"},
    "classifier": {"pos", "neg", "model", "preset", "backend", "fasttext_options", "seed", "max_docs",
                   "keep_top_fraction", "min_score", "signal", "val_fraction"},
}


def load_pipeline(path: str | Path, classifier_data: Mapping | None = None) -> dict:
    """The validated config at `path`; `classifier_data` ({pos, neg, model}, from the CLI) fills the
    classifier stage. Errors name the stage and key."""
    path = Path(path)
    config = load_yaml_file(path, "pipeline config")
    if not isinstance(config, dict) or not isinstance(config.get("stages"), list) or not config["stages"]:
        raise SelectionError(f"{path}: expected a mapping with a non-empty `stages` list")
    extra = set(config) - {"text_field", "stages", "description"}
    if extra:
        raise SelectionError(f"{path}: unknown top-level keys {sorted(extra)} (text_field, stages, description)")
    names = set()
    for i, stage in enumerate(config["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or "name" not in stage or "kind" not in stage:
            raise SelectionError(f"{where}: expected {{name: ..., kind: ...}}, got {stage!r}")
        if stage["kind"] not in STAGE_KINDS:
            raise SelectionError(f"{where} ({stage['name']}): kind {stage['kind']!r}: use one of {STAGE_KINDS}")
        unknown = set(stage) - {"name", "kind"} - _STAGE_OPTIONS[stage["kind"]]
        if unknown:
            raise SelectionError(f"{where} ({stage['name']}): unknown options {sorted(unknown)}; "
                                 f"{stage['kind']} takes {sorted(_STAGE_OPTIONS[stage['kind']])}")
        if stage["name"] in names or not str(stage["name"]).replace("-", "").replace("_", "").isalnum():
            raise SelectionError(f"{where}: name {stage['name']!r} must be unique, of letters, digits, - and _")
        names.add(stage["name"])
        if stage["kind"] == "classifier":
            stage.update({k: v for k, v in (classifier_data or {}).items() if v})
            for key in ("pos", "neg"):  # one path or a list of paths
                if isinstance(stage.get(key), str):
                    stage[key] = [stage[key]]
            if not stage.get("model") and not (stage.get("pos") and stage.get("neg")):
                raise SelectionError(f"{where} ({stage['name']}): give training files (--pos and --neg) or a "
                                     "trained classifier (--model)")
            if (stage.get("keep_top_fraction") is None) == (stage.get("min_score") is None):
                raise SelectionError(f"{where} ({stage['name']}): give exactly one of keep_top_fraction, min_score")
    given = [f"--{k}" for k, v in (classifier_data or {}).items() if v]
    if given and not any(s["kind"] == "classifier" for s in config["stages"]):
        raise SelectionError(f"{path}: {', '.join(given)} given but the config has no classifier stage")
    config.setdefault("text_field", "text")
    return config


def _skipped(bad) -> dict:
    """The report entries of the lines a stage skipped: their number, by kind, and the first few."""
    return {"malformed_lines": sum(bad.counts.values()), "malformed": dict(bad.counts),
            "malformed_examples": bad.examples}


def _dedup(method: str, settings, inputs: Sequence[Path], text_field: str, out: Path, engine: Engine,
           strict: bool = False, parts: Path | None = None) -> dict:
    """One dedup method over all of `inputs` (mixlm.selection.corpus_dedup: duplicates found across files, on
    the engine), the kept documents written to `out`."""
    from mixlm.selection.corpus_dedup import dedup_corpus
    from mixlm.selection.documents import write_records

    found = dedup_corpus(inputs, out / ".dedup-work", method, settings, engine, text_field=text_field, strict=strict)
    written = write_records(found.kept(), out / DOCUMENTS, engine=engine, keep_parts=parts)
    shutil.rmtree(out / ".dedup-work", ignore_errors=True)
    return {"documents_in": found.documents_in, "documents_out": written,
            "malformed_lines": sum(found.malformed.values()), "malformed": found.malformed,
            "malformed_examples": found.malformed_examples}


def _rewrite_by_text(inputs: Sequence[Path], text_field: str, out: Path,
                     rewrite_fn: Callable[[Iterator[str]], Iterator[str | None]], strict: bool = False,
                     parts: Path | None = None) -> dict:
    """Runs `rewrite_fn(texts)`, one new text (or None: drop) per document in order, over the documents of
    `inputs`, and writes each kept document's JSON object with its text field replaced: one zstd stream, or with
    `parts` a frame per input file, `parts/part-<k>.jsonl.zst`, joined in order (as `write_records` writes)."""
    import zstandard

    from mixlm.selection.documents import BadLines, iter_documents, join_frames

    bad = BadLines()
    pending: deque[tuple[int, dict]] = deque()  # (file, object) whose texts rewrite_fn has read, not yet answered

    def texts() -> Iterator[str]:
        for k, path in enumerate(inputs):
            for _, obj, text in iter_documents(path, text_field, bad, strict):
                pending.append((k, obj))
                yield text

    *parents, leaf = text_field.split(".")
    documents_in = documents_out = 0
    tmp = out / (DOCUMENTS + ".tmp")
    if parts is not None and inputs:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
        targets = [parts / f"part-{k:06d}.jsonl.zst" for k in range(len(inputs))]
    else:
        parts, targets = None, [tmp]
    with contextlib.ExitStack() as files:
        sinks: list = []

        def sink(k: int):  # the writer of file k's frame; the frames of the files before it are closed, in order
            while len(sinks) <= min(k, len(targets) - 1):
                if sinks:
                    sinks[-1].close()
                raw = files.enter_context(open(targets[len(sinks)], "wb"))
                sinks.append(zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False))
            return sinks[-1]

        for new_text in rewrite_fn(texts()):
            k, obj = pending.popleft()
            documents_in += 1
            if new_text is None:
                continue
            target = obj
            for key in parents:
                target = target[key]
            target[leaf] = new_text
            sink(k).write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
            documents_out += 1
        sink(len(targets) - 1).close()  # every file has its frame, the empty ones too
    if parts is not None:
        join_frames(targets, out / DOCUMENTS)
    else:
        os.replace(tmp, out / DOCUMENTS)
    return {"documents_in": documents_in, "documents_out": documents_out, **_skipped(bad)}


def bloom_paragraphs(item: tuple[list[str], str, str, BloomSettings, bool, str | None]) -> dict:
    """An engine task (one: the filter is sequential): `dedup.bloom_dedup_paragraphs` over the documents of all
    inputs, in order, written to the out folder (and its parts folder, when given); returns the stage's report
    entries."""
    from mixlm.selection import dedup

    inputs, text_field, out, bloom, strict, parts = item
    counts: Counter = Counter()
    report = _rewrite_by_text([Path(p) for p in inputs], text_field, Path(out),
                              lambda texts: dedup.bloom_dedup_paragraphs(texts, bloom, counts), strict,
                              Path(parts) if parts else None)
    return {**report, **{k: counts[k] for k in ("duplicate_documents", "too_short_documents", "paragraphs_removed")}}


def _heuristics(stage: dict, inputs: Sequence[Path], text_field: str, out: Path, engine: Engine, strict: bool,
                parts: Path | None) -> dict:
    from mixlm.selection.documents import write_records
    from mixlm.selection.heuristics import describe, parse_rules
    from mixlm.selection.signal_tables import TableSettings, compute_tables
    from mixlm.selection.stage_choice import WORK, choose_by_rules

    rules = parse_rules(stage.get("rules", "refinedweb"))
    signals = compute_tables(inputs, out / "signals", TableSettings(text_field=text_field), strict=strict,
                             engine=engine)
    chosen = choose_by_rules(engine, out / "signals", rules, out / WORK)
    write_records(chosen.jobs, out / DOCUMENTS, engine=engine, keep_parts=parts)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return {"documents_in": chosen.documents_in, "documents_out": chosen.documents_out,
            "dropped_by": chosen.dropped_by, "rules": describe(rules), "malformed_lines": signals["malformed_lines"],
            "malformed": signals["malformed"], "malformed_examples": signals["malformed_examples"]}


def _settings(cls, stage: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in stage.items() if k in known})


def _classifier(stage: dict, inputs: Sequence[Path], text_field: str, out: Path, engine: Engine, strict: bool,
                parts: Path | None) -> dict:
    from mixlm.selection.classifier import classifier_preset, train_classifier
    from mixlm.selection.documents import BadLines, read_texts, write_records
    from mixlm.selection.signal_tables import TableSettings, compute_tables
    from mixlm.selection.stage_choice import WORK, choose_by_score

    report: dict = {}
    if stage.get("model"):
        model_dir = Path(stage["model"]).resolve()
    else:
        preset = classifier_preset(stage["preset"], stage.get("fasttext_options")) if stage.get("preset") else {}
        backend = stage.get("backend") or preset.get("backend", "sklearn")
        options = preset.get("fasttext_options") or stage.get("fasttext_options")
        limit = stage.get("max_docs")
        model_dir = out / "model"
        what, training_bad = "classifier training file", BadLines()
        report["training"] = train_classifier(
            read_texts(stage["pos"], text_field, limit, bad=training_bad, what=what, strict=strict),
            read_texts(stage["neg"], text_field, limit, bad=training_bad, what=what, strict=strict), model_dir,
            backend=backend,
            signal=stage.get("signal", "classifier_score"), seed=stage.get("seed", 0),
            val_fraction=stage.get("val_fraction", 0.1), fasttext_options=options)
        report["training_malformed"] = _skipped(training_bad)
    settings = TableSettings(text_field=text_field, rules=False, classifier=str(model_dir),
                             classifier_signal=stage.get("signal"))
    scored = compute_tables(inputs, out / "scores", settings, strict=strict, engine=engine)
    signal, chosen = choose_by_score(engine, out / "scores", out / WORK, top_fraction=stage.get("keep_top_fraction"),
                                     min_score=stage.get("min_score"))
    write_records(chosen.jobs, out / DOCUMENTS, engine=engine, keep_parts=parts)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return {**report, "documents_in": chosen.documents_in, "documents_out": chosen.documents_out, "signal": signal,
            "score_threshold": chosen.threshold,
            "malformed_lines": scored["malformed_lines"] + report.get("training_malformed", {}).get("malformed_lines", 0),
            "malformed": scored["malformed"], "malformed_examples": scored["malformed_examples"]}


def _run_stage(stage: dict, inputs: Sequence[Path], text_field: str, out: Path, engine: Engine, strict: bool = False,
               keep_parts: bool = False) -> dict:
    """One stage over `inputs` into `out`; `keep_parts`: also keep the output a file per input file in
    `out/parts` (`documents.write_records`), for the next stage."""
    from mixlm.selection import dedup

    kind = stage["kind"]
    parts = out / PARTS if keep_parts else None
    if kind == "heuristics":
        return _heuristics(stage, inputs, text_field, out, engine, strict, parts)
    if kind == "exact_dedup":
        return _dedup("exact", None, inputs, text_field, out, engine, strict, parts)
    if kind == "minhash_dedup":
        settings = _settings(dedup.MinHashSettings, stage)
        bands, rows = settings.bands_rows()
        return {**_dedup("minhash", settings, inputs, text_field, out, engine, strict, parts), "bands": bands,
                "rows": rows}
    if kind == "bloom_dedup":
        bloom = _settings(dedup.BloomSettings, stage)
        bits, hashes = bloom.size()
        if bloom.paragraphs:
            item = ([str(p) for p in inputs], text_field, str(out), bloom, strict, str(parts) if parts else None)
            report = engine.map(bloom_paragraphs, [item], desc="dedup bloom: paragraphs")[0]
        else:
            report = _dedup("bloom", bloom, inputs, text_field, out, engine, strict, parts)
        return {**report, "bloom_bits": bits, "bloom_hashes": hashes}
    return _classifier(stage, inputs, text_field, out, engine, strict, parts)


_PARTIAL = ".partial.json"  # in a stage's temp folder: the fingerprint of the work in it (an interrupted run's)


DEDUP_METHODS = {"exact": "exact_dedup", "minhash": "minhash_dedup", "bloom": "bloom_dedup"}


def dedup_documents(inputs: Sequence[str | Path], out_dir: str | Path, method: str, options: Mapping | None = None,
                    *, text_field: str = "text", strict: bool = False, overwrite: bool = False,
                    engine: Engine | None = None) -> dict:
    """One dedup stage alone (`mixlm select dedup`): the documents of `inputs` without duplicates by `method`
    (exact | minhash | bloom; `options` as that stage takes them in a pipeline config, None for its default),
    found across all files on `engine` (default: this process), into `out_dir/documents.jsonl.zst` (kept input
    lines, verbatim) and `out_dir/report.json` (documents in and out, what was removed, skipped lines). A rerun
    with the same inputs and settings reuses the output (an interrupted one, the files it finished); other
    settings are refused unless `overwrite`. Returns the report."""
    from mixlm.selection.documents import resolve_inputs

    if method not in DEDUP_METHODS:
        raise SelectionError(f"dedup method {method!r}: use one of {', '.join(DEDUP_METHODS)}")
    kind = DEDUP_METHODS[method]
    stage = {"name": "dedup", "kind": kind, **{k: v for k, v in (options or {}).items() if v is not None}}
    unknown = sorted(set(stage) - {"name", "kind"} - _STAGE_OPTIONS[kind])
    if unknown:
        takes = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(_STAGE_OPTIONS[kind])) or "no options"
        raise SelectionError(f"{', '.join('--' + k.replace('_', '-') for k in unknown)} does not apply to --method "
                             f"{method} (it takes {takes})")
    paths = resolve_inputs(inputs)
    out = Path(out_dir)
    fingerprint = _fingerprint(stage, paths, text_field, "")
    report_path = out / "report.json"
    old = json.loads(report_path.read_text()) if report_path.is_file() else None
    if old is not None and old.get("fingerprint") == fingerprint and (out / DOCUMENTS).is_file():
        return {**old, "reused": True}
    if (out / DOCUMENTS).exists() and not overwrite:
        raise SelectionError(f"{out} holds documents of a run with other settings or inputs; pass --overwrite to "
                             "replace them, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with engine_or_local(engine) as run_on:
        report = {"method": method, **_run_stage(stage, paths, text_field, out, run_on, strict),
                  "seconds": round(time.time() - start, 3), "fingerprint": fingerprint}
    storage.write_json(report_path, report)
    return {**report, "reused": False}


def _fingerprint(stage: dict, inputs: Sequence[Path], text_field: str, previous: str) -> dict:
    def resolved(value):
        if isinstance(value, list):
            return [resolved(v) for v in value]
        return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value

    settings = {k: resolved(v) if k in ("pos", "neg", "model") else v for k, v in stage.items()}
    files = [[str(p), p.stat().st_size] for p in inputs]
    if stage["kind"] == "classifier":  # the training data counts too
        files += [[str(Path(p).resolve()), Path(p).stat().st_size]
                  for key in ("pos", "neg") for p in stage.get(key) or []]
    return {"stage": settings, "text_field": text_field, "inputs": files, "previous": previous}


def _digest(fingerprint: dict) -> str:
    return hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode(), digest_size=12).hexdigest()


def run_pipeline(config: Mapping, inputs: Sequence[str | Path], out_dir: str | Path, *, workers: int = 1,
                 overwrite: bool = False, progress: Callable[[str], None] | None = None, strict: bool = False,
                 engine: Engine | None = None) -> dict:
    """Run every stage of `config` (from `load_pipeline`) on `inputs`, each on `engine` (default: `workers`
    local processes); returns and writes OUT/report.json."""
    with engine_or_local(engine, workers, False) as run_on:
        return _run_pipeline(config, inputs, out_dir, overwrite, progress, strict, run_on)


def _run_pipeline(config: Mapping, inputs: Sequence[str | Path], out_dir: str | Path, overwrite: bool,
                  progress: Callable[[str], None] | None, strict: bool, engine: Engine) -> dict:
    from mixlm.selection.documents import resolve_inputs

    paths = resolve_inputs(inputs)
    documents = paths  # what the fingerprint names: the inputs, then the previous stage's documents file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_field = config.get("text_field", "text")
    summary, previous = [], ""
    for number, stage in enumerate(config["stages"], start=1):
        final = out / f"{number:02d}-{stage['name']}"
        fingerprint = _fingerprint(stage, documents, text_field, previous)
        digest = _digest(fingerprint)
        report_path = final / "report.json"
        old = json.loads(report_path.read_text()) if report_path.is_file() else None
        if final.exists() and not overwrite and (old is None or old.get("fingerprint") != fingerprint):
            raise SelectionError(f"{final} exists from a run with other settings or inputs; pass --overwrite to "
                                 "rebuild it, or choose another --out")
        if old is not None and old.get("fingerprint") == fingerprint:
            report = {**old, "reused": True}
        else:
            tmp = out / f".{final.name}.tmp"
            if not (tmp / _PARTIAL).is_file() or json.loads((tmp / _PARTIAL).read_text()) != fingerprint:
                shutil.rmtree(tmp, ignore_errors=True)  # partial work of other settings or inputs
                tmp.mkdir()
                storage.write_json(tmp / _PARTIAL, fingerprint)
            start = time.time()  # an interrupted stage resumes here with the files (shards) it finished
            report = {"stage": stage["name"], "kind": stage["kind"],
                      **_run_stage(stage, paths, text_field, tmp, engine, strict, keep_parts=True),
                      "seconds": round(time.time() - start, 3), "fingerprint": fingerprint, "digest": digest}
            (tmp / _PARTIAL).unlink()
            storage.write_json(tmp / "report.json", report)
            if final.exists():  # --overwrite: swap the new stage in, then drop the old one
                stale = out / f".{final.name}.old"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale)
            else:
                os.replace(tmp, final)
            report["reused"] = False
        row = {"stage": stage["name"], "kind": stage["kind"], "documents_in": report["documents_in"],
               "documents_out": report["documents_out"],
               "kept": report["documents_out"] / report["documents_in"] if report["documents_in"] else math.nan,
               "seconds": report["seconds"], "reused": report["reused"], "output": str(final / DOCUMENTS),
               "malformed_lines": report.get("malformed_lines", 0)}
        summary.append(row)
        if progress is not None:
            progress(format_row(row))
        paths, documents, previous = stage_inputs(final), [final / DOCUMENTS], digest
    result = {"stages": summary, "output": str(documents[0]),
              "documents_in": summary[0]["documents_in"], "documents_out": summary[-1]["documents_out"]}
    storage.write_json(out / "report.json", result)
    return result


def stage_inputs(stage_dir: Path) -> list[Path]:
    """The documents of a finished stage as the next stage reads them: its parts, a file per input file of the
    stage (so the next stage runs a task per file), or its one documents file when it has none (a stage of an
    older mixlm, or the paragraph Bloom stage, which writes its documents in one pass)."""
    return sorted((stage_dir / PARTS).glob("part-*.jsonl.zst")) or [stage_dir / DOCUMENTS]


def format_row(row: Mapping) -> str:
    """'heuristics (heuristics): 1,000 → 612 documents (61.2%) in 3.1 s, 2 bad lines skipped'."""
    note = f", {row['malformed_lines']:,} bad line{'s' * (row['malformed_lines'] != 1)} skipped" \
        if row.get("malformed_lines") else ""
    note += ", reused" if row["reused"] else ""
    return (f"{row['stage']} ({row['kind']}): {row['documents_in']:,} → {row['documents_out']:,} documents "
            f"({100 * row['kept']:.1f}%) in {row['seconds']:.1f} s{note}")
