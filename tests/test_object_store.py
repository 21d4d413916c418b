"""The run folder on an object store, against real local emulators (tests/object_stores.py: gcp-storage-emulator
for gs://, moto's server for s3://): the io layer (atomic writes, metrics appended without append, listings with
the store's checksums, folder copies, the local cache of prepared shards), the run lease, and training end to end
(SIGKILL, bitwise resume, export, plot, a second trainer refused, a corrupted object skipped, a sweep)."""

import base64
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import google_crc32c
import jax
import pytest
import yaml
from conftest import xla_flags
from test_checkpoint import leaves_equal

from mixlm import storage
from mixlm.checkpoint import (
    FILE_LIST,
    CheckpointCorruptWarning,
    RunCheckpoints,
    checkpoint_dir,
    restore_params,
    staging,
)
from mixlm.checkpoint.params import resolve_step_dir
from mixlm.cli import main as cli_main
from mixlm.config import MeshConfig, config_from_dict, load_config
from mixlm.data.demo_corpus import GENERATORS, prepare_demo_data
from mixlm.data.prepared import PreparedDomain, list_domains
from mixlm.data.tokenizer import load_tokenizer_spec
from mixlm.errors import RunFolderLockedError, ShardError
from mixlm.eval.results import finish_results, load_results, write_results
from mixlm.eval.suites import adhoc_suite
from mixlm.eval.task_scores import score_suite
from mixlm.folder_lock import ObjectStoreLease
from mixlm.mixing import mixtures_table, read_csv, write_csv
from mixlm.run_dir import RunDir
from mixlm.sharding import make_mesh
from mixlm.train import build_setup

pytest_plugins = ("object_stores",)  # gcs_bucket, s3_bucket, gs_folder, s3_folder: the emulators
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["gs", "s3"])
def folder(request) -> str:
    return request.getfixturevalue(f"{request.param}_folder")


# ---- the io layer ---------------------------------------------------------------------------------------


def test_files_listings_and_folder_copies(folder, tmp_path):
    storage.write_atomic(f"{folder}/a/b.txt", "hello")
    storage.write_json(f"{folder}/c.json", {"x": 1})
    assert storage.read_json(f"{folder}/c.json") == {"x": 1}
    assert storage.location(f"{folder}/a/b.txt").read_text() == "hello"
    assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:") and not os.path.exists("s3:")

    files = storage.list_files(folder)
    assert {n: f.size for n, f in files.items()} == {"a/b.txt": 5, "c.json": len(json.dumps({"x": 1}, indent=1)) + 1}
    # the store's own checksum of each object, from the listing (no read): what the store computed from the bytes
    if folder.startswith("gs://"):
        assert files["a/b.txt"].checksum_kind == "crc32c"
        assert files["a/b.txt"].checksum == base64.b64encode(google_crc32c.Checksum(b"hello").digest()).decode()
    else:
        assert files["a/b.txt"] == storage.FileInfo(5, hashlib.md5(b"hello").hexdigest(), "etag")

    assert sorted(storage.copy_tree(folder, tmp_path / "down")) == ["a/b.txt", "c.json"]
    assert (tmp_path / "down" / "a" / "b.txt").read_text() == "hello"
    storage.copy_tree(tmp_path / "down", f"{folder}/up")
    storage.move_tree(f"{folder}/up", f"{folder}/moved")
    assert storage.list_files(f"{folder}/up") == {}
    assert {n: f.size for n, f in storage.list_files(f"{folder}/moved").items()} == {"a/b.txt": 5, "c.json": 12}
    storage.write_atomic(f"{folder}/moved-not/x", "kept")  # a neighbour whose name starts the same
    storage.remove_tree(f"{folder}/moved")
    assert storage.list_files(f"{folder}/moved") == {}
    assert storage.location(f"{folder}/moved-not/x").read_text() == "kept"


def test_append_log_rewrites_the_object_whole_at_most_every_interval(folder):
    """An object store has no append (gcsfs opens 'a' as 'w' with a warning: the earlier rows would be gone):
    rows are buffered and the object rewritten whole on flush, after the interval, and on close."""
    path = f"{folder}/metrics.jsonl"
    log = storage.AppendLog(path, flush_every_s=3600)
    log.append('{"step": 1}\n')
    assert not storage.exists(path) and log.unflushed == 1  # buffered
    log.flush()
    assert storage.location(path).read_text() == '{"step": 1}\n'
    log.append('{"step": 2}\n')
    assert storage.location(path).read_text() == '{"step": 1}\n'
    log.close()
    assert storage.location(path).read_text() == '{"step": 1}\n{"step": 2}\n'

    again = storage.AppendLog(path, flush_every_s=0)  # reopened (a resumed run): continues the file
    again.append('{"step": 3}\n')  # the interval has passed: written at once
    assert storage.location(path).read_text().splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']
    again.close()


def test_exclusive_create_lets_one_of_two_writers_win(folder):
    """The primitive of the lease: If-None-Match on S3 (moto), ifGenerationMatch=0 on GCS (the emulator ignores
    it; tests/gcs_emulator.py refuses as GCS does)."""
    path = f"{folder}/lease"
    assert storage.create_exclusive(path, "first")
    assert not storage.create_exclusive(path, "second")
    assert storage.location(path).read_text() == "first"
    storage.write_atomic(path, "overwritten")  # an unconditional write is unaffected
    assert storage.location(path).read_text() == "overwritten"


def test_cached_copy_downloads_once_and_checks_the_sha256(gs_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    url, data = f"{gs_folder}/dom/train-00000-of-00001.array_record", os.urandom(3000)
    storage.write_atomic(url, data)
    digest = hashlib.sha256(data).hexdigest()
    local = storage.cached_copy(url, sha256=digest)
    assert local == tmp_path / "cache" / "objects" / "gs" / url.split("://")[1] and local.read_bytes() == data
    # a verified copy is used without asking the store: here the object changed (same manifest sha256) and
    # the cached bytes are still the ones the manifest describes
    storage.write_atomic(url, b"x" * 3000)
    assert storage.cached_copy(url, sha256=digest).read_bytes() == data
    # without a sha256 the store is asked whether the object changed, and a changed one is downloaded again
    assert storage.cached_copy(url).read_bytes() == b"x" * 3000
    # bytes that are not the expected ones never enter the cache
    storage.write_atomic(f"{gs_folder}/dom/bad", b"y" * 10)
    with pytest.raises(storage.ContentMismatchError, match="dom/bad: sha256"):
        storage.cached_copy(f"{gs_folder}/dom/bad", sha256=digest)
    assert not storage.cache_path(f"{gs_folder}/dom/bad").exists()


def test_unsupported_schemes_are_refused_in_one_line(capsys, tmp_path):
    for argv in (["plot", str(tmp_path), "--out", "hdfs://x/plots"], ["eval", "hdfs://x/run", "--tasks", "arc_easy"],
                 ["export", "gs://bucket/run", "gs://bucket/hf"], ["prepare", "--out", "s3://bucket/prepared",
                                                                   "--domain", "a=a.jsonl", "--tokenizer", "t"]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("hdfs:// is not supported" in err or "local folder" in err), err
    out = subprocess.run([sys.executable, "-m", "mixlm.cli", "train", "configs/experiments/cpu-proxy.yaml",
                          "train.output_dir=hdfs://x"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "hdfs:// is not supported" in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(ROOT, "hdfs:"))


# ---- the run lease ---------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from mixlm.errors import RunFolderLockedError
from mixlm.eval.results import finish_results, load_results, write_results
from mixlm.eval.suites import adhoc_suite
from mixlm.eval.task_scores import score_suite
from mixlm.folder_lock import ObjectStoreLease
lease = ObjectStoreLease(sys.argv[1], ttl_s=float(sys.argv[2])).acquire()
print("held", flush=True)
while True:
    time.sleep(0.05)
    try:
        lease.check()
    except RunFolderLockedError as e:
        print("LOST", e, flush=True)
        break
"""


def _holder(folder: str, ttl_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, folder, str(ttl_s)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lease_refuses_a_second_writer_naming_the_holder(folder):
    first = ObjectStoreLease(folder).acquire()
    with pytest.raises(RunFolderLockedError) as refused:
        ObjectStoreLease(folder).acquire()
    message = str(refused.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and ".mixlm.lease/000000000001" in message
    first.release()  # marked released: the next writer starts at once
    second = ObjectStoreLease(folder).acquire()
    assert [n for n in storage.list_files(f"{folder}/.mixlm.lease")] == ["000000000002"]
    second.release()


def test_lease_of_a_killed_holder_is_taken_over_at_once_on_its_machine(folder):
    holder = _holder(folder, ttl_s=600)
    with pytest.raises(RunFolderLockedError, match=f"pid {holder.pid}"):
        ObjectStoreLease(folder).acquire()
    holder.kill()
    holder.wait()
    said = []
    ObjectStoreLease(folder, log=said.append).acquire().release()  # long before its 600 s TTL
    assert said and f"process {holder.pid} on this machine has exited" in said[0]


def test_lease_of_a_frozen_holder_expires_and_the_holder_learns_it_lost(folder):
    """A holder that stops renewing (SIGSTOP: alive, like a VM cut off from the bucket) loses the lease after its
    TTL; when it runs again its heartbeat sees the newer lease and check() refuses to go on."""
    holder = _holder(folder, ttl_s=1.0)
    holder.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.6)
        said = []
        taker = ObjectStoreLease(folder, log=said.append).acquire()
        assert "its last heartbeat was" in said[0]
    finally:
        holder.send_signal(signal.SIGCONT)
    line = holder.stdout.readline()
    holder.wait(timeout=30)
    assert line.startswith("LOST") and "its lease was taken over by" in line and f"pid {os.getpid()}" in line
    taker.release()


# ---- training on a bucket: SIGKILL, bitwise resume, a second trainer, export, plot, a corrupted object ----

TINY = [
    "model.family=llama", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
    "model.mlp_dim=64", "model.vocab_size=200", "model.max_seq_len=16", "model.vocab_multiple=8",
    "data.seq_len=16", "train.global_batch_size=8", "optimizer.lr=1e-2", "optimizer.eps=1e-3",
    "schedule.kind=cosine", "schedule.warmup_steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    "eval.batches=1", "logging.every=1", "logging.progress=false", "logging.tensorboard=true",
    "logging.peak_flops=1e9", "train.steps=12", "checkpoint.every=2", "checkpoint.keep_last=3",
]
COMPARED = ("loss", "grad_norm", "param_norm", "update_norm", "lr", "tokens_total")


def _config_file(folder) -> str:
    tree: dict = {}
    for text in TINY:
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = yaml.safe_load(value)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


class Trainer:
    """`mixlm train CONFIG train.output_dir=OUT` in a subprocess on 8 fake CPU devices, output to a file."""

    def __init__(self, config: str, out: str, log, cache):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8), PYTHONPATH=ROOT,
                   MIXLM_CACHE_DIR=str(cache))
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "mixlm.cli", "train", config, f"train.output_dir={out}"],
                                         stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def finish(self) -> str:
        self.proc.wait(timeout=300)
        text = self.log.read_text()
        assert self.proc.returncode == 0, text[-3000:]
        return text


def _listed_steps(out: str) -> list[int]:
    return sorted(int(n.split("/")[0]) for n in storage.list_files(f"{out}/checkpoints")
                  if n.endswith("/" + FILE_LIST) and n.split("/")[0].isdigit())


def _rows(out) -> list[dict]:
    return [r for r in RunDir(out).metrics() if "loss" in r]


def _params(out: str):
    cfg = config_from_dict(yaml.safe_load(storage.location(f"{out}/config.yaml").read_text()))
    setup = build_setup(cfg, make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    return restore_params(resolve_step_dir(out), setup.abstract_state.params, cfg.model.vocab_size)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny run, uninterrupted, on a local disk (started here; finished by whoever needs it first)."""
    tmp = tmp_path_factory.mktemp("reference")
    out = str(tmp / "run")
    return out, Trainer(_config_file(tmp), out, tmp / "reference.log", tmp / "cache")


def _kill_and_resume(out: str, tmp, cache) -> dict:
    """Trains on the bucket, SIGKILLs the trainer once a checkpoint is listed (asking, while it runs, for a
    second writer), then reruns the same command to the end. Returns what the test checks."""
    config = _config_file(tmp)
    victim = Trainer(config, out, tmp / "killed.log", cache)
    end = time.monotonic() + 240
    while not _listed_steps(out):
        assert victim.proc.poll() is None and time.monotonic() < end, (tmp / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    cfg = load_config(None, [*TINY, f"train.output_dir={out}"])
    try:
        second = RunCheckpoints(checkpoint_dir(out), cfg.checkpoint)  # what a second `mixlm train` does first
        second.close()
        refused = "NOT REFUSED"
    except RunFolderLockedError as e:
        refused = str(e)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed_at = _listed_steps(out)
    resumed = Trainer(config, out, tmp / "resumed.log", cache).finish()
    return {"refused": refused, "victim_pid": victim.proc.pid, "killed_at": killed_at, "resumed": resumed}


@pytest.fixture(scope="module")
def gs_run(gcs_bucket, reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gs-run")
    out = f"{gcs_bucket}/kill-resume-{os.getpid()}"
    return out, _kill_and_resume(out, tmp, tmp / "cache")


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_a_run_killed_on_a_bucket_resumes_bitwise(store, reference, request, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "reader-cache"))  # S3 steps are read from local copies
    out, seen = request.getfixturevalue("gs_run") if store == "gs" else (
        f"{request.getfixturevalue('s3_bucket')}/kill-resume-{os.getpid()}", None)
    if seen is None:
        seen = _kill_and_resume(out, tmp_path, tmp_path / "cache")
    ref_out, ref = reference
    ref.finish()
    assert seen["killed_at"] and seen["killed_at"][-1] < 12, seen  # killed mid-run, with a checkpoint there
    assert f"resumed from {out}/checkpoints/{seen['killed_at'][-1]}" in seen["resumed"], seen["resumed"][-3000:]
    # the second writer was refused in one line naming the trainer that held the lease
    assert "\n" not in seen["refused"] and f"pid {seen['victim_pid']}" in seen["refused"], seen["refused"]
    # metrics.jsonl on the bucket: every step once (rows buffered when the trainer was killed are logged again
    # by the resumed run), the same numbers as the uninterrupted run
    rows, ref_rows = _rows(out), _rows(ref_out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [[r[k] for k in COMPARED] for r in rows] == [[r[k] for k in COMPARED] for r in ref_rows]
    assert all(leaves_equal(a, b) for a, b in [(_params(out), _params(ref_out))])
    assert _listed_steps(out) == [8, 10, 12]  # retention (keep_last=3) applies on the bucket too
    events = [n for n in storage.list_files(f"{out}/tensorboard")]
    assert events and all(n.startswith("events.out.tfevents") for n in events)
    assert not os.path.exists(os.path.join(ROOT, f"{store}:"))

    # export the bucket's run to a local Hugging Face folder
    hf = tmp_path / "hf"
    assert cli_main(["export", out, str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["model_type"] == "llama"
    assert list(hf.glob("*.safetensors"))


def test_plot_and_eval_outputs_of_a_run_on_a_bucket(gs_run, tmp_path):
    out, _ = gs_run
    assert cli_main(["plot", out, "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["plot", out, "--out", f"{out}-plots"]) == 0  # the figures can go to the bucket too
    assert storage.location(f"{out}-plots/train_loss.png").read_bytes()[:4] == b"\x89PNG"

    # `mixlm eval` writes its results JSON and table next to a run on the bucket; `eval compare` reads them back
    suite = adhoc_suite(["arc_easy"])
    doc = finish_results(score_suite(suite, {0: {"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.6}}}), suite,
                         name="run", args={})
    _, md_path = write_results(doc, f"{out}-eval/eval_adhoc.json")
    assert str(md_path) == f"{out}-eval/eval_adhoc.md" and "arc_easy" in md_path.read_text()
    assert load_results(f"{out}-eval")["rows"] == doc["rows"]


def test_a_corrupted_checkpoint_object_is_detected_and_skipped(gs_run, gcs_bucket):
    """Same size, other bytes: the object's crc32c (from one listing) differs from the file list's; the step is
    moved to checkpoints_corrupt/ on the bucket and the one before it restores."""
    source, _ = gs_run
    out = f"{gcs_bucket}/corrupt-{os.getpid()}"
    storage.copy_tree(source, out)
    victim = max((n for n, f in storage.list_files(f"{out}/checkpoints/12").items() if "/d/" in n),
                 key=lambda n: storage.list_files(f"{out}/checkpoints/12")[n].size)
    size = storage.list_files(f"{out}/checkpoints/12")[victim].size
    storage.write_atomic(f"{out}/checkpoints/12/{victim}", bytes(size))
    cfg = load_config(None, [*TINY, f"train.output_dir={out}"])
    setup = build_setup(cfg, make_mesh(cfg.mesh))
    said = []
    ckpts = RunCheckpoints(checkpoint_dir(out), cfg.checkpoint, log=said.append)
    try:
        with pytest.warns(CheckpointCorruptWarning, match=f"{victim} has crc32c"):
            restored = ckpts.restore_latest(setup.abstract_state, cfg)
    finally:
        ckpts.close()
    assert restored.step == 10 and restored.path == f"{out}/checkpoints/10"
    assert _listed_steps(out) == [8, 10]
    moved = {n.split("/")[0] for n in storage.list_files(f"{out}/checkpoints_corrupt")}
    assert len(moved) == 1 and moved.pop().startswith("12-")


# ---- prepared data and a sweep on a bucket ----------------------------------------------------------------


def test_a_sweep_on_a_bucket_reads_prepared_data_through_the_cache(gs_folder, tmp_path, monkeypatch):
    """Prepared data, the sweep folder and results.csv all on gs://; the shards are read from a local cache,
    each downloaded once and checked against the manifest's sha256."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    data = prepare_demo_data(tmp_path / "data", docs_per_domain=60, vocab_size=300)
    prepared = f"{gs_folder}/prepared"
    storage.copy_tree(data["prepared"], prepared)
    domains = list_domains(prepared)
    assert domains == sorted(GENERATORS)
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = tmp_path / "proxy.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": vocab, "max_seq_len": 32, "vocab_multiple": 8},
        "data": {"source": "prepared", "prepared_dir": prepared, "seq_len": 32, "mixture": {domains[0]: 1.0}},
        "optimizer": {"lr": 1e-2}, "schedule": {"kind": "constant", "warmup_steps": 1},
        "train": {"steps": 2, "global_batch_size": 8}, "eval": {"batches": 1},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }))
    mixtures = tmp_path / "mixtures.csv"
    write_csv(mixtures, mixtures_table([{domains[0]: 1.0}, {domains[0]: 0.5, domains[1]: 0.5}], domains))
    sweep = f"{gs_folder}/sweep"
    assert cli_main(["sweep", str(base), "--mixtures", str(mixtures), "--out", sweep, "--parallel", "0"]) == 0

    results = read_csv(f"{sweep}/results.csv")
    assert sorted(results.index_N.tolist()) == [1, 2]
    assert all(math.isfinite(x) for x in results.select(["metric/val_loss"]).ravel())
    assert [r["step"] for r in _rows(f"{sweep}/runs/0002")] == [1, 2]  # each run's folder on the bucket too
    assert not os.path.exists(os.path.join(ROOT, "gs:"))

    # every shard and index of the domains read is in the cache, once; opening them again downloads nothing
    cached = sorted((tmp_path / "cache" / "objects").rglob("*.array_record"))
    assert cached and all(p.is_relative_to(storage.cache_path(prepared)) for p in cached)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cached}
    PreparedDomain(prepared, domains[1])
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cached} == before

    # a shard on the bucket whose bytes are not the manifest's is refused, naming it, and never cached
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache2"))
    shard = next(n for n in storage.list_files(f"{prepared}/{domains[1]}") if n.endswith(".array_record"))
    size = storage.list_files(f"{prepared}/{domains[1]}")[shard].size
    storage.write_atomic(f"{prepared}/{domains[1]}/{shard}", bytes(size))
    with pytest.raises(ShardError, match=f"{domains[1]}/{shard}: sha256"):
        PreparedDomain(prepared, domains[1])
    assert not list((tmp_path / "cache2").rglob(shard))


def test_s3_staging_mirrors_only_the_steps_whose_upload_finished(s3_folder, tmp_path):
    """S3 steps go through a local staging folder; a step is on S3 once its file list is (uploaded last)."""
    remote, local = f"{s3_folder}/checkpoints", tmp_path / "staging"
    for step in ("2", "4"):
        storage.write_atomic(f"{remote}/{step}/state/a", f"step {step}")
        storage.write_atomic(f"{remote}/{step}/{FILE_LIST}", f'{{"files": {{"state/a": 6}}, "step": {step}}}')
    storage.write_atomic(f"{remote}/6/state/a", "cut short")  # an upload killed before its file list
    (local / "4" / "state").mkdir(parents=True)  # already staged, same list: kept as it is
    (local / "4" / "state" / "a").write_text("step 4")
    (local / "4" / FILE_LIST).write_text(storage.location(f"{remote}/4/{FILE_LIST}").read_text())
    (local / "8").mkdir()  # committed here, never uploaded: not a checkpoint of the run
    assert staging.pull(remote, local) == [2, 4]
    assert sorted(p.name for p in local.iterdir()) == ["2", "4"]
    assert (local / "2" / "state" / "a").read_text() == "step 2"
    staging.push(local / "2", f"{remote}/6")  # a new step 6 replaces what the cut-short upload left
    assert sorted(storage.list_files(f"{remote}/6")) == [FILE_LIST, "state/a"]
    assert storage.location(f"{remote}/6/state/a").read_text() == "step 2"
    staging.prune(remote, keep={4, 6})
    assert sorted({n.split("/")[0] for n in storage.list_files(remote)}) == ["4", "6"]
