"""The budget on the workers: the eligible documents ordered by score, the boundary of the budget or top
fraction and the greedy fill after it (`budgeted_top`), and dsir-resample's Gumbel keys (`resample_keys`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixlm.engine import Engine
from mixlm.selection.distributed_pick.boundary import Cut, SortedDataset, find_boundaries, save_sorted
from mixlm.selection.distributed_pick.work_files import Layout, load_array, load_column, save_array


def fill_candidates(common: tuple[str, int], job: tuple[int, Cut, float]) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """An engine task: file k's first `m` eligible documents at or after `cut` whose size is <= `left`, as
    (keys, indices, sizes) in order."""
    work, m = common
    k, cut, left = job
    data = SortedDataset(work, "order", k, True)
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
    score = load_array(work, "score", k)
    sizes = load_column(work, size_column, k, counts[k]).astype(np.int64)
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
    log_w = load_column(work, column, k, counts[k])
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(draws_before)
    noise = rng.gumbel(size=log_w.size)
    check = np.random.default_rng(seed)
    check.bit_generator.advance(draws_before + log_w.size)
    extra = 0
    while rng.bit_generator.state != check.bit_generator.state:  # a rejected draw (p = 2^-53 per document)
        check.random()
        extra += 1
    save_array(work, "score", k, log_w + noise)
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


def resample_keys(engine: Engine, layout: Layout, column: str, seed: int) -> None:
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
