"""The random baseline on the workers (`random_rows`): numpy's permutation of the eligible documents drawn on
the driver, their sizes fetched from the files in batches until the budget is passed."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mixlm.engine import Engine
from mixlm.selection.distributed_pick.work_files import Layout, load_column


def eligible_sizes(common: tuple[str, str, Sequence[int]], job: tuple[int, np.ndarray]) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """An engine task: (rows, sizes) of file k's eligible documents (size > 0) at the given eligible ranks."""
    work, size_column, counts = common
    k, ranks = job
    sizes = load_column(work, size_column, k, counts[k]).astype(np.int64)
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
