"""Dedup across a whole corpus of document files, on an engine (this host's processes or a Ray cluster).

The algorithms are `dedup.py`'s; this module runs them over many files so that a duplicate is found wherever
its twin is (another file, another worker), with the result of running `dedup.exact_keep` / `fuzzy_keep` /
`bloom_keep` over all documents in order (file by file, line by line), whatever the engine and worker count:

1. Features, a task per file (resumable: `<work>/feat-<index>.npz` + `.json`, written whole, the JSON last):
   the file's good documents' line numbers and, by method, their normalised-text digests (exact), MinHash
   signatures (minhash) or word n-gram hashes (bloom). A document's global number is its place in the corpus.
2. exact: a keyed shuffle of (digest, global number); each bucket keeps the lowest number of each digest.
   minhash: a band shuffle: every (band, band key, global number) goes to the bucket of its key; a bucket
   groups equal (band, key) and links each member to the group's lowest number (the candidate pairs of LSH,
   exactly those `dedup.lsh_clusters` finds). The driver verifies the pairs against the signatures (read back
   only for the documents in a pair, a task per file), joins them into connected components and drops every
   document but the lowest-numbered of each. bloom: the filter is sequential by nature (a document is a
   duplicate of the kept documents before it), so one task runs it over the hashed files in order.
3. The kept documents are written by `documents.write_records`, a task per file.

A document's fate depends only on the corpus, never on how it was split into tasks or buckets.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import MALFORMED_KINDS
from mixlm.engine import Engine
from mixlm.selection.dedup import (
    BloomFilter,
    BloomSettings,
    MinHashSettings,
    _band_keys,
    _components,
    minhash_signatures,
    normalized_text,
    shingles,
)
from mixlm.selection.documents import MAX_EXAMPLES, BadLines, iter_documents
from mixlm.selection.hashing import splitmix64

METHODS = ("exact", "minhash", "bloom")


@dataclass
class CorpusDedup:
    """What a dedup run found: per input file its features file and the positions (among its good documents)
    of the duplicates to drop, with the counts of documents and skipped lines."""

    files: list[str]
    features: list[str]
    dropped: list[np.ndarray]  # int64 positions per file
    documents_in: int = 0
    malformed: dict = field(default_factory=dict)
    malformed_examples: list = field(default_factory=list)

    @property
    def documents_out(self) -> int:
        return self.documents_in - sum(d.size for d in self.dropped)

    def kept(self) -> list[tuple[str, tuple[str, np.ndarray]]]:
        """`documents.write_records` input: (file, (features file, positions to drop)) per file."""
        return [(f, (feat, d)) for f, feat, d in zip(self.files, self.features, self.dropped)]


# ---- 1. features, a task per file ------------------------------------------------------------------------------
def _settings_dict(method: str, settings) -> dict:
    return {"method": method, **(asdict(settings) if settings is not None else {})}


def file_features(common: tuple[str, str, object, str, bool], job: tuple[int, str]) -> dict:
    """An engine task: (work folder, method, its settings, text field, strict), (file index, file) -> the
    file's report (documents, skipped lines); its features go to `<work>/feat-<index>.npz`. A file whose
    features an earlier run finished for the same input and settings is not read again."""
    work, method, settings, text_field, strict = common
    index, path = job
    stem = Path(work) / f"feat-{index:05d}"
    key = {"input": path, "bytes": Path(path).stat().st_size, "text_field": text_field,
           **_settings_dict(method, settings)}
    marker = stem.with_suffix(".json")
    if marker.is_file() and stem.with_suffix(".npz").is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            return done
    bad = BadLines()
    lines: list[int] = []

    def texts():
        for number, _, text in iter_documents(path, text_field, bad, strict):
            lines.append(number)
            yield text

    arrays: dict[str, np.ndarray] = {}
    if method == "exact":
        digests = [hashlib.blake2b(normalized_text(t).encode("utf-8"), digest_size=16).digest() for t in texts()]
        arrays["digest"] = np.frombuffer(b"".join(digests), np.uint64).reshape(-1, 2)
    elif method == "minhash":
        arrays["signature"], arrays["valid"] = minhash_signatures(texts(), settings)
    else:
        grams = [shingles(t, settings.ngram) for t in texts()]
        arrays["grams"] = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        arrays["offsets"] = np.concatenate([[0], np.cumsum([g.size for g in grams])]).astype(np.int64)
    arrays["line"] = np.array(lines, np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_atomic(stem.with_suffix(".npz"), buffer.getvalue())
    report = {"key": key, "documents": len(lines), "malformed": {k: bad.counts[k] for k in MALFORMED_KINDS
                                                                  if bad.counts[k]},
              "malformed_examples": bad.examples}
    storage.write_atomic(marker, json.dumps(report))  # written last: marks the file done
    return report


def _features(paths: Sequence[str], work: Path, method: str, settings, text_field: str, strict: bool,
              engine: Engine) -> tuple[list[dict], np.ndarray]:
    """The per-file reports and the global number of each file's first document."""
    work.mkdir(parents=True, exist_ok=True)
    reports = engine.map(functools.partial(file_features, (str(work), method, settings, text_field, strict)),
                         list(enumerate(map(str, paths))), desc=f"dedup {method}: features",
                         count=lambda r: r["documents"])
    counts = np.array([r["documents"] for r in reports], np.int64)
    return reports, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _load(work: str, index: int) -> np.lib.npyio.NpzFile:
    return np.load(Path(work) / f"feat-{index:05d}.npz")


# ---- 2. the shuffles ----------------------------------------------------------------------------------------
def _buckets_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    return (splitmix64(keys) % np.uint64(buckets)).astype(np.int64)


def _split_rows(rows: np.ndarray, bucket: np.ndarray, buckets: int) -> list[np.ndarray]:
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    return [rows[order[bounds[b]:bounds[b + 1]]] for b in range(buckets)]


def exact_parts(common: tuple[str, int], job: tuple[int, int]) -> list[np.ndarray]:
    """Shuffle map: (work, buckets), (file index, its first global number) -> per bucket uint64 [m, 3] rows
    (digest high, digest low, global number)."""
    work, buckets = common
    index, first = job
    with _load(work, index) as z:
        digest = z["digest"]
    rows = np.column_stack([digest, np.arange(first, first + len(digest), dtype=np.uint64)])
    return _split_rows(rows, _buckets_of(digest[:, 0], buckets), buckets)


def exact_reduce(item: tuple[int, list[np.ndarray]]) -> np.ndarray:
    """Shuffle reduce: the global numbers (int64, ascending) of every document whose digest a lower-numbered
    document has."""
    _, parts = item
    rows = np.concatenate(parts) if parts else np.zeros((0, 3), np.uint64)
    if not len(rows):
        return np.zeros(0, np.int64)
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    first = np.concatenate([[True], (rows[1:, :2] != rows[:-1, :2]).any(axis=1)])
    return np.sort(rows[~first, 2].astype(np.int64))


def band_parts(common: tuple[str, int, int, int], job: tuple[int, int]) -> list[np.ndarray]:
    """Shuffle map: (work, bands, rows, buckets), (file index, its first global number) -> per bucket uint64
    [m, 3] rows (band, band key, global number) of the file's documents that have shingles."""
    work, bands, rows_per_band, buckets = common
    index, first = job
    with _load(work, index) as z:
        signatures, valid = z["signature"], z["valid"]
    docs = np.flatnonzero(valid)
    keys_NxB = _band_keys(signatures[docs], bands, rows_per_band)
    number = np.repeat(docs.astype(np.uint64) + np.uint64(first), bands)
    band = np.tile(np.arange(bands, dtype=np.uint64), docs.size)
    rows = np.column_stack([band, keys_NxB.ravel(), number])
    return _split_rows(rows, _buckets_of(rows[:, 1] ^ rows[:, 0], buckets), buckets)


def band_reduce(item: tuple[int, list[np.ndarray]]) -> np.ndarray:
    """Shuffle reduce: int64 [e, 2] candidate pairs (lowest number of a (band, key) group, another member)."""
    _, parts = item
    rows = np.concatenate(parts) if parts else np.zeros((0, 3), np.uint64)
    if not len(rows):
        return np.zeros((0, 2), np.int64)
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    new = np.concatenate([[True], (rows[1:, :2] != rows[:-1, :2]).any(axis=1)])
    anchor = rows[np.maximum.accumulate(np.where(new, np.arange(len(rows)), 0)), 2]
    pairs = np.column_stack([anchor[~new], rows[~new, 2]]).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def signature_rows(work: str, job: tuple[int, np.ndarray]) -> np.ndarray:
    """An engine task: (file index, positions) -> uint32 [k, num_perm] signatures of those documents."""
    index, positions = job
    with _load(work, index) as z:
        return z["signature"][positions]


def bloom_pass(common: tuple[str, BloomSettings], counts: list[int]) -> list[np.ndarray]:
    """An engine task (one: the filter is sequential): over the files' hashed documents in order, the positions
    per file of the documents `dedup.bloom_keep` drops."""
    work, settings = common
    bloom = BloomFilter(settings)
    dropped = []
    for index, _ in enumerate(counts):
        with _load(work, index) as z:
            grams, offsets = z["grams"], z["offsets"]
        mine = []
        for k in range(offsets.size - 1):
            g = grams[offsets[k]:offsets[k + 1]]
            if g.size == 0:
                continue
            if bloom.contains(g).mean() >= settings.threshold:
                mine.append(k)
            else:
                bloom.add(g)
        dropped.append(np.array(mine, np.int64))
    return dropped


# ---- the stage --------------------------------------------------------------------------------------------
def _per_file(numbers: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """Global numbers (ascending) -> the positions within each file."""
    numbers = np.sort(np.asarray(numbers, np.int64))
    cut = np.searchsorted(numbers, starts)
    return [numbers[cut[i]:cut[i + 1]] - starts[i] for i in range(starts.size - 1)]


def dedup_corpus(paths: Sequence[str | Path], work: str | Path, method: str,
                 settings: MinHashSettings | BloomSettings | None, engine: Engine, *, text_field: str = "text",
                 strict: bool = False) -> CorpusDedup:
    """The duplicates of the documents of `paths` (see the module docstring), with features kept in `work` so
    an interrupted run resumes with the files it finished."""
    paths = [str(p) for p in paths]
    work = Path(work)
    if method == "minhash":
        bands, rows = settings.bands_rows()  # settings errors before the work
    elif method == "bloom":
        settings.size()
    reports, starts = _features(paths, work, method, settings, text_field, strict, engine)
    buckets = max(1, min(256, 4 * engine.workers))
    items = [(i, int(starts[i])) for i in range(len(paths))]
    if method == "exact":
        removed = engine.shuffle(functools.partial(exact_parts, (str(work), buckets)), items, buckets, exact_reduce,
                                 desc="dedup exact: shuffle")
        dropped = _per_file(np.concatenate(removed) if removed else np.zeros(0, np.int64), starts)
    elif method == "minhash":
        found = engine.shuffle(functools.partial(band_parts, (str(work), bands, rows, buckets)), items, buckets,
                               band_reduce, desc="dedup minhash: band shuffle")
        pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
        pairs = np.unique(pairs, axis=0) if len(pairs) else pairs
        dropped = _per_file(_duplicates(pairs, starts, str(work), settings, engine), starts)
    else:
        dropped = engine.map(functools.partial(bloom_pass, (str(work), settings)),
                             [[r["documents"] for r in reports]], desc="dedup bloom: filter")[0]
    malformed: dict[str, int] = {}
    examples: list[str] = []
    for r in reports:
        for kind, n in r["malformed"].items():
            malformed[kind] = malformed.get(kind, 0) + n
        examples += r["malformed_examples"][:MAX_EXAMPLES - len(examples)]
    return CorpusDedup(paths, [str(work / f"feat-{i:05d}.npz") for i in range(len(paths))], dropped,
                       int(starts[-1]), malformed, examples)


def _duplicates(pairs: np.ndarray, starts: np.ndarray, work: str, settings: MinHashSettings, engine: Engine
                ) -> np.ndarray:
    """Global numbers of the documents a verified pair links to a lower-numbered one (`lsh_clusters`' rule)."""
    if not len(pairs):
        return np.zeros(0, np.int64)
    if settings.verify:
        nodes = np.unique(pairs)
        file_of = np.searchsorted(starts, nodes, side="right") - 1
        jobs = [(int(f), nodes[file_of == f] - starts[f]) for f in np.unique(file_of)]
        rows = engine.map(functools.partial(signature_rows, work), jobs, desc="dedup minhash: verify")
        signatures = np.concatenate(rows)  # in node order: files ascending, positions ascending
        left, right = np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1])
        agree = np.empty(len(pairs))
        for start in range(0, len(pairs), 65536):  # bounded memory: 65536 x num_perm comparisons at a time
            sl = slice(start, start + 65536)
            agree[sl] = (signatures[left[sl]] == signatures[right[sl]]).mean(axis=1)
        pairs = pairs[agree >= settings.threshold]
    nodes = np.unique(pairs)
    labels = _components(nodes.size, np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1]))
    return nodes[labels != np.arange(nodes.size)]
