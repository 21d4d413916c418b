"""`select pick` on an engine's workers (mixlm.selection.distributed_pick) against the whole-column functions of
mixlm.selection.pick: bitwise equal scores, the same top and fill as `top_parts`, the same summaries as
`summarize`, and `pick_documents.select_documents`' output bytes, with the driver never holding a per-document
column."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mixlm.engine import LocalEngine
from mixlm.selection import distributed_pick as dp
from mixlm.selection.pick import SignalWeight, combine_scores, select_random, summarize, top_parts


@pytest.fixture(scope="module")
def engine():
    with LocalEngine(1, progress=False) as own:
        yield own


def _split(n: int, files: int, rng: np.random.Generator) -> list[int]:
    """Sizes of `files` consecutive pieces of n (some empty)."""
    cuts = np.sort(rng.integers(0, n + 1, files - 1))
    return np.diff(np.concatenate([[0], cuts, [n]])).tolist()


def _layout(tmp_path, columns: dict[str, np.ndarray], counts: list[int]) -> tuple[dp.Layout, list[dict]]:
    """The per-file columns `join_file` would write, from whole columns split into files of `counts`."""
    work = tmp_path / f"work-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    samples = []
    starts = np.concatenate([[0], np.cumsum(counts)])
    for k, (a, b) in enumerate(itertools.pairwise(starts)):
        dp.save_array(str(work), "line", k, np.arange(1, b - a + 1))
        sample = {}
        for name, v in columns.items():
            dp.save_array(str(work), f"col-{name}", k, v[a:b])
            sample[name] = dp.even_sample(np.sort(v[a:b][~np.isnan(v[a:b])]), 8)
        samples.append(sample)
    return dp.Layout(str(work), tuple(f"file{k}" for k in range(len(counts))), tuple(counts)), samples


def _scores(layout: dp.Layout) -> np.ndarray:
    return np.concatenate([dp.load_array(layout.work, "score", k) for k in range(len(layout.files))])


def _table(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Few distinct values (many ties), NaNs, infinities, signed zeros; sizes with zeros."""
    a = rng.integers(0, 6, n).astype(np.float64)
    a[rng.random(n) < 0.2] = np.nan
    b = rng.choice([-np.inf, -1.5, -0.0, 0.0, 2.25, np.inf, np.nan], n)
    c = rng.standard_normal(n)
    size = rng.integers(0, 40, n).astype(np.float64)
    size[rng.random(n) < 0.1] = 0
    return {"a": a, "b": b, "c": c, "size": size}


@pytest.mark.parametrize("seed,files,buckets", [(0, 1, 2), (1, 3, 4), (2, 7, 64), (3, 12, 3), (4, 40, 8)])
def test_scores_and_top_parts_on_workers_equal_the_whole_column_ones(engine, tmp_path, seed, files, buckets):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(150, 400))
    columns = _table(rng, n)
    layout, samples = _layout(tmp_path, columns, _split(n, files, rng))
    weights = [SignalWeight("a", 1.0, True), SignalWeight("b", 0.7, False)]  # few distinct scores: ties by index
    if seed % 2:
        weights.append(SignalWeight("c", 2.0, seed == 1))
    dp.rank_scores(engine, layout, weights, samples, buckets)
    scores = _scores(layout)
    expected = combine_scores(columns, weights)
    assert scores.tobytes() == expected.tobytes()  # bitwise, not close
    sizes = columns["size"].astype(np.int64)
    for kw in ({"budget": 0}, {"budget": 17}, {"budget": 0.4 * sizes.sum()}, {"budget": 10 * sizes.sum()},
               {"top_fraction": 0.3}, {"top_fraction": 1.0}):
        top, fill = top_parts(expected, sizes, **kw)
        got = dp.budgeted_top(engine, layout, "size", max_candidates=int(rng.integers(1, 40)), **kw)
        rows = engine.map(lambda k, got=got: dp.chosen_lines((layout.work, "size", layout.counts,
                                                              layout.offsets.tolist()), (k, "t", got.cut, [])),
                          range(files))
        got_top = np.concatenate([r + o for (r, _, _), o in zip(rows, layout.offsets)])
        assert np.array_equal(got_top, np.sort(top)), kw
        assert got.top_count == top.size
        assert got.fill == fill.tolist(), kw
        assert got.fill_sizes == sizes[fill].tolist()
        assert got.threshold == (float(expected[top].min()) if top.size else None)


def test_the_random_baseline_on_workers_is_select_randoms_in_batches(engine, tmp_path):
    rng = np.random.default_rng(5)
    sizes = rng.integers(0, 9, 500).astype(np.float64)
    counts = _split(500, 6, rng)
    layout, _ = _layout(tmp_path, {"size": sizes}, counts)
    eligible = [int(np.count_nonzero(sizes[o:o + c] > 0)) for o, c in zip(layout.offsets, counts)]
    for budget, batch in ((0, 5), (300, 7), (300, 10_000), (10_000, 64)):
        rows = dp.random_rows(engine, layout, "size", eligible, budget, seed=11, batch=batch)
        got = np.concatenate([r + o for r, o in zip(rows, layout.offsets)])
        assert np.array_equal(got, select_random(sizes.astype(np.int64), budget, 11)), (budget, batch)


def test_order_statistics_and_means_on_workers_equal_numpys(engine, tmp_path):
    rng = np.random.default_rng(7)
    n = 3000
    columns = {"x": rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n),
               "y": rng.choice([np.nan, 1.0, 2.0, -0.0], n),
               "z": np.full(n, np.nan),
               "w": np.where(rng.random(n) < 0.995, np.nan, rng.standard_normal(n))}
    counts = _split(n, 9, rng)
    layout, _ = _layout(tmp_path, columns, counts)
    chosen = np.sort(rng.choice(n, 700, replace=False))
    offsets = layout.offsets
    sources = [(name, name) for name in columns]
    common = (layout.work, sources, layout.counts, offsets.tolist())
    per_set = {"all": [dp.summary_sets(common, (k, "all", None)) for k in range(9)],
               "sel": [dp.summary_sets(common, (k, "sel", chosen[(chosen >= o) & (chosen < o + c)] - o))
                       for k, (o, c) in enumerate(zip(offsets, counts))]}
    got = dp.summaries(engine, layout, sources, ["all", "sel"], per_set, max_candidates=50)
    expected = summarize(columns, chosen)
    assert json.dumps({k: {"all": got["all"][k], "selected": got["sel"][k]} for k in columns}) == json.dumps(expected)


def test_pairwise_sums_across_file_boundaries_are_numpys_sum(engine, tmp_path):
    rng = np.random.default_rng(3)
    for n in (1, 8, 129, 1000, 20001):
        values = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 12, n)
        counts = _split(n, 6, rng)
        layout, _ = _layout(tmp_path, {"v": values}, counts)
        got, = dp.pairwise_sums(engine, layout, [("col-v", counts)])
        assert got == float(np.sum(values)), n


@pytest.fixture(scope="module")
def signal_dirs(tmp_path_factory):
    """Rule signals and, in a second folder, a rating column, over four files of two domains (one parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mixlm.selection.signal_tables import TableSettings, compute_tables

    root = tmp_path_factory.mktemp("pick-corpus")
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]

    def doc(i: int) -> dict:
        record = {"text": " ".join(rng.choice(vocab, int(rng.integers(3, 40)))), "domain": ["web", "code"][i % 2]}
        if i % 5:
            record["lw"] = float(rng.choice([-1.0, 0.5, 2.0, -np.inf]))  # ties; missing -> NaN
        return record

    files = []
    for k, n in enumerate([40, 0, 25, 33]):
        records = [doc(i) for i in range(n)]
        path = root / f"part-{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + ("{bad json\n" if k == 2 else ""))
        files.append(str(path))
    pq.write_table(pa.table({"text": [doc(i)["text"] for i in range(12)], "domain": ["books"] * 12}),
                   root / "part-9.parquet")
    files.append(str(root / "part-9.parquet"))
    rules, rated = root / "rules", root / "rated"
    compute_tables(files, rules, TableSettings(), engine=LocalEngine(1, progress=False))
    compute_tables(files[:4], rated, TableSettings(rules=False, rating_columns=("lw",)),
                   engine=LocalEngine(1, progress=False))
    return [str(rules), str(rated)]


def _outputs(out) -> dict[str, bytes]:
    """Every file under `out`, its own path written as OUT (the reports name the random baseline's folder)."""
    return {str(p.relative_to(out)): p.read_bytes().replace(str(out).encode(), b"OUT")
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # np.percentile between -inf and -inf
@pytest.mark.parametrize("kw", [
    {"weights": {"word_count": {"weight": 1.0, "higher_is_better": True}, "frac_unique_words": {"weight": 2.0, "higher_is_better": False},
                 "lw": 0.5}, "budget": 900, "budget_unit": "words"},
    {"weights": {"num_chars": {"weight": 1.0, "higher_is_better": False}, "lw": 3.0}, "top_fraction": 0.35},
    {"weights": None, "mode": "dsir-resample", "resample_signal": "lw", "budget": 4000, "budget_unit": "chars",
     "seed": 3},
])
def test_select_documents_on_workers_writes_the_bytes_of_the_whole_column_path(signal_dirs, tmp_path, monkeypatch,
                                                                                kw):
    from mixlm.selection import pick_documents, signal_tables

    kw = dict(kw)
    weights = kw.pop("weights")
    reports = {}
    # worker processes once (the tasks and their arguments travel), this process otherwise (faster)
    with LocalEngine(2 if "budget_unit" in kw and weights else 1, progress=False) as engine:
        for distributed in (False, True):
            if distributed:  # the driver never loads a whole column
                monkeypatch.setattr(signal_tables, "load_tables", _refuse)
                monkeypatch.setattr(pick_documents, "load_tables", _refuse)
            out = tmp_path / str(distributed)
            report = pick_documents.select_documents(signal_dirs, weights, out / "top", random_out=out / "rnd",
                                                     engine=engine, distributed=distributed, **kw)
            reports[distributed] = json.dumps(report).replace(str(out), "OUT")
    assert reports[True] == reports[False]
    assert _outputs(tmp_path / "True") == _outputs(tmp_path / "False")
    report = json.loads(reports[True])
    assert report["documents_out"] > 0 and report["random_baseline"]["documents_out"] > 0
    assert not (tmp_path / "True" / "top" / dp.WORK).exists()


def _refuse(*args, **kwargs):
    raise AssertionError("load_tables called on the distributed path")
