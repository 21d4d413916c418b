"""Raw document sources for `mixlm prepare`: jsonl(.gz/.zst), parquet, plain text, HF datasets, tfds.

A source spec is `LOCATION[?key=value&...]`:

    data/web/                         a folder: every non-hidden file below it, sorted, by suffix
    data/web/part-0001.jsonl.zst      .jsonl / .json / .ndjson (+ .gz / .zst), .parquet, anything else = text
    data/code/?text_field=content     per-source text field (default: the prepare --text-field)
    hf:allenai/c4?config=en&split=train&streaming=1    a Hugging Face dataset (hub name or a local folder
    hf:/data/saved_dataset?split=validation            written by `save_to_disk` / a loadable dataset dir)
    tfds:wikipedia/20230601.en?split=train&data_dir=/data/tfds     a tfds builder via tfds.data_source

A plain-text file is one document. Each source is split into "units" (a file, a dataset split) that are
read in a fixed order; malformed records (invalid JSON, missing or non-string text field, invalid UTF-8,
empty text) are counted per unit, or raise `MalformedInputError` in strict mode.

`iter_records` is the one reader of document files (jsonl(.gz/.zst), parquet, text) for every verb
(`prepare`, `tokenizer train`, `select ...`). A compressed file that ends inside a frame (cut short), holds
corrupt data or is not the format its name says raises `InputFileError` naming the file and how far it was
read: never a short read taken as the whole file. (A zstd file cut exactly between two frames, or a gzip file
between two members, cannot be told from a whole one.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mixlm import storage
from mixlm.errors import InputFileError, MalformedInputError, PrepareError

MALFORMED_KINDS = ("invalid_json", "missing_field", "invalid_utf8", "empty")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class InputUnit:
    """One file or dataset split, read as a whole, in order."""

    kind: str  # jsonl | parquet | text | hf | tfds
    location: str  # file path, dataset name / folder
    text_field: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.location if self.kind in ("jsonl", "parquet", "text") else f"{self.kind}:{self.location}"


def file_kind(path: str | Path) -> str:
    """'jsonl' (.jsonl / .json / .ndjson, optionally .gz / .zst), 'parquet', or 'text' (anything else)."""
    name = Path(path).name.lower()
    for comp in ("", ".gz", ".zst"):
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve_input(domain: str, spec: str, text_field: str) -> list[InputUnit]:
    """Expands one source spec into its input units (files sorted by path). Raises PrepareError naming
    the domain when a path does not exist."""
    location, _, query = spec.partition("?")
    opts = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    field_name = opts.pop("text_field", text_field)
    if location.startswith("hf:"):
        return [InputUnit("hf", location[3:], field_name, opts)]
    if location.startswith("tfds:"):
        return [InputUnit("tfds", location[5:], field_name, opts)]
    if opts:
        raise PrepareError(
            f"domain {domain!r}: source {spec!r}: options {sorted(opts)} apply only to hf: / tfds: "
            "sources (a file source takes only text_field)"
        )
    if storage.is_remote(location):
        return _remote_units(domain, spec, location, field_name)
    path = Path(location)
    if path.is_file():
        return [InputUnit(file_kind(path), str(path), field_name)]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise PrepareError(f"domain {domain!r}: source folder {path} holds no files")
        return [InputUnit(file_kind(p), str(p), field_name) for p in files]
    raise PrepareError(
        f"domain {domain!r}: source path {path} does not exist (from --domain {domain}={spec})"
    )


def _remote_units(domain: str, spec: str, location: str, field_name: str) -> list[InputUnit]:
    """The input units of a gs:// or s3:// file or folder (its objects sorted by name, hidden ones skipped)."""
    storage.check_location(location, f"--domain {domain}")
    if storage.is_file(location):
        return [InputUnit(file_kind(location), location, field_name)]
    names = sorted(n for n in storage.list_files(location) if not any(p.startswith(".") for p in n.split("/")))
    if not names:
        raise PrepareError(f"domain {domain!r}: source {location} is no object and no folder holding objects "
                           f"(from --domain {domain}={spec})")
    return [InputUnit(file_kind(n), storage.join(location, n), field_name) for n in names]


def local_copy(path: str) -> str:
    """`path` itself, or for a gs:// / s3:// input file its local copy (mixlm.storage.cached_copy: downloaded
    once per machine into the cache, reused while the store reports it unchanged), which every reader opens."""
    return os.fspath(storage.cached_copy(path)) if storage.is_remote(path) else path


FileStats = dict  # {path: [size in bytes, mtime in ns, sha256 hex]}: digests known from an earlier run


def file_digest(path: str | Path, known: FileStats | None = None) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file. With `known` (an earlier run's stats), a file whose size and
    modification time are unchanged keeps its recorded digest without being read; `known` gets this file's
    current entry (under `path`). A gs:// / s3:// file is digested from its local copy (local_copy), whose
    modification time stays as it is while the store reports the object unchanged."""
    key = os.fspath(path)
    local = local_copy(key)
    if known is not None:
        st = os.stat(local)
        entry = known.get(key)
        if entry is not None and entry[:2] == [st.st_size, st.st_mtime_ns]:
            return st.st_size, entry[2]
        size, digest = file_digest(local)
        known[key] = [st.st_size, st.st_mtime_ns, digest]
        return size, digest
    h = hashlib.sha256()
    size = 0
    with open(local, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def describe_unit(unit: InputUnit, known: FileStats | None = None) -> dict:
    """Provenance for the manifest: path, bytes, sha256 (of all files that make up the unit). `known`: see
    file_digest (unchanged files are not read)."""
    if unit.kind in ("jsonl", "parquet", "text"):
        size, digest = file_digest(unit.location, known)
        return {"path": unit.location, "bytes": size, "sha256": digest}
    files = _unit_files(unit)
    h, size = hashlib.sha256(), 0
    for f in files:
        s, d = file_digest(f, known)
        h.update(f"{Path(f).name}:{d}\n".encode())
        size += s
    return {
        "path": unit.label,
        "options": unit.options,
        "bytes": size,
        "sha256": h.hexdigest() if files else None,
        "files": len(files),
    }


def _unit_files(unit: InputUnit) -> list[str]:
    """Local data files behind an hf: / tfds: unit (empty for a remote / streaming dataset)."""
    if unit.kind == "hf":
        path = Path(unit.location)
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file())
        return []
    ds = _tfds_source(unit)
    data_dir = Path(ds.dataset_info.data_dir)
    split = unit.options.get("split", "train")
    return sorted(str(p) for p in data_dir.iterdir() if f"-{split}." in p.name)


class _Counter:
    def __init__(self, unit: InputUnit, strict: bool):
        self.unit, self.strict = unit, strict
        self.counts = dict.fromkeys(MALFORMED_KINDS, 0)

    def bad(self, kind: str, where: str, detail: str = "") -> None:
        if self.strict:
            raise MalformedInputError(
                f"{self.unit.label}:{where}: {kind.replace('_', ' ')}{': ' + detail if detail else ''}"
                " (--strict; drop --strict to count and skip such records)"
            )
        self.counts[kind] += 1

    def text(self, value, where: str) -> str | None:
        text, problem, detail = _text_problem(value, self.unit.text_field)
        if text is None:
            self.bad(problem, where, detail)
        return text


_ZSTD_READ = 1 << 16  # compressed bytes per step: bounds the decompressed bytes held at once


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame. At the end of the file a frame left
    unfinished raises EOFError, as gzip does for a cut member (zstandard's stream_reader returns a short
    stream instead); bad data raises zstandard.ZstdError."""

    def __init__(self, path: str):
        import zstandard

        self._file = open(local_copy(path), "rb")  # noqa: SIM115 - open as long as the reader, closed by close()
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read, None between frames
        self._input = b""  # compressed bytes not yet given to a frame
        self._output = memoryview(b"")  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if self._frame is not None and self._frame.eof:
                self._input, self._frame = self._frame.unused_data + self._input, None
            if not self._input:
                self._input = self._file.read(_ZSTD_READ)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("the zstd stream ends inside a frame")
                    return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            data, self._input = self._input, b""
            self._output = memoryview(self._frame.decompress(data))
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_input(path: str) -> io.BufferedIOBase:
    """The bytes of a file, decompressed by suffix (.gz, .zst). Reading a compressed file that is cut short
    raises EOFError; one with bad data gzip.BadGzipFile / zlib.error / zstandard.ZstdError (`iter_lines`
    turns these into one InputFileError)."""
    if path.endswith(".gz"):
        return gzip.open(local_copy(path), "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 16)
    return open(local_copy(path), "rb")


def _decompress_problem(path: str, error: Exception) -> str | None:
    """What a decompression error means for the user, or None when `error` is not one."""
    fmt = "zstd" if path.endswith(".zst") else "gzip"
    if isinstance(error, EOFError):
        return f"the {fmt} data ends in the middle of a compressed frame: the file is cut short (an " \
               "interrupted download or copy?)"
    detail = " ".join(str(error).split())
    if fmt == "zstd" and type(error).__name__ == "ZstdError":
        if "Unknown frame descriptor" in detail:
            return f"is not zstd data although its name ends in .zst ({detail})"
        return f"holds corrupt zstd data ({detail})"
    if fmt == "gzip" and isinstance(error, (gzip.BadGzipFile, zlib.error)):
        if "Not a gzipped file" in detail:
            return f"is not gzip data although its name ends in .gz ({detail})"
        return f"holds corrupt gzip data ({detail})"
    return None


def iter_lines(path: str, documents: Callable[[], int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) of a jsonl(.gz/.zst) file. A compressed file that is cut short, corrupt
    or not compressed as its name says raises InputFileError naming the file, the lines read and (with
    `documents`, the caller's count so far) the documents read before the problem."""
    number = 0
    try:
        with open_input(path) as f:
            for number, raw in enumerate(f, start=1):
                yield number, raw
    except Exception as e:  # only decompression errors are translated; others are raised as they are
        problem = _decompress_problem(path, e)
        if problem is None:
            raise
        read = f"{number:,} lines" + (f" ({documents():,} documents)" if documents is not None else "")
        raise InputFileError(f"{path}: {problem}; stopped after {read} read, and nothing from this file was "
                             "kept; restore or recompress the whole file and run again") from None


def _text_problem(value, text_field: str) -> tuple[str | None, str, str]:
    """(the text, "", "") when `value` is usable text, else (None, malformed kind, detail)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "invalid_utf8", str(e)
    if not isinstance(value, str):
        return None, "missing_field", f"field {text_field!r} is {type(value).__name__}, not text"
    if not value.strip():
        return None, "empty", f"field {text_field!r} is blank"
    return value, "", ""


def record_field(record: dict, name: str):
    """record[name], or record['a']['b'] for a dotted name 'a.b' that is not itself a key; KeyError when
    missing."""
    if isinstance(record, dict) and name in record:
        return record[name]
    for part in name.split("."):
        if not isinstance(record, dict) or part not in record:
            raise KeyError(name)
        record = record[part]
    return record


def _field_text(record, text_field: str) -> tuple[str | None, str, str]:
    """`_text_problem` of the record's text field; a missing or null field is a missing_field."""
    try:
        value = record_field(record, text_field)
    except KeyError:
        return None, "missing_field", f"no field {text_field!r}"
    if value is None:
        return None, "missing_field", f"field {text_field!r} is null"
    return _text_problem(value, text_field)


OnBad = Callable[[str, int, str], None]  # (malformed kind, record number, detail); may raise (strict mode)


def iter_records(path: str, text_field: str, on_bad: OnBad, *, columns: Sequence[str] | None = None
                 ) -> Iterator[tuple[int, dict, str]]:
    """(record number, record, its text) for each usable document of a file, by `file_kind`: a jsonl(.gz/.zst)
    line (number: the line, from 1; blank lines are no record), a parquet row (number: the row, from 1;
    record: the row's `columns`, default all) or a text file (one document, number 1, record
    {text_field: text}). Each skipped record goes to `on_bad` (invalid UTF-8 or JSON, no object with a text
    field, text not a string, blank text). Raises InputFileError when a compressed file cannot be read to
    its end."""
    kind = file_kind(path)
    if kind == "jsonl":
        good = [0]  # documents yielded so far, for the message of a file cut short
        for number, raw in iter_lines(path, lambda: good[0]):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                on_bad("invalid_utf8", number, str(e))
                continue
            except json.JSONDecodeError as e:  # str(e), not e.msg: e.msg alone ends in "... at"
                on_bad("invalid_json", number, str(e))
                continue
            text, problem, detail = _field_text(record, text_field)
            if text is None:
                on_bad(problem, number, detail)
                continue
            good[0] += 1
            yield number, record, text
    elif kind == "parquet":
        pf = parquet_file(path)
        names = pf.schema_arrow.names
        top = text_field if text_field in names else text_field.split(".")[0]
        if top not in names:
            for number in range(1, pf.metadata.num_rows + 1):
                on_bad("missing_field", number, f"no column {text_field!r} (columns: {names})")
            return
        wanted = None if columns is None else list(dict.fromkeys([*columns, top]))
        for number, record in iter_parquet_rows(path, wanted):
            text, problem, detail = _field_text(record, text_field)
            if text is None:
                on_bad(problem, number, detail)
                continue
            yield number, record, text
    else:
        text, problem, detail = _text_problem(Path(local_copy(path)).read_bytes(), text_field)
        if text is None:
            on_bad(problem, 1, detail.replace(f"field {text_field!r}", "the file"))
        else:
            yield 1, {text_field: text}, text


def parquet_file(path: str):
    """pyarrow's ParquetFile of `path`; InputFileError naming the file when it is no parquet file (or cut short:
    its footer is at the end)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(local_copy(path))
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path}: not a readable parquet file ({' '.join(str(e).split())}); a parquet "
                             "file that is cut short loses its footer: restore the whole file") from None


def iter_parquet_rows(path: str, columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(row number from 1, the row as a dict of `columns`, default all) of a parquet file, a batch at a time;
    InputFileError naming the file and row when its data is corrupt."""
    import pyarrow as pa

    number = 0
    batches = parquet_file(path).iter_batches(columns=columns, batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise InputFileError(f"{path}: corrupt parquet data after row {number:,} ({' '.join(str(e).split())}); "
                                 "nothing from this file was kept; restore the whole file and run again") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _read_file(unit: InputUnit, c: _Counter) -> Iterator[tuple[str, str]]:
    where = {"jsonl": "line {}", "parquet": "row {}", "text": "file"}[unit.kind]
    for number, _, text in iter_records(unit.location, unit.text_field,
                                        lambda kind, number, detail: c.bad(kind, where.format(number), detail),
                                        columns=[]):
        yield where.format(number), text


def _hf_dataset(unit: InputUnit):
    import datasets

    split = unit.options.get("split", "train")
    path = Path(unit.location)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PrepareError(f"{unit.label}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
        return ds
    streaming = unit.options.get("streaming", "1") not in ("0", "false", "False")
    kwargs = {"split": split, "streaming": streaming}
    if unit.options.get("revision"):
        kwargs["revision"] = unit.options["revision"]
    return datasets.load_dataset(unit.location, unit.options.get("config") or None, **kwargs)


def _read_hf(unit: InputUnit, c: _Counter) -> Iterator[tuple[str, str]]:
    for row, record in enumerate(_hf_dataset(unit)):
        if unit.text_field not in record or record[unit.text_field] is None:
            c.bad("missing_field", f"row {row}", f"no field {unit.text_field!r}")
            continue
        text = c.text(record[unit.text_field], f"row {row}")
        if text is not None:
            yield f"row {row}", text


def _tfds_source(unit: InputUnit):
    import tensorflow_datasets as tfds

    kwargs = {"split": unit.options.get("split", "train")}
    if unit.options.get("data_dir"):
        kwargs["data_dir"] = unit.options["data_dir"]
    return tfds.data_source(unit.location, **kwargs)


def _read_tfds(unit: InputUnit, c: _Counter) -> Iterator[tuple[str, str]]:
    source = _tfds_source(unit)
    for row in range(len(source)):
        record = source[row]
        if unit.text_field not in record:
            c.bad("missing_field", f"row {row}", f"no feature {unit.text_field!r}")
            continue
        value = record[unit.text_field]
        text = c.text(value.item() if hasattr(value, "item") else value, f"row {row}")
        if text is not None:
            yield f"row {row}", text


_READERS = {
    "jsonl": _read_file,
    "parquet": _read_file,
    "text": _read_file,
    "hf": _read_hf,
    "tfds": _read_tfds,
}


def read_located_documents(unit: InputUnit, strict: bool = False
                            ) -> tuple[Iterator[tuple[str, str]], dict[str, int]]:
    """(an iterator over the unit's documents as (where: 'line 3' / 'row 2' / 'file', text), its malformed
    counts, filled while iterating)."""
    counter = _Counter(unit, strict)
    return _READERS[unit.kind](unit, counter), counter.counts


def read_documents(unit: InputUnit, strict: bool = False) -> tuple[Iterator[str], dict[str, int]]:
    """(an iterator over the unit's document texts, its malformed counts, filled while iterating)."""
    located, counts = read_located_documents(unit, strict)
    return (text for _, text in located), counts


def counted(n: int, noun: str) -> str:
    """'1 document', '2,000 documents'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def count_documents(unit: InputUnit) -> int | None:
    """The unit's document count when it is cheap to know (uncompressed jsonl: lines, blank ones included;
    parquet: rows, from the footer; a text file: 1), else None. Progress bars use it for their ETA."""
    if unit.kind == "text":
        return 1
    if unit.kind == "parquet":
        return parquet_file(unit.location).metadata.num_rows
    if unit.kind == "jsonl" and not unit.location.endswith((".gz", ".zst")):
        lines, last = 0, b"\n"
        with open(local_copy(unit.location), "rb") as f:
            while block := f.read(1 << 24):
                lines, last = lines + block.count(b"\n"), block[-1:]
        return lines + (last != b"\n")
    return None
