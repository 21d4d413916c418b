"""The Ray engine against the local one, on a real local Ray cluster (2 CPUs, started once for this file):
prepare, signals, dedup and pick over a multi-file, multi-domain corpus write the same bytes on both (with a
worker killed and an I/O error injected on Ray, retried); malformed records are counted as locally;
near-duplicates planted in two different files are found; a driver killed mid-run resumes without redoing
finished shards; a second job on an output folder is refused in one line."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from engine_faults import FaultyEngine, LoadRecordingEngine

from mixlm.data.prepare import STATS_FILE, PrepareOptions, prepare_domains
from mixlm.data.tokenizer import train_tokenizer_from_texts
from mixlm.engine import EngineError, LocalEngine, make_engine

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster on this host (2 CPUs) whose workers import this checkout and tests/ (for the fault
    wrappers); the GCS address for a second driver."""
    path = os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                       runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def ray_engine(cluster):
    with make_engine("ray", workers=2, progress=False) as engine:
        yield engine


# ---- the corpus: two domains, five files, three formats, malformed records, near-duplicates across files -----
def _words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    web = [_words(rng, rng.randint(60, 120), vocab) for _ in range(90)]
    code = [f"def f{i}(x):\n    return x + {i}  # " + _words(rng, rng.randint(5, 30), vocab) for i in range(40)]
    copies = []  # near-copies of web[0..5] (two words changed), planted in another file than their originals
    for i in range(6):
        words = web[i].split()
        for k in (3, 40):
            words[k] = "planted"
        copies.append(" ".join(words))
    (root / "web").mkdir()
    lines_a = [json.dumps({"text": t, "domain": "web"}) for t in web[:45]]
    lines_a[7:7] = ["{not json", json.dumps({"text": ""}), json.dumps({"body": "no text field"})]
    (root / "web" / "a.jsonl").write_text("\n".join(lines_a) + "\n")
    lines_b = [json.dumps({"text": t, "domain": "web"}) for t in web[45:] + copies[:3]]
    lines_b.insert(3, json.dumps({"text": 7}))
    (root / "web" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines_b) + "\n")
                                                                                    .encode()))
    lines_c = [json.dumps({"text": t, "domain": "web"}) for t in copies[3:] + [web[20]]]  # web[20]: exact copy
    (root / "web" / "c.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines_c) + "\n").encode() + b"\xff\xfe\n"))
    (root / "code").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": code[:25], "domain": ["code"] * 25}), root / "code" / "part-0.parquet")
    (root / "code" / "part-1.jsonl").write_text("".join(json.dumps({"text": t, "domain": "code"}) + "\n"
                                                        for t in code[25:]))
    tokenizer = train_tokenizer_from_texts(web + code, root / "tok", vocab_size=400)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.parent.name in ("web", "code"))
    return {"root": root, "tokenizer": str(tokenizer), "files": files, "web": web, "copies": copies,
            "malformed": {"web": {"invalid_json": 1, "empty": 1, "missing_field": 2, "invalid_utf8": 1}}}


def _bytes(root: Path, skip=(STATS_FILE, ".mixlm.lock")) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def _prepare_options(corpus, **kw) -> PrepareOptions:
    return PrepareOptions(**{"tokenizer": corpus["tokenizer"], "progress": False, "validation_docs": 4,
                             "shard_tokens": 1500, "chunk_docs": 16, "batch_docs": 8, **kw})


def _domains(corpus) -> dict[str, list[str]]:
    return {"web": [str(corpus["root"] / "web")], "code": [str(corpus["root"] / "code")]}


# ---- the engines alone --------------------------------------------------------------------------------------
def _times_ten(x: int) -> int:
    return 10 * x


def _refuse(x: int) -> int:
    from mixlm.errors import PrepareError

    raise PrepareError(f"input {x} is bad: fix it")


def _split_by_parity(x: int) -> list[list[int]]:
    return [[x] if x % 2 == b else [] for b in range(2)]


def _gather(item) -> list[int]:
    bucket, parts = item
    return [bucket] + [x for part in parts for x in part]


@pytest.mark.parametrize("kind", ["local", "ray"])
@pytest.mark.parametrize("how", ["die", "raise"])
def test_an_engine_returns_results_in_order_and_retries_a_dead_worker_or_an_io_error(kind, how, cluster,
                                                                                     tmp_path):
    engine = make_engine(kind, workers=2, progress=False)
    try:
        faulty = FaultyEngine(engine, tmp_path / "faults", how)
        assert faulty.map(_times_ten, range(7)) == [0, 10, 20, 30, 40, 50, 60]
        assert faulty.fired() == [f"{how}-test_ray_engine._times_ten"]  # it failed once, for real, and was retried
        assert faulty.shuffle(_split_by_parity, range(5), 2, _gather) == [[0, 0, 2, 4], [1, 1, 3]]
        with pytest.raises(Exception) as raised:  # the task's own error, as raised: no wrapper, no traceback text
            engine.map(_refuse, range(3))
        assert type(raised.value).__name__ == "PrepareError" and str(raised.value) == "input 0 is bad: fix it"
    finally:
        engine.close()


def _dies_on_one(x: int) -> int:
    if x == 1:
        os._exit(9)
    return x


def test_a_worker_that_dies_every_time_is_one_error_naming_the_item(cluster):
    for kind in ("local", "ray"):
        with make_engine(kind, workers=2, progress=False, max_retries=1) as engine, \
                pytest.raises(EngineError, match="item 1 of 3 failed"):
            engine.map(_dies_on_one, [0, 1, 2])


# ---- prepare ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-prepared")
    manifests = prepare_domains(_domains(corpus), out, _prepare_options(corpus))
    return out, manifests


def test_prepare_on_ray_writes_the_bytes_of_a_local_prepare_despite_a_dead_worker(corpus, local_prepared,
                                                                                 ray_engine, tmp_path):
    local_out, local_manifests = local_prepared
    assert len(list((local_out / "web").glob("train-*.array_record"))) > 3
    faulty = FaultyEngine(ray_engine, tmp_path / "faults", "die")
    manifests = prepare_domains(_domains(corpus), tmp_path / "ray", _prepare_options(corpus), faulty)
    assert "die-mixlm.data.tokenize_chunks.tokenize_unit" in faulty.fired()
    assert "die-mixlm.data.prepare.write_shard" in faulty.fired()
    assert _bytes(tmp_path / "ray") == _bytes(local_out)
    for domain in ("web", "code"):  # malformed records counted per file, as locally
        assert manifests[domain].malformed == local_manifests[domain].malformed
    assert {k: v for k, v in manifests["web"].malformed.items() if v} == corpus["malformed"]["web"]
    # the same bytes again with 2 local worker processes, and an I/O error retried on Ray
    prepare_domains(_domains(corpus), tmp_path / "local2", _prepare_options(corpus, workers=2))
    assert _bytes(tmp_path / "local2") == _bytes(local_out)
    faulty = FaultyEngine(ray_engine, tmp_path / "faults-io", "raise")
    prepare_domains(_domains(corpus), tmp_path / "ray-io", _prepare_options(corpus), faulty)
    assert _bytes(tmp_path / "ray-io") == _bytes(local_out)


def test_a_killed_ray_driver_resumes_without_rewriting_finished_shards(corpus, local_prepared, cluster, tmp_path):
    local_out, _ = local_prepared
    out = tmp_path / "out"
    args = {"address": cluster, "domains": _domains(corpus), "out": str(out), "desc": "prepare: shards", "after": 3,
            "options": {k: v for k, v in vars(_prepare_options(corpus)).items()}}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    killed = subprocess.run([sys.executable, str(TESTS / "engine_faults.py"), json.dumps(args)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "killing the driver after 3 tasks" in killed.stdout
    time.sleep(1)  # tasks of the dead driver's job are cancelled by the cluster
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for d in ("web", "code")
                for p in (out / d).glob("*.array_record") if (out / d / ".work" / f"{p.name}.json").is_file()}
    assert len(finished) >= 3
    assert not (out / "web" / "manifest.json").exists()
    with make_engine("ray", workers=2, progress=False) as engine:
        prepare_domains(_domains(corpus), out, _prepare_options(corpus), engine)
    for d in ("web", "code"):
        for p in (out / d).glob("*.array_record"):
            if p.name in finished:  # kept as the killed run left it: not rewritten
                assert (p.stat().st_ino, p.stat().st_mtime_ns) == finished[p.name], p
    assert _bytes(out) == _bytes(local_out)


# ---- selection --------------------------------------------------------------------------------------------
def _signals(corpus, out, engine, **settings):
    from mixlm.selection.signal_tables import TableSettings, compute_tables

    return compute_tables(corpus["files"], out, TableSettings(tokenizer=corpus["tokenizer"], **settings),
                          engine=engine)


def _tables(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.signals.parquet"))}


def _without_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


def _no_whole_columns(*args, **kwargs):
    raise AssertionError("a selection on the workers loaded whole signal columns on the driver")


def test_signals_and_pick_on_ray_write_the_bytes_of_local_runs(corpus, ray_engine, tmp_path, monkeypatch):
    from mixlm.cli import main
    from mixlm.selection import signal_tables
    from mixlm.selection.pick_documents import select_documents

    local = _signals(corpus, tmp_path / "sig-local", LocalEngine(1, progress=False))
    on_ray = _signals(corpus, tmp_path / "sig-ray", FaultyEngine(ray_engine, tmp_path / "faults", "die"))
    assert len(_tables(tmp_path / "sig-local")) == len(corpus["files"])
    assert _tables(tmp_path / "sig-ray") == _tables(tmp_path / "sig-local")
    assert _without_seconds(on_ray)["malformed"] == local["malformed"] == corpus["malformed"]["web"]
    assert on_ray["documents"] == local["documents"] == 90 + 6 + 1 + 40
    weights = {"word_count": {"weight": 1.0, "higher_is_better": True},
               "frac_unique_words": {"weight": 2.0, "higher_is_better": True}}
    picked = {}
    for name, engine in (("local", LocalEngine(2, progress=False)), ("ray", ray_engine)):
        out, signals = tmp_path / f"pick-{name}", tmp_path / f"sig-{name}"
        with monkeypatch.context() as patch:
            if name == "ray":  # pick on Ray runs distributed: the driver never holds a per-document column
                patch.setattr(signal_tables, "load_tables", _no_whole_columns)
            report = select_documents([signals], weights, out, budget=4000, random_out=out / "random",
                                      engine=engine)
        report = json.loads(json.dumps(report).replace(str(out), "OUT").replace(str(signals), "SIG"))
        picked[name] = (report, (out / "documents.jsonl.zst").read_bytes(),
                        (out / "random" / "documents.jsonl.zst").read_bytes())
        if name == "local":
            engine.close()
    assert picked["ray"] == picked["local"]
    assert 0 < picked["ray"][0]["tokens_out"] <= 4000
    # `mixlm select pick --engine ray` on two signal folders: the bytes of `--engine local`
    outputs = {}
    for name in ("local", "ray"):
        out = tmp_path / f"cli-{name}"
        with monkeypatch.context() as patch:
            if name == "ray":
                patch.setattr(signal_tables, "load_tables", _no_whole_columns)
            assert main(["select", "pick", "--signals", str(tmp_path / "sig-local"), str(tmp_path / "sig-ray"),
                         "--weights", json.dumps(weights), "--top-fraction", "0.4", "--out", str(out),
                         "--random-out", str(out / "random"), "--engine", name]) == 0
        outputs[name] = {p.relative_to(out): p.read_bytes().replace(str(out).encode(), b"OUT")
                         for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".mixlm.lock"}
    assert outputs["ray"] == outputs["local"]
    assert len(outputs["ray"]) == 4


def test_a_classifier_is_loaded_once_per_ray_actor_not_per_shard(corpus, ray_engine, tmp_path):
    from mixlm.selection.classifier import train_classifier
    from mixlm.selection.signal_tables import TableSettings, compute_tables

    model = tmp_path / "clf"
    train_classifier(corpus["web"][:40], [f"def g{i}(y): return y * {i}" for i in range(40)], model)
    settings = TableSettings(rules=False, classifier=str(model))
    log = tmp_path / "loads.txt"
    report = compute_tables(corpus["files"], tmp_path / "ray", settings, engine=LoadRecordingEngine(ray_engine, log))
    compute_tables(corpus["files"], tmp_path / "local", settings, engine=LocalEngine(1, progress=False))
    assert _tables(tmp_path / "ray") == _tables(tmp_path / "local")
    loads = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(loads) == len(corpus["files"]) == 5 and report["documents"] == 137
    processes = {pid for pid, _ in loads}
    assert len(processes) <= 2  # the 2 actors scored all 5 files
    assert all(misses == 1 for _, misses in loads)  # each loaded the model once, for its first file only


def _kept_texts(path: Path) -> list[str]:
    with zstandard.ZstdDecompressor().stream_reader(open(path, "rb")) as f:
        return [json.loads(line)["text"] for line in f.read().decode().splitlines()]


@pytest.mark.parametrize("method", ["exact", "minhash", "bloom"])
def test_dedup_on_ray_finds_duplicates_across_files_as_one_local_pass_does(method, corpus, ray_engine, tmp_path):
    from mixlm.selection import dedup
    from mixlm.selection.documents import BadLines, iter_texts
    from mixlm.selection.pipeline import dedup_documents

    options = {"minhash": {"threshold": 0.7}, "bloom": {"threshold": 0.8, "ngram": 5}}.get(method, {})
    reports = {}
    for name, engine in (("local", None), ("ray", FaultyEngine(ray_engine, tmp_path / "faults", "die"))):
        reports[name] = dedup_documents(corpus["files"], tmp_path / name, method, options, engine=engine)
    local_bytes = (tmp_path / "local" / "documents.jsonl.zst").read_bytes()
    assert (tmp_path / "ray" / "documents.jsonl.zst").read_bytes() == local_bytes
    assert _without_seconds(reports["ray"]) == _without_seconds(reports["local"])
    # one pass of the in-memory algorithm over every document in order keeps the same documents
    texts = [t for _, _, t in iter_texts(corpus["files"], "text", BadLines())]
    if method == "exact":
        keep = dedup.exact_keep(texts)
    elif method == "minhash":
        keep = dedup.fuzzy_keep(texts, dedup.MinHashSettings(threshold=0.7))[0]
    else:
        keep = dedup.bloom_keep(texts, dedup.BloomSettings(threshold=0.8, ngram=5))
    kept = _kept_texts(tmp_path / "ray" / "documents.jsonl.zst")
    assert kept == [t for t, k in zip(texts, keep) if k]
    assert corpus["web"][20] in kept and kept.count(corpus["web"][20]) == 1  # the exact copy (file c) is dropped
    if method != "exact":  # the near-copies, planted in files b and c, are found though their originals are in a
        assert not set(corpus["copies"]) & set(kept)
    assert reports["ray"]["malformed_lines"] == sum(corpus["malformed"]["web"].values())


def test_a_second_select_job_on_an_output_folder_is_refused_in_one_line(corpus, tmp_path, capsys):
    from mixlm.cli import main
    from mixlm.folder_lock import writer_lock
    from mixlm.selection import SelectionError

    out = tmp_path / "sig"
    with writer_lock(out, "mixlm select signals", SelectionError):
        code = main(["select", "signals", *corpus["files"], "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mixlm select: error: {out} is being written by another mixlm select signals (host ")
    assert not list(out.glob("*.parquet"))


def test_the_cli_runs_prepare_and_select_on_the_ray_cluster(corpus, local_prepared, cluster, tmp_path, capsys):
    from mixlm.cli import main

    local_out, _ = local_prepared
    domains = [f"--domain={d}={s[0]}" for d, s in _domains(corpus).items()]
    assert main(["prepare", "--out", str(tmp_path / "p"), "--tokenizer", corpus["tokenizer"], "--no-progress",
                 "--validation-docs", "4", "--shard-tokens", "1500", "--chunk-docs", "16", "--batch-docs", "8",
                 *domains, "--engine", "ray", "--ray-address", cluster]) == 0
    assert _bytes(tmp_path / "p") == _bytes(local_out)
    err = capsys.readouterr().err
    assert "prepare web: 97 documents" in err and "5 malformed records" in err
    assert main(["select", "dedup", *corpus["files"], "--method", "minhash", "--threshold", "0.7", "--out", str(tmp_path / "d"),
                 "--engine", "ray"]) == 0
    assert "dedup minhash: kept 130 of 137 documents (7 removed)" in capsys.readouterr().out


def _stage_files(out: Path) -> dict[str, bytes]:
    """A select run's documents and reports (without seconds, nor whether a stage was reused)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.name == "documents.jsonl.zst":
            files[str(p.relative_to(out))] = p.read_bytes()
        elif p.name == "report.json":
            report = _without_seconds(json.loads(p.read_text()))
            for row in report.get("stages", []):
                row.pop("seconds"), row.pop("reused")
            files[str(p.relative_to(out))] = report
    return files


def test_select_run_on_ray_chooses_on_the_workers_a_task_per_file_with_the_bytes_of_local(corpus, ray_engine,
                                                                                          tmp_path, monkeypatch):
    """heuristics -> exact dedup -> classifier keep_top_fraction, the cut inside a group of tied scores: the same
    bytes on both engines, no whole column on the driver, the later stages a task per input file."""
    import numpy as np

    from mixlm.selection import pick, signal_tables
    from mixlm.selection.classifier import load_classifier, train_classifier
    from mixlm.selection.pipeline import run_pipeline

    # "w1.w2" and "w1 w2" are one feature set to the classifier but differ to exact dedup: tied scores
    ties = [" ".join(t.split()[:k]) + "." + " ".join(t.split()[k:]) for t in corpus["web"][30:33] for k in (1, 2, 3)]
    (tmp_path / "ties.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ties))
    files = [*corpus["files"], str(tmp_path / "ties.jsonl")]
    model = tmp_path / "clf"
    train_classifier(corpus["web"][:40], [f"def g{i}(y): return y * {i}" for i in range(40)], model)
    stages = [{"name": "rules", "kind": "heuristics", "rules": [{"signal": "word_count", "min": 8}]},
              {"name": "exact", "kind": "exact_dedup"}]
    run = tmp_path / "run"
    run_pipeline({"stages": stages}, files, run, engine=LocalEngine(1, progress=False))
    texts = _kept_texts(run / "02-exact" / "documents.jsonl.zst")  # the classifier stage's input, in order
    scores = load_classifier(model).score(texts)
    order = np.lexsort((np.arange(len(texts)), -scores))
    tied = next(i for i in range(len(order) - 1) if scores[order[i]] == scores[order[i + 1]])
    fraction = (tied + 1.5) / len(texts)  # keeps the first of a tie and not the second
    stages.append({"name": "clf", "kind": "classifier", "model": str(model), "keep_top_fraction": fraction})
    outputs = {}
    for name, engine in (("local", LocalEngine(1, progress=False)), ("ray", ray_engine)):
        with monkeypatch.context() as patch:  # the choosing runs on the workers: no whole column here
            patch.setattr(signal_tables, "load_tables", _no_whole_columns)
            patch.setattr(pick, "select_top", _no_whole_columns)
            result = run_pipeline({"stages": stages}, files, run, engine=engine)  # local: stages 1-2 reused
        assert result["output"] == str(run / "03-clf" / "documents.jsonl.zst")
        # the stages after the first read the previous one's parts: a task (a score table) per input file
        assert len(list((run / "02-exact" / "parts").glob("*.jsonl.zst"))) == len(files) == 6
        assert len(list((run / "03-clf" / "scores").glob("*.signals.parquet"))) == len(files)
        outputs[name] = _stage_files(run)
        os.rename(run, tmp_path / name)
    assert outputs["ray"] == outputs["local"]
    report = outputs["ray"]["03-clf/report.json"]
    chosen = pick.select_top(scores, np.array([len(t) for t in texts]), top_fraction=fraction)
    assert report["documents_out"] == chosen.size == tied + 1
    assert report["score_threshold"] == float(scores[order[tied]]) == float(scores[order[tied + 1]])
    assert _kept_texts(tmp_path / "ray" / "03-clf" / "documents.jsonl.zst") == [texts[i] for i in chosen]
    assert outputs["ray"]["01-rules/report.json"]["malformed"] == corpus["malformed"]["web"]
