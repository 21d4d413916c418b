"""The per-file work of distributed pick: the scratch folder's layout and arrays, and the per-file join of the
signal tables (`join_file`, one engine task per input file; `join_tables` on the driver)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixlm.engine import Engine
from mixlm.selection import SelectionError

WORK = ".pick-work"
SAMPLES = 64  # values per file and column for splitters


@dataclass(frozen=True)
class Layout:
    """Driver-side facts of the per-file work: the scratch folder, the input files (sorted paths), each file's
    joined document count and the global index of its first document (documents are ordered by (file, line))."""

    work: str
    files: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])[:-1]

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def array_path(work: str, kind: str, k: int) -> Path:
    """The file of file (or bucket) k's array `kind` in the scratch folder `work`."""
    return Path(work) / f"{kind}-{k:06d}.npy"


def save_array(work: str, kind: str, k: int, array: np.ndarray) -> None:
    """Writes `array` as k's array `kind` (`array_path`)."""
    np.save(array_path(work, kind, k), np.ascontiguousarray(array))


def load_array(work: str, kind: str, k: int, mmap: bool = False) -> np.ndarray:
    """k's array `kind` (`array_path`), memory-mapped read-only when `mmap`."""
    return np.load(array_path(work, kind, k), mmap_mode="r" if mmap else None)


def even_sample(sorted_values: np.ndarray, n: int) -> np.ndarray:
    """At most `n` evenly spaced values of `sorted_values`, first and last included (the middle one for n = 1)."""
    if sorted_values.size <= n:
        return np.asarray(sorted_values)
    if n <= 1:
        return np.asarray(sorted_values[sorted_values.size // 2:][:n])
    return np.asarray(sorted_values[(np.arange(n) * (sorted_values.size - 1)) // (n - 1)])


def join_file(common: tuple[str, list[str]], job: tuple[int, list[list[str]]]) -> dict:
    """An engine task: (scratch folder, the signals folders), (file number, per folder its tables of this file)
    -> {documents, names: per folder its columns or None, samples: {column: sorted sample}}; writes the joined
    columns (`line`, then one array per column) as `col-<column>` arrays."""
    from mixlm.selection.signal_tables import read_columns

    work, dirs = common
    k, tables = job
    line: np.ndarray | None = None
    columns: dict[str, np.ndarray] = {}
    names_per_dir: list[list[str] | None] = []
    for d, paths in zip(dirs, tables):
        chunks = [read_columns(p) for p in paths]
        if not chunks:  # the file is not in this folder: no document of it survives the join
            names_per_dir.append(None)
            line = np.zeros(0, np.int64) if line is None else line[:0]
            columns = {c: v[:0] for c, v in columns.items()}
            continue
        names = sorted({c for ch in chunks for c in ch}, key=lambda c: (c != "line", c))
        missing = [c for c in names if any(c not in ch for ch in chunks)]
        if missing:
            raise SelectionError(f"{d}: tables disagree on columns {missing}; recompute with --overwrite")
        names_per_dir.append(names)
        merged = {c: np.concatenate([ch[c] for ch in chunks]) for c in names}
        order = np.argsort(merged["line"], kind="stable")
        own_line = merged.pop("line")[order]
        own = {c: v[order] for c, v in merged.items()}
        if line is None:
            line, columns = own_line, own
            continue
        _, ia, ib = np.intersect1d(line, own_line, assume_unique=True, return_indices=True)
        joined = {c: v[ia] for c, v in columns.items()}
        for c, v in own.items():
            if c in joined and not np.array_equal(joined[c], v[ib], equal_nan=True):
                raise SelectionError(f"column {c!r} differs between {d} and an earlier signals folder; "
                                     "were they computed with different settings (tokenizer, say)?")
            joined[c] = v[ib]
        line, columns = line[ia], joined
    line = np.zeros(0, np.int64) if line is None else line
    save_array(work, "line", k, line)
    samples = {}
    for c, v in columns.items():
        save_array(work, f"col-{c}", k, v)
        samples[c] = even_sample(np.sort(v[~np.isnan(v)]), SAMPLES)
    return {"documents": int(line.size), "names": names_per_dir, "samples": samples}


def load_column(work: str, name: str, k: int, n: int) -> np.ndarray:
    """File k's joined column `name` (n documents), zeros when the file has no documents."""
    path = array_path(work, f"col-{name}", k)
    return np.load(path) if path.is_file() else np.zeros(n)  # a file with no documents has no columns


def join_tables(engine: Engine, work: str, signal_dirs: Sequence[str | Path]) -> tuple[Layout, list[str], list[dict]]:
    """Joins each input file's tables (`join_file`); returns the layout, the columns in `load_tables`' order and
    each file's column samples. Errors as `load_tables` raises them."""
    from mixlm.selection.signal_tables import table_entries

    dirs = [Path(d) for d in signal_dirs]
    entries = [table_entries(d) for d in dirs]
    files = sorted({source for e in entries for source, _ in e})
    jobs = [(k, [[table for source, table in e if source == f] for e in entries]) for k, f in enumerate(files)]
    joined = engine.map(functools.partial(join_file, (work, [str(d) for d in dirs])), jobs, desc="pick: join")
    names: list[str] = []
    for i, d in enumerate(dirs):
        seen = [r["names"][i] for r in joined if r["names"][i] is not None]
        union = sorted({c for s in seen for c in s}, key=lambda c: (c != "line", c))
        missing = [c for c in union if any(c not in s for s in seen)]
        if missing:
            raise SelectionError(f"{d}: tables disagree on columns {missing}; recompute with --overwrite")
        names += [c for c in union if c != "line" and c not in names]
    layout = Layout(work, tuple(files), tuple(r["documents"] for r in joined))
    if not layout.total:
        raise SelectionError(f"no documents in the signal tables of {', '.join(map(str, signal_dirs))}")
    return layout, names, [r["samples"] for r in joined]
