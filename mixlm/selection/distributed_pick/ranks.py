"""Percentile ranks of the weighted signals by a range-partitioned sample sort over the engine (`rank_scores`),
combined per file into the `score` arrays, bitwise `combine_scores`'."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixlm.engine import Engine
from mixlm.selection.distributed_pick.work_files import (
    Layout,
    even_sample,
    load_array,
    load_column,
    save_array,
)
from mixlm.selection.pick import rank_key


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
        group, tie = _groups(rank_key(load_column(work, name, k, counts[k]), direction), splitters)
        out.append((np.bincount(group[~tie], minlength=splitters.size + 1),
                    np.bincount(group[tie], minlength=splitters.size)))
    return out


def bucket_parts(common: tuple[str, RankPlan, Sequence[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A shuffle map task: for every (signal, interval) bucket, (rows, keys) of file k's documents in it."""
    work, plan, counts = common
    parts = []
    for name, direction, splitters in zip(plan.signals, plan.directions, plan.splitters):
        key = rank_key(load_column(work, name, k, counts[k]), direction)
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
    save_array(work, "rank-file", b, file[order])
    save_array(work, "rank-row", b, row[order])
    save_array(work, "rank-pct", b, pct[order])
    return int(key.size)


def assemble_scores(common: tuple[str, RankPlan, list[float], list[np.ndarray], list[np.ndarray], int,
                                  Sequence[int], Sequence[int]], k: int) -> None:
    """An engine task: file k's scores, sum_i (w_i / sum w) * pct_i in the weights' order (`combine_scores`'
    arithmetic), written as `score`."""
    work, plan, factors, tie_worse, tie_count, n, counts, first_bucket = common
    score = None
    for j, (name, direction, splitters) in enumerate(zip(plan.signals, plan.directions, plan.splitters)):
        group, tie = _groups(rank_key(load_column(work, name, k, counts[k]), direction), splitters)
        pct = np.empty(counts[k])
        pct[tie] = (tie_worse[j][group[tie]] + 0.5 * tie_count[j][group[tie]]) / n
        for i in range(splitters.size + 1):
            b = first_bucket[j] + i
            file = load_array(work, "rank-file", b, mmap=True)
            lo, hi = np.searchsorted(file, k, side="left"), np.searchsorted(file, k, side="right")
            if hi > lo:
                pct[np.asarray(load_array(work, "rank-row", b, mmap=True)[lo:hi])] = \
                    load_array(work, "rank-pct", b, mmap=True)[lo:hi]
        part = factors[j] * pct
        score = part if score is None else score + part
    save_array(work, "score", k, score)


def rank_scores(engine: Engine, layout: Layout, weights: Sequence, samples: list[dict], buckets: int) -> None:
    """Writes every file's combined score (`score`), exactly `combine_scores` over the whole table."""
    total = sum(w.weight for w in weights)
    splitters = []
    for w in weights:
        pooled = rank_key(np.concatenate([s.get(w.signal, np.zeros(0)) for s in samples] + [np.zeros(0)]),
                       w.higher_is_better)
        pooled = np.sort(pooled)
        inner = even_sample(pooled, buckets - 1) if pooled.size else pooled
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
