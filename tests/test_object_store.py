"""The run folder on an object store, against real local emulators (tests/object_stores.py: gcp-storage-emulator
for gs://, moto's server for s3://): the io layer (atomic writes, metrics appended without append, listings with
the store's checksums, folder copies, the local cache of prepared shards), the run lease, and training end to end
(SIGKILL, bitwise resume, export, plot, a second trainer refused, a corrupted object skipped, a sweep)."""

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import google_crc32c
import pytest
from object_stores import gcs_bucket, gs_folder, s3_bucket, s3_folder  # noqa: F401 - fixtures

from mixlm import storage
from mixlm.errors import RunFolderLockedError
from mixlm.folder_lock import ObjectStoreLease

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
    storage.remove_tree(f"{folder}/moved")
    assert storage.list_files(f"{folder}/moved") == {}


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


def test_exclusive_create_lets_one_of_two_writers_win(s3_folder):
    """The primitive of the lease: S3 (moto) honours If-None-Match. gcp-storage-emulator ignores GCS's
    ifGenerationMatch=0 (it overwrites), so the GCS race is the real store's to decide; gs:// is covered by the
    lease tests, which read the lease back."""
    path = f"{s3_folder}/lease"
    assert storage.create_exclusive(path, "first")
    assert not storage.create_exclusive(path, "second")
    assert storage.location(path).read_text() == "first"


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


def test_unsupported_schemes_are_refused_in_one_line():
    out = subprocess.run([sys.executable, "-m", "mixlm.cli", "train", "configs/experiments/cpu-proxy.yaml",
                          "train.output_dir=hdfs://x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "hdfs:// is not supported" in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(ROOT, "hdfs:"))


# ---- the run lease ---------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from mixlm.errors import RunFolderLockedError
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
