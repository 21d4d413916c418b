"""Real object stores for tests, no cloud: gcp-storage-emulator (the GCS JSON API; started by
tests/gcs_emulator.py, which adds the generation headers and preconditions real GCS has) and moto's S3 server,
each started once per session as a subprocess on 127.0.0.1 and stopped at the end. Every layer is pointed at them
through its environment: fsspec/gcsfs (STORAGE_EMULATOR_HOST), tensorstore, which Orbax writes through
(TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING), s3fs/boto (AWS_ENDPOINT_URL and fake keys).
Subprocesses (`mixlm train` started by a test) inherit the same environment.

    def test_x(gs_folder): ...     # a fresh gs://mixlm-test/<name>/ per test (s3_folder: the same on S3)
"""

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from ports import free_port

BUCKET = "mixlm-test"  # tensorstore refuses bucket names under 3 characters
# gcsfs >= 2026.10 first asks the Storage Control API what kind of bucket it is (the emulator has no such API):
# plain gcsfs, as the emulator speaks only the JSON API. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@contextlib.contextmanager
def _server(argv: list[str], ready_url: str, log_name: str):
    """Runs a server until the block ends; yields once `ready_url` answers (30 s at most)."""
    log = open(f"/tmp/mixlm-{log_name}-{os.getpid()}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{argv[:3]} did not start: see {log.name}") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fresh_filesystems() -> None:
    """Drops fsspec's cached gcsfs / s3fs instances, which read their endpoint when created."""
    import fsspec

    for protocol in ("gs", "s3"):
        fsspec.get_filesystem_class(protocol).clear_instance_cache()
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://mixlm-test on gcp-storage-emulator (in memory; tests/gcs_emulator.py) for the whole session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py"), str(port),
            BUCKET]
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    with _server(argv, f"{url}/storage/v1/b/{BUCKET}", "gcs-emulator"), _environment(env):
        _fresh_filesystems()
        yield f"gs://{BUCKET}"


@pytest.fixture(scope="session")
def s3_bucket():
    """s3://mixlm-test on moto's S3 server for the whole session."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with _server(argv, f"{url}/moto-api/", "moto-s3"), _environment(env):
        _fresh_filesystems()
        import fsspec

        fsspec.filesystem("s3").mkdir(BUCKET)
        yield f"s3://{BUCKET}"


def _folder(bucket: str, request) -> str:
    return f"{bucket}/{request.node.name.replace('[', '-').strip(']')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gs_folder(gcs_bucket, request) -> str:
    """A folder of its own on the emulated GCS bucket (nothing there yet)."""
    return _folder(gcs_bucket, request)


@pytest.fixture
def s3_folder(s3_bucket, request) -> str:
    """A folder of its own on the emulated S3 bucket (nothing there yet)."""
    return _folder(s3_bucket, request)
