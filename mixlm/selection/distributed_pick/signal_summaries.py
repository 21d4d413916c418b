"""The report's summaries over all and chosen documents (`summaries`): quantiles as order statistics found by
the boundary search, means as numpy's pairwise sum rebuilt from per-file subtree sums (`pairwise_sums`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mixlm.engine import Engine
from mixlm.selection.distributed_pick.boundary import find_boundaries, save_sorted
from mixlm.selection.distributed_pick.work_files import Layout, load_array, load_column, save_array

LEAF = 128  # numpy's pairwise-sum block (numpy/_core/src/umath/loops_utils.h.src: PW_BLOCKSIZE)


def summary_sets(common: tuple[str, list[tuple[str, str]], Sequence[int], Sequence[int]],
                 job: tuple[int, str, np.ndarray | None]) -> dict[str, int]:
    """An engine task: for each (summary name, source column) the non-NaN values of file k's documents in
    `rows` (None: all), in index order (`<set>-<name>.vals`) and sorted (`<set>-<name>` dataset). Returns the
    count per name."""
    work, sources, counts, offsets = common
    k, set_name, rows = job
    out = {}
    for name, source in sources:
        values = load_array(work, "score", k) if source is None else load_column(work, source, k, counts[k])
        index = np.arange(values.size) if rows is None else np.asarray(rows, np.int64)
        index = index[~np.isnan(values[index])]
        save_array(work, f"{set_name}-{name}.vals", k, values[index])
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
        values = np.asarray(load_array(work, name, k, mmap=True)[start:start + length])
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
