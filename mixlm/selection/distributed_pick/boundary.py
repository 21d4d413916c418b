"""Per-file datasets sorted by (key, index) and the search for the entry where their cumulative weight passes a
target (`find_boundaries`), by rounds of per-file samples and counts, with bounded candidate batches."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixlm.engine import Engine
from mixlm.selection.distributed_pick.work_files import Layout, load_array, save_array


def save_sorted(work: str, name: str, k: int, key: np.ndarray, index: np.ndarray,
                weight: np.ndarray | None = None) -> None:
    """A per-file dataset sorted by (key, index), with cumulative weights when given."""
    order = np.lexsort((index, key))
    save_array(work, f"{name}.key", k, key[order])
    save_array(work, f"{name}.idx", k, index[order])
    if weight is not None:
        save_array(work, f"{name}.cum", k, np.cumsum(weight[order], dtype=np.int64))


Cut = tuple[float, int] | None  # a (key, index) position; None: the end


class SortedDataset:
    """File k's dataset `name` as `save_sorted` wrote it, memory-mapped: keys, global indices and, weighted,
    cumulative weights."""

    def __init__(self, work: str, name: str, k: int, weighted: bool):
        self.key = load_array(work, f"{name}.key", k, mmap=True)
        self.idx = load_array(work, f"{name}.idx", k, mmap=True)
        self.cum = load_array(work, f"{name}.cum", k, mmap=True) if weighted else None

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
    opened: dict[tuple[str, bool], SortedDataset] = {}
    for request in requests:
        what, name, weighted = request[:3]
        if (name, weighted) not in opened:  # a dataset opened once per task, however many queries ask it
            opened[name, weighted] = SortedDataset(work, name, k, weighted)
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
