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
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MALFORMED_KINDS = ("invalid_json", "missing_field", "invalid_utf8", "empty")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PrepareError(ValueError):
    """A prepare input or option is wrong; the message names the domain / file and what to do."""


class MalformedInputError(PrepareError):
    """A malformed record in strict mode: names the file and the line / row."""


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


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    for comp in ("", ".gz", ".zst"):
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve_source(domain: str, spec: str, text_field: str) -> list[InputUnit]:
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
    path = Path(location)
    if path.is_file():
        return [InputUnit(_file_kind(path), str(path), field_name)]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise PrepareError(f"domain {domain!r}: source folder {path} holds no files")
        return [InputUnit(_file_kind(p), str(p), field_name) for p in files]
    raise PrepareError(
        f"domain {domain!r}: source path {path} does not exist (from --domain {domain}={spec})"
    )


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def describe_unit(unit: InputUnit) -> dict:
    """Provenance for the manifest: path, bytes, sha256 (of all files that make up the unit)."""
    if unit.kind in ("jsonl", "parquet", "text"):
        size, digest = file_digest(unit.location)
        return {"path": unit.location, "bytes": size, "sha256": digest}
    files = _unit_files(unit)
    h, size = hashlib.sha256(), 0
    for f in files:
        s, d = file_digest(f)
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
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad("invalid_utf8", where, str(e))
                return None
        if not isinstance(value, str):
            self.bad(
                "missing_field", where, f"field {self.unit.text_field!r} is {type(value).__name__}, not text"
            )
            return None
        if not value.strip():
            self.bad("empty", where)
            return None
        return value


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_jsonl(unit: InputUnit, c: _Counter) -> Iterator[str]:
    with _open_binary(unit.location) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                c.bad("invalid_utf8", where, str(e))
                continue
            if not line.strip():
                continue  # blank lines separate nothing in jsonl; not a record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                c.bad("invalid_json", where, str(e))
                continue
            if not isinstance(record, dict) or unit.text_field not in record:
                c.bad("missing_field", where, f"no field {unit.text_field!r}")
                continue
            text = c.text(record[unit.text_field], where)
            if text is not None:
                yield text


def _read_parquet(unit: InputUnit, c: _Counter) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.location)
    if unit.text_field not in pf.schema_arrow.names:
        for row in range(pf.metadata.num_rows):
            c.bad(
                "missing_field",
                f"row {row}",
                f"no column {unit.text_field!r} (columns: {pf.schema_arrow.names})",
            )
        return
    row = 0
    for batch in pf.iter_batches(columns=[unit.text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                c.bad("missing_field", f"row {row}", "null")
            else:
                text = c.text(value, f"row {row}")
                if text is not None:
                    yield text
            row += 1


def _read_text(unit: InputUnit, c: _Counter) -> Iterator[str]:
    text = c.text(Path(unit.location).read_bytes(), "file")
    if text is not None:
        yield text


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


def _read_hf(unit: InputUnit, c: _Counter) -> Iterator[str]:
    for row, record in enumerate(_hf_dataset(unit)):
        if unit.text_field not in record or record[unit.text_field] is None:
            c.bad("missing_field", f"row {row}", f"no field {unit.text_field!r}")
            continue
        text = c.text(record[unit.text_field], f"row {row}")
        if text is not None:
            yield text


def _tfds_source(unit: InputUnit):
    import tensorflow_datasets as tfds

    kwargs = {"split": unit.options.get("split", "train")}
    if unit.options.get("data_dir"):
        kwargs["data_dir"] = unit.options["data_dir"]
    return tfds.data_source(unit.location, **kwargs)


def _read_tfds(unit: InputUnit, c: _Counter) -> Iterator[str]:
    source = _tfds_source(unit)
    for row in range(len(source)):
        record = source[row]
        if unit.text_field not in record:
            c.bad("missing_field", f"row {row}", f"no feature {unit.text_field!r}")
            continue
        value = record[unit.text_field]
        text = c.text(value.item() if hasattr(value, "item") else value, f"row {row}")
        if text is not None:
            yield text


_READERS = {
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "text": _read_text,
    "hf": _read_hf,
    "tfds": _read_tfds,
}


def read_documents(unit: InputUnit, strict: bool = False) -> tuple[Iterator[str], dict[str, int]]:
    """(an iterator over the unit's document texts, its malformed counts, filled while iterating)."""
    counter = _Counter(unit, strict)
    return _READERS[unit.kind](unit, counter), counter.counts
