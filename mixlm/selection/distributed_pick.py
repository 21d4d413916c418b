"""`select pick` on an engine's workers (mixlm.engine), exact: the same chosen documents and report bytes as
`pick.select_documents` over whole columns, while the driver holds only per-file counts, splitters and bounded
candidate batches, never a per-document column.

Every per-document array lives in per-input-file tasks, in a scratch folder `OUT/.pick-work` (a shared file
system on a cluster, as the signal tables are), removed at the end:

1. `join_file`: a file's rows of every signals folder, joined on line (as `load_tables` joins them), with an
   evenly spaced sample of each column.
2. Percentile ranks (`rank_scores`), a range-partitioned sample sort per weighted signal: splitters from the
   samples (-inf, where NaN sorts, always one of them); per file, the documents per splitter value and per
   interval between splitters (`count_groups`); the driver turns those counts into offsets; an engine shuffle
   sends each interval's documents to one reduce task that sorts them and writes their mid-ranks
   (`rank_interval`); documents equal to a splitter get theirs from the counts alone. Equal values share an
   interval or a splitter, so no tie straddles two tasks. `assemble_scores` sums w_i / sum(w) * pct_i per
   file in the weights' order, as `combine_scores` does, so the scores are bitwise equal.
3. The budget (`find_boundaries`): per file, the eligible documents (size > 0) sorted by (-score, global
   index) with cumulative sizes; rounds of a weighted sample of keys per file, then per-file counts at the
   chosen splitters, narrow the range holding the first document that does not fit, until at most
   `max_candidates` documents remain and are fetched and walked. The greedy fill after it (`fill_candidates`)
   fetches the best `max_candidates` documents per file that still fit what is left, walks them in order up to
   the first file's last fetched key, and repeats until no file has one that fits. `top_fraction` is the same
   boundary over counts; mode dsir-resample the same over Gumbel keys (`gumbel_keys`: each file draws from the
   seed's one stream at its own offset, so the keys are `importance_resample`'s).
4. Summaries over all and chosen documents: quantiles are order statistics found by the same boundary search
   (batched over every column), interpolated as `np.percentile` does; means are numpy's pairwise sum,
   rebuilt from per-file sums of its subtrees (`pairwise_sums`).

One thing still scales with the corpus on the driver: the random baseline, whose permutation of the eligible
documents (one int64 each) is numpy's, drawn there so the bytes match `select_random` (their sizes are fetched in
batches). The mix comes from the write tasks, each counting its file's groups (`documents.write_records(mix=)`).
"""

from __future__ import annotations

import functools
import itertools
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixlm.engine import Engine
from mixlm.selection import SelectionError
from mixlm.selection.pick import rank_key

WORK = ".pick-work"
SAMPLES = 64  # values per file and column for splitters
LEAF = 128  # numpy's pairwise-sum block (numpy/_core/src/umath/loops_utils.h.src: PW_BLOCKSIZE)


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


def _path(work: str, kind: str, k: int) -> Path:
    return Path(work) / f"{kind}-{k:06d}.npy"


def _save(work: str, kind: str, k: int, array: np.ndarray) -> None:
    np.save(_path(work, kind, k), np.ascontiguousarray(array))


def _load(work: str, kind: str, k: int, mmap: bool = False) -> np.ndarray:
    return np.load(_path(work, kind, k), mmap_mode="r" if mmap else None)


def _even_sample(sorted_values: np.ndarray, n: int) -> np.ndarray:
    if sorted_values.size <= n:
        return np.asarray(sorted_values)
    if n <= 1:
        return np.asarray(sorted_values[sorted_values.size // 2:][:n])
    return np.asarray(sorted_values[(np.arange(n) * (sorted_values.size - 1)) // (n - 1)])


# ---- 1. joined per-file columns --------------------------------------------------------------------------
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
    _save(work, "line", k, line)
    samples = {}
    for c, v in columns.items():
        _save(work, f"col-{c}", k, v)
        samples[c] = _even_sample(np.sort(v[~np.isnan(v)]), SAMPLES)
    return {"documents": int(line.size), "names": names_per_dir, "samples": samples}


def _column(work: str, name: str, k: int, n: int) -> np.ndarray:
    path = _path(work, f"col-{name}", k)
    return np.load(path) if path.is_file() else np.zeros(n)  # a file with no documents has no columns


# ---- 2. percentile ranks by a sample sort ------------------------------------------------------------------
@dataclass(frozen=True)
class RankPlan:
    """Per weighted signal: its direction and its splitters (ascending keys, -inf first)."""

    signals: tuple[str, ...]
    directions: tuple[bool, ...]
    splitters: tuple[np.ndarray, ...]

    def buckets(self) -> list[tuple[int, int]]:
        """(signal, interval) of every shuffle bucket: interval i holds keys strictly between splitters i-1 and i."""
        return [(j, i) for j, s in enumerate(self.splitters) for i in range(s.size + 1)]


def _groups(key: np.ndarray, splitters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group, tie): the interval (or splitter, where tie) of each key."""
    lo = np.searchsorted(splitters, key, side="left")
    hi = np.searchsorted(splitters, key, side="right")
    return lo, hi > lo


def count_groups(common: tuple[str, RankPlan, Sequence[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """An engine task: per weighted signal, (documents per interval, documents equal to each splitter) of file k."""
    work, plan, counts = common
    out = []
    for name, direction, splitters in zip(plan.signals, plan.directions, plan.splitters):
        group, tie = _groups(rank_key(_column(work, name, k, counts[k]), direction), splitters)
        out.append((np.bincount(group[~tie], minlength=splitters.size + 1),
                    np.bincount(group[tie], minlength=splitters.size)))
    return out


def bucket_parts(common: tuple[str, RankPlan, Sequence[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A shuffle map task: for every (signal, interval) bucket, (rows, keys) of file k's documents in it."""
    work, plan, counts = common
    parts = []
    for name, direction, splitters in zip(plan.signals, plan.directions, plan.splitters):
        key = rank_key(_column(work, name, k, counts[k]), direction)
        group, tie = _groups(key, splitters)
        rows = np.flatnonzero(~tie)
        order = np.argsort(group[rows], kind="stable")
        rows = rows[order]
        bounds = np.searchsorted(group[rows], np.arange(splitters.size + 2))
        parts += [(rows[a:b], key[rows[a:b]]) for a, b in itertools.pairwise(bounds)]
    return parts


def rank_interval(common: tuple[str, list[int], int, Sequence[int]], item: tuple[int, list]) -> int:
    """A shuffle reduce task: bucket b's documents sorted, each given (offset + worse + equal / 2) / n; writes
    `rank-<b>-{file,row,pct}` sorted by (file, row). Returns the bucket's documents."""
    work, offsets, n, files = common
    b, parts = item
    file = np.concatenate([np.full(rows.size, files[i], np.int64) for i, (rows, _) in enumerate(parts)]
                          + [np.zeros(0, np.int64)])
    row = np.concatenate([rows for rows, _ in parts] + [np.zeros(0, np.int64)])
    key = np.concatenate([keys for _, keys in parts] + [np.zeros(0)])
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    worse = offsets[b] + np.cumsum(counts) - counts
    pct = (worse[inverse] + 0.5 * counts[inverse]) / n
    order = np.lexsort((row, file))
    _save(work, "rank-file", b, file[order])
    _save(work, "rank-row", b, row[order])
    _save(work, "rank-pct", b, pct[order])
    return int(key.size)


def assemble_scores(common: tuple[str, RankPlan, list[float], list[np.ndarray], list[np.ndarray], int,
                                  Sequence[int], Sequence[int]], k: int) -> None:
    """An engine task: file k's scores, sum_i (w_i / sum w) * pct_i in the weights' order (`combine_scores`'
    arithmetic), written as `score`."""
    work, plan, factors, tie_worse, tie_count, n, counts, first_bucket = common
    score = None
    for j, (name, direction, splitters) in enumerate(zip(plan.signals, plan.directions, plan.splitters)):
        group, tie = _groups(rank_key(_column(work, name, k, counts[k]), direction), splitters)
        pct = np.empty(counts[k])
        pct[tie] = (tie_worse[j][group[tie]] + 0.5 * tie_count[j][group[tie]]) / n
        for i in range(splitters.size + 1):
            b = first_bucket[j] + i
            file = _load(work, "rank-file", b, mmap=True)
            lo, hi = np.searchsorted(file, k, side="left"), np.searchsorted(file, k, side="right")
            if hi > lo:
                pct[np.asarray(_load(work, "rank-row", b, mmap=True)[lo:hi])] = \
                    _load(work, "rank-pct", b, mmap=True)[lo:hi]
        part = factors[j] * pct
        score = part if score is None else score + part
    _save(work, "score", k, score)


def rank_scores(engine: Engine, layout: Layout, weights: Sequence, samples: list[dict], buckets: int) -> None:
    """Writes every file's combined score (`score`), exactly `combine_scores` over the whole table."""
    total = sum(w.weight for w in weights)
    splitters = []
    for w in weights:
        pooled = rank_key(np.concatenate([s.get(w.signal, np.zeros(0)) for s in samples] + [np.zeros(0)]),
                       w.higher_is_better)
        pooled = np.sort(pooled)
        inner = _even_sample(pooled, buckets - 1) if pooled.size else pooled
        splitters.append(np.unique(np.concatenate([[-np.inf], inner])))
    plan = RankPlan(tuple(w.signal for w in weights), tuple(w.higher_is_better for w in weights), tuple(splitters))
    files = list(range(len(layout.files)))
    common = (layout.work, plan, layout.counts)
    per_file = engine.map(functools.partial(count_groups, common), files, desc="pick: rank counts")
    offsets, tie_worse, tie_count, first_bucket = [], [], [], []
    for j, s in enumerate(splitters):
        between = np.sum([c[j][0] for c in per_file], axis=0, dtype=np.int64)
        at = np.sum([c[j][1] for c in per_file], axis=0, dtype=np.int64)
        # groups in key order: interval 0, splitter 0, interval 1, ..., splitter L-1, interval L
        sizes = np.empty(2 * s.size + 1, np.int64)
        sizes[0::2], sizes[1::2] = between, at
        start = np.cumsum(sizes) - sizes
        first_bucket.append(len(offsets))
        offsets += start[0::2].tolist()
        tie_worse.append(start[1::2])
        tie_count.append(at)
    engine.shuffle(functools.partial(bucket_parts, common), files, len(offsets),
                   functools.partial(rank_interval, (layout.work, offsets, layout.total, files)), desc="pick: rank")
    factors = [w.weight / total for w in weights]
    engine.map(functools.partial(assemble_scores, (layout.work, plan, factors, tie_worse, tie_count, layout.total,
                                                   layout.counts, first_bucket)), files, desc="pick: scores")


# ---- sorted datasets and the boundary search --------------------------------------------------------------
def save_sorted(work: str, name: str, k: int, key: np.ndarray, index: np.ndarray,
                weight: np.ndarray | None = None) -> None:
    """A per-file dataset sorted by (key, index), with cumulative weights when given."""
    order = np.lexsort((index, key))
    _save(work, f"{name}.key", k, key[order])
    _save(work, f"{name}.idx", k, index[order])
    if weight is not None:
        _save(work, f"{name}.cum", k, np.cumsum(weight[order], dtype=np.int64))


Cut = tuple[float, int] | None  # a (key, index) position; None: the end


class _Sorted:
    def __init__(self, work: str, name: str, k: int, weighted: bool):
        self.key = _load(work, f"{name}.key", k, mmap=True)
        self.idx = _load(work, f"{name}.idx", k, mmap=True)
        self.cum = _load(work, f"{name}.cum", k, mmap=True) if weighted else None

    def position(self, cut: Cut) -> int:
        """The number of entries before `cut`."""
        if cut is None:
            return int(self.key.size)
        lo = int(np.searchsorted(self.key, cut[0], side="left"))
        hi = int(np.searchsorted(self.key, cut[0], side="right"))
        return lo + int(np.searchsorted(self.idx[lo:hi], cut[1], side="left"))

    def weight_before(self, pos: int) -> int:
        if self.cum is None:
            return pos
        return int(self.cum[pos - 1]) if pos else 0

    def weights(self, a: int, b: int) -> np.ndarray:
        if self.cum is None:
            return np.ones(b - a, np.int64)
        cum = np.asarray(self.cum[max(a - 1, 0):b])
        return np.diff(cum, prepend=0) if a == 0 else np.diff(cum)


def probe(common: tuple[str, int], job: tuple[int, list[tuple]]) -> list:
    """An engine task on file k, one answer per request: ("count", name, weighted, cuts) -> [(position, weight
    before)] per cut; ("sample", name, weighted, lo, hi) -> (documents in [lo, hi), evenly spaced keys
    [(key, idx)] among them); ("fetch", name, weighted, lo, hi) -> (keys, indices, weights) in [lo, hi)."""
    work, samples = common
    k, requests = job
    answers = []
    opened: dict[tuple[str, bool], _Sorted] = {}
    for request in requests:
        what, name, weighted = request[:3]
        if (name, weighted) not in opened:  # a dataset opened once per task, however many queries ask it
            opened[name, weighted] = _Sorted(work, name, k, weighted)
        data = opened[name, weighted]
        if what == "count":
            answers.append([(p, data.weight_before(p)) for p in map(data.position, request[3])])
            continue
        a, b = data.position(request[3]), data.position(request[4])
        if what == "sample":
            m = min(samples, b - a)
            at = np.unique(a + (np.arange(m) * (b - a)) // max(m, 1))
            answers.append((b - a, [(float(data.key[i]), int(data.idx[i])) for i in at]))
        else:
            answers.append((np.asarray(data.key[a:b]), np.asarray(data.idx[a:b]), data.weights(a, b)))
    return answers


@dataclass
class Boundary:
    """The entry found: its key, its global index, how many entries precede it and their weight."""

    key: float
    index: int
    position: int
    weight_before: int


def find_boundaries(engine: Engine, layout: Layout, queries: Sequence[tuple[str, bool, float]], *,
                    max_candidates: int = 4096, samples: int = 64, splitters: int = 256) -> list[Boundary | None]:
    """Per query (dataset, weighted, target W): the last entry in (key, index) order whose preceding weight is
    <= W, i.e. the first whose inclusion passes W; None when the whole dataset's weight is <= W. Weights are the
    dataset's sizes, or 1 per entry (then W = p finds the entry at position p)."""
    files = list(range(len(layout.files)))
    run = functools.partial(probe, (layout.work, samples))

    def ask(requests: dict[int, tuple]) -> list[dict[int, object]]:
        jobs = [(k, list(requests.values())) for k in files]
        answers = engine.map(run, jobs, desc="pick: search")
        return [dict(zip(requests, a)) for a in answers]

    n = len(queries)
    lo: list[Cut] = [(-np.inf, -1)] * n  # before every entry
    hi: list[Cut] = [None] * n
    result: list[Boundary | None] = [None] * n
    # where each range starts (per file position and weight before) and how many entries it holds
    counts = ask({q: ("count", name, weighted, [lo[q], None]) for q, (name, weighted, _) in enumerate(queries)})
    before = [sum(c[q][0][1] for c in counts) for q in range(n)]
    before_pos = [sum(c[q][0][0] for c in counts) for q in range(n)]
    size = [sum(c[q][1][0] - c[q][0][0] for c in counts) for q in range(n)]
    total = [sum(c[q][1][1] for c in counts) for q in range(n)]
    active = [q for q in range(n) if total[q] > queries[q][2]]
    while active:
        requests = {q: ("fetch" if size[q] <= max_candidates else "sample", queries[q][0], queries[q][1], lo[q],
                        hi[q]) for q in active}
        answers = ask(requests)
        narrow = {}
        for q in active:
            if requests[q][0] == "fetch":
                key = np.concatenate([a[q][0] for a in answers])
                idx = np.concatenate([a[q][1] for a in answers])
                weight = np.concatenate([a[q][2] for a in answers])
                order = np.lexsort((idx, key))
                weight_before = before[q] + np.cumsum(weight[order]) - weight[order]
                i = int(np.flatnonzero(weight_before <= queries[q][2])[-1])
                result[q] = Boundary(float(key[order][i]), int(idx[order][i]), before_pos[q] + i,
                                     int(weight_before[i]))
                continue
            # splitters strictly after the range's first entry, so every round leaves some entries out
            pooled = sorted((key, index, a[q][0] / len(a[q][1])) for a in answers for key, index in a[q][1]
                            if (key, index) != lo[q])
            cum = np.cumsum([w for _, _, w in pooled])
            picks = np.searchsorted(cum, np.linspace(0, cum[-1], min(splitters, len(pooled)) + 1)[1:], side="left")
            narrow[q] = sorted({pooled[min(i, len(pooled) - 1)][:2] for i in picks})
        active = [q for q in active if result[q] is None]
        if not narrow:
            continue
        counted = ask({q: ("count", queries[q][0], queries[q][1], narrow[q]) for q in narrow})
        for q, cuts in narrow.items():
            at = [(sum(c[q][i][0] for c in counted), sum(c[q][i][1] for c in counted)) for i in range(len(cuts))]
            fits = [i for i, (_, w) in enumerate(at) if w <= queries[q][2]]
            last_pos = before_pos[q] + size[q]
            if fits:
                i = fits[-1]
                lo[q], before_pos[q], before[q] = cuts[i], at[i][0], at[i][1]
            if (fits[-1] + 1 if fits else 0) < len(cuts):
                j = fits[-1] + 1 if fits else 0
                hi[q], last_pos = cuts[j], at[j][0]
            if last_pos - before_pos[q] >= size[q]:  # splitters lie inside the range: it always shrinks
                raise RuntimeError(f"pick: the search in {queries[q][0]} did not narrow ({size[q]} entries); "
                                   "the per-file datasets are not sorted by (key, index)")
            size[q] = last_pos - before_pos[q]
    return result


# ---- 3. the budget: boundary and greedy fill ---------------------------------------------------------------
def fill_candidates(common: tuple[str, int], job: tuple[int, Cut, float]) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """An engine task: file k's first `m` eligible documents at or after `cut` whose size is <= `left`, as
    (keys, indices, sizes) in order."""
    work, m = common
    k, cut, left = job
    data = _Sorted(work, "order", k, True)
    a = data.position(cut)
    sizes = data.weights(a, data.key.size)
    take = np.flatnonzero(sizes <= left)[:m] + a
    return np.asarray(data.key[take]), np.asarray(data.idx[take]), sizes[take - a]


def greedy_fill(engine: Engine, layout: Layout, cut: Cut, left: float, max_candidates: int
                ) -> tuple[list[int], list[float], list[int]]:
    """The documents the greedy pass of `top_parts` takes from `cut` on with `left` of the budget: (global
    indices, their keys, their sizes), in order."""
    taken, keys, sizes = [], [], []
    run = functools.partial(fill_candidates, (layout.work, max_candidates))
    while True:
        got = engine.map(run, [(k, cut, left) for k in range(len(layout.files))], desc="pick: fill")
        if not any(g[0].size for g in got):
            return taken, keys, sizes
        # a file that sent all it may send knows nothing after its last: walk up to the earliest such last
        limit = min(((float(g[0][-1]), int(g[1][-1])) for g in got if g[0].size == max_candidates),
                    default=None)
        key = np.concatenate([g[0] for g in got])
        idx = np.concatenate([g[1] for g in got])
        size = np.concatenate([g[2] for g in got])
        for i in np.lexsort((idx, key)):
            if limit is not None and (key[i], idx[i]) > limit:
                break
            if size[i] <= left:
                taken.append(int(idx[i]))
                keys.append(float(key[i]))
                sizes.append(int(size[i]))
                left -= int(size[i])
        cut = (limit[0], limit[1] + 1) if limit is not None else None
        if cut is None:
            return taken, keys, sizes


def order_dataset(common: tuple[str, str, Sequence[int], Sequence[int]], k: int) -> tuple[int, int, int]:
    """An engine task: file k's eligible documents (size > 0, score not NaN) by (-score, global index) with their
    sizes, as the `order` dataset. Returns (eligible documents, documents of size > 0, the size of all)."""
    work, size_column, counts, offsets = common
    score = _load(work, "score", k)
    sizes = _column(work, size_column, k, counts[k]).astype(np.int64)
    eligible = np.flatnonzero((sizes > 0) & ~np.isnan(score))
    save_sorted(work, "order", k, -score[eligible], offsets[k] + eligible, sizes[eligible])
    return int(eligible.size), int(np.count_nonzero(sizes > 0)), int(sizes.sum())


def gumbel_keys(common: tuple[str, str, int, Sequence[int]], job: tuple[int, int]) -> int:
    """An engine task: file k's resampling keys, log weight + Gumbel noise drawn from the seed's stream at the
    file's first document (numpy draws one 64-bit value per Gumbel unless it rejects an exact 0, which then
    shifts every later file: returned, so the driver can redo them); written as `score` (NaN where the log
    weight is NaN: never chosen)."""
    work, column, seed, counts = common
    k, draws_before = job
    log_w = _column(work, column, k, counts[k])
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(draws_before)
    noise = rng.gumbel(size=log_w.size)
    check = np.random.default_rng(seed)
    check.bit_generator.advance(draws_before + log_w.size)
    extra = 0
    while rng.bit_generator.state != check.bit_generator.state:  # a rejected draw (p = 2^-53 per document)
        check.random()
        extra += 1
    _save(work, "score", k, log_w + noise)
    return extra


@dataclass
class TopResult:
    """`top_parts` on the workers: the top documents are the eligible ones before `cut` (None: all of them)."""

    per_file: list[tuple[int, int, int]]  # (eligible documents, documents of size > 0, size of all) per file
    cut: Cut
    top_count: int
    threshold: float | None  # the lowest score among the top documents
    fill: list[int]  # global indices of the greedy fill, in order; their keys (-score) and sizes
    fill_keys: list[float]
    fill_sizes: list[int]


def budgeted_top(engine: Engine, layout: Layout, size_column: str, *, budget: float | None = None,
                 top_fraction: float | None = None, max_candidates: int = 4096) -> TopResult:
    """`top_parts(score, size)` over the `score` of every file (written by `rank_scores` or `gumbel_keys`)."""
    offsets = layout.offsets.tolist()
    per_file = engine.map(functools.partial(order_dataset, (layout.work, size_column, layout.counts, offsets)),
                          range(len(layout.files)), desc="pick: order")
    target = budget if budget is not None else math.floor(top_fraction * layout.total + 1e-9)
    boundary, = find_boundaries(engine, layout, [("order", budget is not None, target)],
                                max_candidates=max_candidates)
    cut: Cut = None if boundary is None else (boundary.key, boundary.index)
    top_count = sum(e for e, _, _ in per_file) if boundary is None else boundary.position
    fill, keys, sizes = [], [], []
    if budget is not None and boundary is not None:
        fill, keys, sizes = greedy_fill(engine, layout, cut, budget - boundary.weight_before, max_candidates)
    threshold = None
    if top_count:
        last, = find_boundaries(engine, layout, [("order", False, top_count - 1)], max_candidates=max_candidates)
        threshold = float(-last.key)
    return TopResult(per_file, cut, top_count, threshold, fill, keys, sizes)


# ---- 4. summaries --------------------------------------------------------------------------------------------
def summary_sets(common: tuple[str, list[tuple[str, str]], Sequence[int], Sequence[int]],
                 job: tuple[int, str, np.ndarray | None]) -> dict[str, int]:
    """An engine task: for each (summary name, source column) the non-NaN values of file k's documents in
    `rows` (None: all), in index order (`<set>-<name>.vals`) and sorted (`<set>-<name>` dataset). Returns the
    count per name."""
    work, sources, counts, offsets = common
    k, set_name, rows = job
    out = {}
    for name, source in sources:
        values = _load(work, "score", k) if source is None else _column(work, source, k, counts[k])
        index = np.arange(values.size) if rows is None else np.asarray(rows, np.int64)
        index = index[~np.isnan(values[index])]
        _save(work, f"{set_name}-{name}.vals", k, values[index])
        save_sorted(work, f"{set_name}-{name}", k, values[index], offsets[k] + index)
        out[name] = int(index.size)
    return out


def subtree_sums(common: str, job: tuple[int, list[tuple[str, int, int, bool]]]) -> list:
    """An engine task: for each (values, start, length, raw) of file k, the pairwise sum of that slice (numpy's
    own, from -0.0 so a subtree adds no zero of its own) or, raw, the slice itself."""
    work = common
    k, requests = job
    out = []
    for name, start, length, raw in requests:
        values = np.asarray(_load(work, name, k, mmap=True)[start:start + length])
        out.append(values if raw else float(np.add.reduce(values, initial=-0.0)))
    return out


def pairwise_sums(engine: Engine, layout: Layout, per_file: Sequence[tuple[str, Sequence[int]]]) -> list[float]:
    """np.sum of each concatenation of per-file arrays (name, count per file), exactly: numpy adds a block of
    <= 128 values with 8 accumulators and splits longer runs at n/2 rounded down to a multiple of 8; the
    subtrees inside one file are summed there, the blocks across a file boundary here."""
    requests: dict[int, list] = {}
    plans = []
    for name, counts in per_file:
        starts = np.concatenate([[0], np.cumsum(counts)])

        def node(lo: int, n: int, name=name, starts=starts):
            a = int(np.searchsorted(starts, lo, side="right")) - 1  # the file holding position lo
            if lo + n <= starts[a + 1]:  # inside file a
                requests.setdefault(a, []).append((name, lo - int(starts[a]), n, False))
                return ("sum", a, len(requests[a]) - 1)
            if n <= LEAF:
                pieces = []
                at = lo
                while at < lo + n:
                    f = int(np.searchsorted(starts, at, side="right")) - 1
                    take = min(int(starts[f + 1]), lo + n) - at
                    requests.setdefault(f, []).append((name, at - int(starts[f]), take, True))
                    pieces.append((f, len(requests[f]) - 1))
                    at += take
                return ("leaf", pieces)
            half = n // 2
            half -= half % 8
            return ("add", node(lo, half), node(lo + half, n - half))

        n = int(starts[-1])
        plans.append(node(0, n) if n else None)
    answers = engine.map(functools.partial(subtree_sums, layout.work), [(k, r) for k, r in requests.items()],
                         desc="pick: sums")
    got = dict(zip(requests, answers))

    def value(plan) -> float:
        if plan[0] == "sum":
            return got[plan[1]][plan[2]]
        if plan[0] == "leaf":
            return float(np.add.reduce(np.concatenate([got[f][i] for f, i in plan[1]]), initial=-0.0))
        return value(plan[1]) + value(plan[2])

    return [0.0 + value(p) if p is not None else 0.0 for p in plans]


QUANTILES = np.true_divide(np.asarray([10, 50, 90]), 100)  # as np.percentile turns [10, 50, 90] into fractions


def _quantile_positions(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.percentile's linear method over n sorted values: (previous, next positions, gamma)."""
    virtual = (n - 1) * QUANTILES
    previous = np.floor(virtual)
    nxt = previous + 1
    above = virtual >= n - 1
    previous[above], nxt[above] = -1, -1
    gamma = np.asanyarray(virtual - previous)
    previous, nxt = previous.astype(np.intp), nxt.astype(np.intp)
    return np.where(previous < 0, n + previous, previous), np.where(nxt < 0, n + nxt, nxt), gamma


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation (numpy.lib._function_base_impl._lerp), to the bit."""
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as np.percentile gives it (and warns)
        diff_b_a = b - a
        out = np.add(a, diff_b_a * t)
        np.subtract(b, diff_b_a * (1 - t), out=out, where=t >= 0.5)
    return out


def summaries(engine: Engine, layout: Layout, sources: list[tuple[str, str | None]], set_names: Sequence[str],
              counts: dict[str, list[dict[str, int]]], max_candidates: int) -> dict[str, dict[str, dict]]:
    """{set: {name: {mean, p10, p50, p90}}} over each set's non-NaN values, as `pick.summarize` computes them."""
    queries: dict[tuple[str, bool, float], int] = {}  # each order statistic asked once
    sums = []
    for s in set_names:
        for name, _ in sources:
            per_file = [c[name] for c in counts[s]]
            n = sum(per_file)
            sums.append((f"{s}-{name}.vals", per_file))
            if n:
                previous, nxt, _ = _quantile_positions(n)
                for p in np.concatenate([previous, nxt]):
                    queries.setdefault((f"{s}-{name}", False, float(p)), len(queries))
    found = find_boundaries(engine, layout, list(queries), max_candidates=max_candidates)
    totals = pairwise_sums(engine, layout, sums)
    values: dict[tuple[str, str], list[float]] = {}
    for s in set_names:
        for name, _ in sources:
            n = sum(c[name] for c in counts[s])
            if n:
                previous, nxt, _ = _quantile_positions(n)
                values[(s, name)] = [found[queries[(f"{s}-{name}", False, float(p))]].key
                                     for p in np.concatenate([previous, nxt])]
    out: dict[str, dict[str, dict]] = {s: {} for s in set_names}
    i = 0
    for s in set_names:
        for name, _ in sources:
            n = sum(c[name] for c in counts[s])
            total = totals[i]
            i += 1
            if not n:
                out[s][name] = {"mean": None, "p10": None, "p50": None, "p90": None}
                continue
            ordered = np.asarray(values[(s, name)])
            _, _, gamma = _quantile_positions(n)
            p10, p50, p90 = _lerp(ordered[:3], ordered[3:], gamma)
            mean = np.float64(total) / n
            out[s][name] = {"mean": float(mean), "p10": float(p10), "p50": float(p50), "p90": float(p90)}
    return out


# ---- the random baseline -------------------------------------------------------------------------------------
def eligible_sizes(common: tuple[str, str, Sequence[int]], job: tuple[int, np.ndarray]) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """An engine task: (rows, sizes) of file k's eligible documents (size > 0) at the given eligible ranks."""
    work, size_column, counts = common
    k, ranks = job
    sizes = _column(work, size_column, k, counts[k]).astype(np.int64)
    eligible = np.flatnonzero(sizes > 0)
    rows = eligible[ranks]
    return rows, sizes[rows]


def random_rows(engine: Engine, layout: Layout, size_column: str, eligible: Sequence[int], budget: float,
                seed: int, batch: int) -> list[np.ndarray]:
    """`select_random`'s documents as rows per file: the permutation of the eligible documents drawn here (as
    numpy permutes them), their sizes fetched `batch` at a time until the budget is passed."""
    permutation = np.random.default_rng(seed).permutation(int(sum(eligible)))
    starts = np.concatenate([[0], np.cumsum(eligible)])
    run = functools.partial(eligible_sizes, (layout.work, size_column, layout.counts))
    chosen: list[list[np.ndarray]] = [[] for _ in layout.files]
    spent = 0
    for a in range(0, permutation.size, batch):
        ranks = permutation[a:a + batch]
        file = np.searchsorted(starts, ranks, side="right") - 1
        present = np.unique(file).tolist()
        rows, sizes = np.empty(ranks.size, np.int64), np.empty(ranks.size, np.int64)
        for k, (r, z) in zip(present, engine.map(run, [(k, ranks[file == k] - starts[k]) for k in present],
                                                 desc="pick: random")):
            rows[file == k], sizes[file == k] = r, z
        cum = spent + np.cumsum(sizes)
        take = int(np.searchsorted(cum, budget, side="right"))  # as select_random cuts its cumulative sizes
        for k in present:
            chosen[k].append(rows[:take][file[:take] == k])
        if take < ranks.size:
            break
        spent = int(cum[-1])
    return [np.sort(np.concatenate(c + [np.zeros(0, np.int64)])) for c in chosen]


# ---- writing -----------------------------------------------------------------------------------------------------
def chosen_lines(common: tuple[str, str, Sequence[int], Sequence[int]], job: tuple[int, str, Cut, np.ndarray]
                 ) -> tuple[np.ndarray, int, int]:
    """An engine task: file k's chosen rows (the eligible documents before `cut`, all of them when `cut` is None,
    none when it is False; and the `extra` rows), saved as `<set>-<k>.lines.npz` (`line` and `size`, as
    `documents.write_records` reads them). Returns (rows, documents, their size)."""
    work, size_column, counts, offsets = common
    k, set_name, cut, extra = job
    sizes = _column(work, size_column, k, counts[k]).astype(np.int64)
    rows = np.asarray(extra, np.int64)
    if cut is not False:
        data = _Sorted(work, "order", k, True)
        top = np.asarray(data.idx[:data.position(cut)]) - offsets[k]
        rows = np.concatenate([top, rows])
    rows = np.sort(rows)
    np.savez(Path(work) / f"{set_name}-{k:06d}.lines.npz", line=_load(work, "line", k)[rows], size=sizes[rows])
    return rows, int(rows.size), int(sizes[rows].sum())




# ---- the whole selection -----------------------------------------------------------------------------------------
def select_on_workers(signal_dirs: Sequence[str | Path], weights: Mapping | None, out_dir: str | Path, *,
                      budget: float | None, top_fraction: float | None, budget_unit: str | None,
                      random_out: str | Path | None, seed: int, mode: str, resample_signal: str | None,
                      mix_field: str | None, engine: Engine | None, buckets: int = 64,
                      max_candidates: int = 4096, random_batch: int = 1 << 20) -> dict:
    """`pick.select_documents` (which see) with per-document work in `engine`'s tasks; the same files and report.
    `buckets`: sort intervals per weighted signal; `max_candidates`: documents fetched at once to the driver;
    `random_batch`: the random baseline's documents whose sizes are fetched at once."""
    from mixlm import storage
    from mixlm.engine import engine_or_local
    from mixlm.selection import pick

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
            layout, names, samples = _join(run_on, work, signal_dirs)
            budget_unit, size_column = pick.size_column_of(names, budget_unit, top_fraction)
            if mode == "top":
                parsed = pick.parse_weights(weights, names)
                rank_scores(run_on, layout, parsed, samples, buckets)
                method_parsed, score_source = parsed, None
            else:
                pick.check_resample_signal(resample_signal, names)
                _resample_keys(run_on, layout, resample_signal, seed)
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


def _join(engine: Engine, work: str, signal_dirs: Sequence[str | Path]) -> tuple[Layout, list[str], list[dict]]:
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


def _resample_keys(engine: Engine, layout: Layout, column: str, seed: int) -> None:
    """Every file's resampling keys (`gumbel_keys`) from one seeded stream; a file after a rejected draw is
    redone from its shifted start until the starts agree with the draws."""
    base = layout.offsets
    draws_before = base.copy()
    todo = list(range(len(layout.files)))
    extra = np.zeros(len(layout.files), np.int64)
    while todo:
        run = functools.partial(gumbel_keys, (layout.work, column, seed, layout.counts))
        got = engine.map(run, [(k, int(draws_before[k])) for k in todo], desc="pick: keys")
        extra[todo] = got
        shifted = base + np.concatenate([[0], np.cumsum(extra)])[:-1]
        todo = [k for k in range(len(layout.files)) if shifted[k] != draws_before[k]]
        draws_before = shifted


def _rows_per_file(layout: Layout, indices: np.ndarray) -> list[np.ndarray]:
    """Global document indices -> the rows of each file."""
    offsets = layout.offsets
    file = np.searchsorted(offsets, indices, side="right") - 1
    return [indices[file == k] - offsets[k] for k in range(len(layout.files))]
