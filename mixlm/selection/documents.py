"""The documents a selection reads and writes: input shards (jsonl(.gz/.zst) or parquet, read by
`mixlm.data.inputs.iter_records`) with malformed records counted by kind (`BadLines`), and a selection written
back out as one jsonl.zst (`write_selected`: jsonl lines verbatim, parquet rows as JSON objects; a zstd frame per
input file, each written by an engine task).

A malformed line (invalid UTF-8 or JSON, text field missing or not a string, blank text) is skipped and
counted by kind, as `mixlm prepare` counts them, with the first few locations; `strict=True` raises instead.
A compressed input cut short or corrupt raises InputFileError naming it.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mixlm import storage
from mixlm.data.inputs import file_kind, iter_lines, iter_parquet_rows, iter_records, record_field
from mixlm.engine import Engine, engine_or_local
from mixlm.selection import SelectionError

DOCUMENT_KINDS = ("jsonl", "parquet")  # the input files selection reads (`inputs.file_kind`)
MAX_EXAMPLES = 5


@dataclass
class BadLines:
    """Counts of skipped lines by kind (`MALFORMED_KINDS`, as `mixlm prepare` counts them), with the
    first few `file:line: kind: detail` examples."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, path: str, line: int, kind: str, detail: str, strict: bool) -> None:
        where = f"{path}:{line}: {kind.replace('_', ' ')}: {detail}"
        if strict:
            raise SelectionError(f"{where}; fix or drop that line, or run without --strict to skip and count it")
        self.counts[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(where)


def iter_documents(path: str | Path, text_field: str, bad: BadLines, strict: bool = False
                   ) -> Iterator[tuple[int, dict, str]]:
    """(record number from 1, the record, its text) for each good document of a jsonl(.gz/.zst) file (number:
    the line; blank lines are ignored) or a parquet file (number: the row), read by `inputs.iter_records`.

    Malformed records (invalid UTF-8 or JSON, no object with a string text field, empty text) go to `bad`;
    a compressed file that is cut short or corrupt raises InputFileError naming it.
    """
    path = str(path)
    yield from iter_records(path, text_field, lambda kind, number, detail: bad.add(path, number, kind, detail, strict))


def iter_texts(paths: Sequence[str | Path], text_field: str, bad: BadLines, strict: bool = False
               ) -> Iterator[tuple[int, int, str]]:
    """(index of the file in `paths`, line number from 1, text) for each good line of each file in order."""
    for file_id, path in enumerate(paths):
        for line, _, text in iter_documents(path, text_field, bad, strict):
            yield file_id, line, text


def read_texts(paths: Sequence[str | Path], text_field: str, limit: int | None = None, *,
               bad: BadLines | None = None, what: str = "file", strict: bool = False) -> list[str]:
    """The texts of the good lines of `paths`, in order, at most `limit` of them in all. A missing file is an
    error naming it as `what` (e.g. "classifier training file"); skipped lines are counted in `bad` (strict:
    the first one raises)."""
    for path in paths:
        if not Path(path).is_file():
            raise SelectionError(f"{path}: {what} not found")
    texts: list[str] = []
    for _, _, text in iter_texts(paths, text_field, bad if bad is not None else BadLines(), strict):
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The input shards as absolute paths; an error names the missing ones, one given twice, or one that is
    neither jsonl(.gz/.zst) nor parquet."""
    remote = [str(p) for p in inputs if storage.is_remote(p)]
    if remote:
        raise SelectionError(f"{remote[0]}: selection stages read input files on a local disk (a shared file system "
                             "on a cluster); `mixlm prepare` reads gs:// and s3:// directly: copy the files first, "
                             "e.g. gcloud storage cp -r / aws s3 cp --recursive")
    paths = [Path(p).resolve() for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SelectionError(f"input files not found: {', '.join(missing)}")
    other = [str(p) for p in paths if file_kind(p) not in DOCUMENT_KINDS]
    if other:
        raise SelectionError(f"input files of no document format: {', '.join(other)}; selection reads .jsonl "
                             "(.json, .ndjson; + .gz / .zst) and .parquet files: rename or convert them")
    if len(set(paths)) != len(paths):
        raise SelectionError("an input file is given twice; each shard must appear once")
    return paths


class LocatedDocuments(Protocol):
    """Documents by place: `files` (paths), and per document the index of its file and its line (or row)
    number from 1 (a mixlm.selection.signal_tables.SignalTable is one)."""

    files: Sequence[str]
    file_id: np.ndarray
    line: np.ndarray


def _group(record: dict, field: str | None, path: str) -> str:
    """The document's `field` value (a string, or JSON), or its input file's name when it has none."""
    try:
        value = record_field(record, field) if field else None
    except KeyError:
        value = None
    if value is None:
        return Path(path).name
    return value if isinstance(value, str) else json.dumps(value)


Lines = np.ndarray | tuple[str, np.ndarray]  # wanted line numbers, or (.npz with a `line` array, positions to drop)


def _wanted_lines(lines: Lines) -> np.ndarray:
    if isinstance(lines, tuple):  # a dedup stage's per-file lines, less the duplicates' positions
        features, dropped = lines
        with np.load(features) as z:
            return np.delete(z["line"], dropped)
    return np.asarray(lines, np.int64)


def _wanted_sizes(lines: Lines) -> dict[int, int]:
    """{line: size} from a job's .npz (`line` and `size` arrays)."""
    features, dropped = lines
    with np.load(features) as z:
        return dict(zip(np.delete(z["line"], dropped).tolist(), np.delete(z["size"], dropped).tolist()))


def write_part(common: tuple[str, int, str | None, str | None, bool | str], job: tuple[int, str, Lines]
               ) -> tuple[int, list[tuple]]:
    """An engine task: (parts folder, zstd level, source field, group field, want groups), (part number, input
    file, its wanted line numbers, ascending, or where to read them) -> (documents written, [(line, group)] when
    groups are wanted; with want groups "mix", [(group, documents, size)] in first-seen order instead, the sizes
    from the `size` array beside `line` in the job's .npz). Writes the wanted records as one zstd frame,
    `part-<number>.zst`, whole; a part an earlier run finished for the same lines (its `.json` beside it) is
    kept."""
    import zstandard

    folder, level, source_field, group_field, want_groups = common
    number, path, lines = job
    size_of = _wanted_sizes(lines) if want_groups == "mix" else None
    lines = _wanted_lines(lines)
    part = Path(folder) / f"part-{number:06d}.zst"
    marker = part.with_suffix(".json")
    key = {"input": path, "bytes": Path(path).stat().st_size, "lines": _lines_digest(lines), "level": level,
           "source_field": source_field, "group_field": group_field if want_groups else None,
           **({"mix": True} if size_of is not None else {})}
    if part.is_file() and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            return done["written"], [tuple(g) for g in done["groups"]]
    wanted = set(np.asarray(lines).tolist())
    parse = source_field is not None or want_groups
    groups: list[tuple[int, str]] = []
    written = 0
    with storage.atomic_writer(part) as raw, \
            zstandard.ZstdCompressor(level=level).stream_writer(raw, closefd=False) as out:
        if file_kind(path) == "parquet":
            records = ((n, row, None) for n, row in iter_parquet_rows(path) if n in wanted)
        else:
            records = ((n, json.loads(line) if parse else None, line) for n, line in iter_lines(path) if n in wanted)
        for number_, record, line in records:
            if want_groups:
                groups.append((number_, _group(record, group_field, path)))
            add_source = source_field is not None and source_field not in record if parse else False
            if line is None:  # a parquet row
                out.write((json.dumps({**record, **({source_field: path} if add_source else {})},
                                      ensure_ascii=False, default=str) + "\n").encode("utf-8"))
            elif add_source:  # the object's last byte is its closing brace: add the field before it
                body = line.rstrip()
                out.write(body[:-1] + f", {json.dumps(source_field)}: {json.dumps(path)}}}\n".encode())
            else:
                out.write(line if line.endswith(b"\n") else line + b"\n")
            written += 1
    if size_of is not None:  # per group, not per record: the driver gets a few numbers per file
        mix: dict[str, list[int]] = {}
        for line_number, group in groups:
            entry = mix.setdefault(group, [0, 0])
            entry[0] += 1
            entry[1] += size_of[line_number]
        groups = [(group, documents, size) for group, (documents, size) in mix.items()]
    storage.write_atomic(marker, json.dumps({"key": key, "written": written, "groups": groups}))
    return written, groups


def _lines_digest(lines: np.ndarray) -> str:
    import hashlib

    return hashlib.blake2b(np.asarray(lines, np.int64).tobytes(), digest_size=16).hexdigest()


def write_selected(table: LocatedDocuments, chosen: np.ndarray, out_path: str | Path, level: int = 3, *,
                   source_field: str | None = None, group_field: str | None = None,
                   groups: dict[int, str] | None = None, engine: Engine | None = None) -> int:
    """Write the documents `chosen` (indices into `table`) into one jsonl.zst, in (file, line) order: a jsonl
    input's lines verbatim, a parquet input's rows as JSON objects. Returns the number of documents written
    (see `write_records`).

    `source_field`: a document without that field gets it, holding its input file's path (appended to the
    line's object, the line's other bytes unchanged), so a selection from several files still says where each
    document came from. `groups`, when given, is filled with {index into table: the document's `group_field`
    value, or its input file's name when it has none} (the mix of the selection by domain or source).
    """
    wanted: dict[str, dict[int, int]] = {}
    for i, f, line in zip(np.asarray(chosen).tolist(), table.file_id[chosen].tolist(), table.line[chosen].tolist()):
        wanted.setdefault(table.files[f], {})[line] = i
    files = [(path, np.array(sorted(wanted[path]), np.int64)) for path in sorted(wanted)]
    by_line: dict[str, dict[int, str]] | None = {} if groups is not None else None
    written = write_records(files, out_path, level, source_field=source_field, group_field=group_field,
                            groups=by_line, engine=engine)
    if groups is not None:
        for path, lines in by_line.items():
            groups.update({wanted[path][line]: group for line, group in lines.items()})
    return written


def join_frames(frames: Sequence[Path], out_path: str | Path) -> None:
    """Write the zstd `frames` (files), in order, into `out_path` as one file, written whole: one zstd stream of
    several frames, which every zstd reader reads as one (no frames: one empty frame)."""
    import shutil

    import zstandard

    with storage.atomic_writer(out_path) as out:
        if not frames:
            out.write(zstandard.ZstdCompressor().compress(b""))
        for frame in frames:
            with open(frame, "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)


def write_records(files: Sequence[tuple[str, Lines]], out_path: str | Path, level: int = 3, *,
                  source_field: str | None = None, group_field: str | None = None,
                  groups: dict[str, dict[int, str]] | None = None, mix: dict[str, list[int]] | None = None,
                  engine: Engine | None = None, keep_parts: str | Path | None = None) -> int:
    """Write the records of each (input file, its wanted lines) in `files`, in that order, into one jsonl.zst;
    returns the number written. Each file is one engine task (default: this process) writing one zstd frame
    in a parts folder beside `out_path` (a rerun keeps finished parts); the frames are then joined in order into
    `out_path`, written whole: one zstd stream of several frames, which every zstd reader reads as one.
    `groups`, when given, gets {file: {line: its group}} (see `write_selected`); `mix`, when given instead, gets
    {group: [documents, size]} in first-seen order, each task counting its own file's (the lines then come as
    (.npz with `line` and `size`, positions to drop)), so no per-record group reaches this process.
    `keep_parts`, when given, is a folder that gets each frame as its own file too, `part-<k>.jsonl.zst` (its input
    file's records), so a next stage can read the output a task per input file."""
    import shutil


    out_path = Path(out_path)
    parts = out_path.with_name(f".{out_path.name}.parts")
    parts.mkdir(parents=True, exist_ok=True)
    jobs = [(k, str(path), lines) for k, (path, lines) in enumerate(files)]
    common = (str(parts), level, source_field, group_field, "mix" if mix is not None else groups is not None)
    with engine_or_local(engine, 1, False) as run_on:
        results = run_on.map(functools.partial(write_part, common), jobs, desc="select: write",
                             count=lambda r: r[0])
    join_frames([parts / f"part-{k:06d}.zst" for k, _, _ in jobs], out_path)
    written = 0
    for (_, path, _), (count, part_groups) in zip(jobs, results):
        written += count
        if mix is not None:
            for group, documents, size in part_groups:
                entry = mix.setdefault(group, [0, 0])
                entry[0] += documents
                entry[1] += size
        elif groups is not None:
            groups.setdefault(path, {}).update(dict(part_groups))
    if keep_parts is not None:
        keep = Path(keep_parts)
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for k, _, _ in jobs:
            os.replace(parts / f"part-{k:06d}.zst", keep / f"part-{k:06d}.jsonl.zst")
    shutil.rmtree(parts, ignore_errors=True)
    return written
