"""Where bytes live: local folders and object stores (gs://, s3://) behind one small API.

Every path a user gives (run folders, sweep folders, prepared data, init_from, exports, eval outputs) may be a
local path or an object-store URL. `location(p)` turns it into an `etils.epath.Path`: pathlib's API, backed by
the OS for local paths and by fsspec (gcsfs, s3fs) for gs:// and s3:// — the same URLs Orbax writes through
tensorstore. The few operations whose meaning differs between the two live here:

    write_atomic(path, data)    readers see the old content or the new, never a torn file
                                (local: a temp file in the same folder, fsync, rename; object store: one PUT
                                is atomic already)
    atomic_writer(path)         the same for a file streamed in pieces (a context manager giving a binary
                                file; nothing appears at `path` if the block raises)
    read_json / write_json      the same, for JSON documents
    local_file(path)            the OS path of a local file, for the few readers that need one (ArrayRecord,
                                fcntl); a URL is refused with one line
    check_location(p, what)     a scheme mixlm cannot write (hdfs://, a mistyped gs:/bucket) is a ConfigError
                                at config validation, not a folder named `gs:` in the working directory

Nothing else in mixlm wraps a user path in `pathlib.Path`, calls `open()` on one or `os.replace`s it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from etils import epath

from mixlm.errors import ConfigError

REMOTE_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$")

def scheme(path) -> str:
    """'gs' / 's3' for an object-store URL, '' for a local path (a `file://` URL counts as local)."""
    match = _URL.match(os.fspath(path))
    if not match or len(match.group(1)) == 1:  # C:\... on Windows is a drive, not a scheme
        return ""
    name = match.group(1).lower()
    if name == "file" or (name not in REMOTE_SCHEMES and match.group(2) != "//"):
        return ""
    return name


def is_remote(path) -> bool:
    return scheme(path) in REMOTE_SCHEMES


def check_location(path, what: str) -> None:
    """Raises ConfigError for a location mixlm cannot read and write: an unknown scheme, or a gs:/s3: URL
    without its two slashes (which would otherwise become a local folder named `gs:`)."""
    text = os.fspath(path)
    match = _URL.match(text)
    if not match or len(match.group(1)) == 1:
        return
    name, slashes, rest = match.group(1).lower(), match.group(2), match.group(3)
    if name == "file" or (name not in REMOTE_SCHEMES and slashes != "//"):
        return  # a local name with a colon in it
    if name not in REMOTE_SCHEMES:
        raise ConfigError(f"{what}={text!r}: the scheme {name}:// is not supported; use a local path, gs://BUCKET/... "
                          "or s3://BUCKET/...")
    if slashes != "//" or not rest or rest.startswith("/"):
        raise ConfigError(f"{what}={text!r}: expected {name}://BUCKET/PATH")


def location(path) -> epath.Path:
    """`path` as an epath.Path (local or object store); a `file://` URL becomes its local path."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    text = text.removeprefix("file://")
    return epath.Path(text)


def local_file(path, what: str = "path") -> Path:
    """The local filesystem path of `path`; raises ConfigError for an object-store URL."""
    if is_remote(path):
        raise ConfigError(f"{what}={os.fspath(path)!r}: this step reads local files only; copy it to a local disk "
                          "first")
    return Path(os.fspath(location(path)))


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` to `path` so that a reader (or a crash) sees the old content or the new, never part of it;
    creates the parent folder."""
    target = location(path)
    payload = data.encode() if isinstance(data, str) else data
    if is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)  # one object PUT: atomic for readers
        return
    folder = Path(os.fspath(target)).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(target))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_writer(path) -> Iterator[BinaryIO]:
    """A binary file to stream `path`'s content into: it appears at `path` whole when the block ends, and not at
    all when the block raises (local: a temp file in the same folder, fsync, rename; object store: a local temp
    file uploaded as one object at the end)."""
    target = location(path)
    remote = is_remote(target)
    folder = Path(tempfile.gettempdir()) if remote else Path(os.fspath(target)).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if remote:
            target.parent.mkdir(parents=True, exist_ok=True)
            location(tmp).copy(target, overwrite=True)
            Path(tmp).unlink()
        else:
            os.replace(tmp, os.fspath(target))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj: Any, *, indent: int | None = 1) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path) -> Any:
    """The JSON document at `path` (raises FileNotFoundError / json.JSONDecodeError as json.loads does)."""
    return json.loads(location(path).read_text())


def exists(path) -> bool:
    return location(path).exists()
