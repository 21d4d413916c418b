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
    AppendLog(path)             lines appended to a text file (metrics.jsonl): a local file is appended to
                                line by line; an object store has no append, so the lines are buffered and
                                the whole object rewritten at most every REMOTE_FLUSH_S seconds, on flush()
                                and on close()
    create_exclusive(path, b)   creates a file only if it does not exist (O_EXCL; on an object store a PUT
                                with If-None-Match / ifGenerationMatch=0): the primitive of the run lease
    list_files(folder)          {relative name: FileInfo(size, store checksum)} of every file below a folder,
                                in one listing on an object store (gs: crc32c, s3: ETag, as the store reports)
    copy_tree / move_tree       whole folders between any two locations (an object store has no rename:
                                copy, then delete)
    cached_copy(url, sha256)    a local copy of a remote file, for readers that need an OS path (ArrayRecord):
                                downloaded once into the cache (cache_root(): $MIXLM_CACHE_DIR, else
                                $XDG_CACHE_HOME/mixlm, else ~/.cache/mixlm), verified by its sha256 when one is
                                given, and reused while it is unchanged
    local_file(path)            the OS path of a local file, for the few readers that need one and have no
                                cached form; a URL is refused with one line
    check_location(p, what)     a scheme mixlm cannot write (hdfs://, a mistyped gs:/bucket) is a ConfigError
                                at config validation, not a folder named `gs:` in the working directory

fsspec's listings cache is turned off for gs and s3 (unless a user configured it): tensorstore and other
processes write the same folders, so a cached listing would be stale.

Nothing else in mixlm wraps a user path in `pathlib.Path`, calls `open()` on one or `os.replace`s it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import fsspec.config
from etils import epath

from mixlm.errors import ConfigError

REMOTE_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$")
# Object stores rewrite metrics.jsonl whole (no append): at most this often, and at every checkpoint and close.
REMOTE_FLUSH_S = 30.0
# The checksum an object store reports for every object without reading it, by scheme (see list_files).
STORE_CHECKSUM = {"gs": "crc32c", "s3": "etag"}
CACHE_ENV = "MIXLM_CACHE_DIR"

for _protocol in ("gs", "gcs", "s3", "s3a"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


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


def join(path, *parts: str) -> str:
    """`path`/part/... as a string (a URL stays a URL)."""
    return os.fspath(location(path).joinpath(*parts))


def _fs(path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of a remote `path` and the path in it (bucket/key)."""
    return fsspec.core.url_to_fs(os.fspath(path))


def local_file(path, what: str = "path") -> Path:
    """The local filesystem path of `path`; raises ConfigError for an object-store URL."""
    if is_remote(path):
        raise ConfigError(f"{what}={os.fspath(path)!r}: this step reads local files only; copy it to a local disk "
                          "first")
    return Path(os.fspath(location(path)))


def make_dirs(path) -> None:
    """Creates a local folder and its parents; nothing on an object store (a key needs no folder)."""
    if not is_remote(path):
        Path(os.fspath(location(path))).mkdir(parents=True, exist_ok=True)


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` to `path` so that a reader (or a crash) sees the old content or the new, never part of it;
    creates the parent folder."""
    target = location(path)
    payload = data.encode() if isinstance(data, str) else data
    if is_remote(target):
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
            fs, key = _fs(target)
            fs.put_file(tmp, key)
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


def is_file(path) -> bool:
    """A regular file or an object (epath's is_file counts a device, e.g. a log symlinked to /dev/full, whose
    read never ends)."""
    return location(path).is_file() if is_remote(path) else os.path.isfile(os.fspath(location(path)))


def create_exclusive(path, data: str | bytes) -> bool:
    """Creates `path` holding `data` only if nothing is there; False when something is (local: O_EXCL; gs: a PUT
    with ifGenerationMatch=0; s3: a PUT with If-None-Match: *). The store decides, so of two processes racing
    for the same name exactly one gets True (gcp-storage-emulator ignores the precondition; real GCS honours it)."""
    payload = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        fs, key = _fs(path)
        try:
            fs.pipe_file(key, payload, mode="create")
        except FileExistsError:
            return False
        return True
    target = Path(os.fspath(location(path)))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    return True


def remove(path, *, missing_ok: bool = True) -> None:
    """Deletes one file (or object)."""
    try:
        location(path).unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(path) -> None:
    """Deletes a folder and everything below it (nothing when it does not exist)."""
    target = location(path)
    if is_remote(target):
        fs, key = _fs(target)
        keys = [f"{key.rstrip('/')}/{name}" for name in list_files(target)]  # below key/, never key-other/
        if keys:
            fs.rm(keys)
        return
    if target.exists():
        shutil.rmtree(os.fspath(target))


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """One file below a folder: its size, and the checksum the object store keeps for it ('' on a local disk;
    `checksum_kind` says which: STORE_CHECKSUM)."""

    size: int
    checksum: str = ""
    checksum_kind: str = ""


def list_files(folder) -> dict[str, FileInfo]:
    """{name relative to `folder` ('a/b.bin'): FileInfo} of every file below it ({} when it does not exist).
    On an object store: one recursive listing, with the store's own checksum of each object (gs: crc32c, s3:
    the ETag), which costs no read of the bytes."""
    root = location(folder)
    if not is_remote(root):
        base, out = os.fspath(root), {}
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = os.path.join(dirpath, name)
                out[os.path.relpath(full, base)] = FileInfo(os.stat(full).st_size)
        return out
    fs, key = _fs(root)
    kind = STORE_CHECKSUM[scheme(root)]
    key = key.rstrip("/")
    try:
        found = fs.find(key, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for name, info in found.items():
        if info.get("type") != "file" or name.endswith("/") or not name.startswith(key + "/"):
            continue
        checksum = info.get("crc32c") if kind == "crc32c" else info.get("ETag") or info.get("etag")
        out[name[len(key) + 1:]] = FileInfo(int(info["size"]), str(checksum or "").strip('"'), kind if checksum else "")
    return out


def _copy_file(src, dst) -> None:
    """One file from any location to any other; the copy appears whole (atomic_writer / one object PUT)."""
    src_remote, dst_remote = is_remote(src), is_remote(dst)
    if src_remote and dst_remote and scheme(src) == scheme(dst):
        fs, key = _fs(src)
        fs.copy(key, _fs(dst)[1])
    elif dst_remote and not src_remote:
        fs, key = _fs(dst)
        fs.put_file(os.fspath(location(src)), key)
    elif src_remote and not dst_remote:
        target = Path(os.fspath(location(dst)))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fs, key = _fs(src)
            fs.get_file(key, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        with location(src).open("rb") as f, atomic_writer(dst) as out:
            shutil.copyfileobj(f, out, 1 << 22)


def copy_tree(src, dst, *, last: tuple[str, ...] = (), files: dict[str, FileInfo] | None = None) -> list[str]:
    """Copies every file below `src` to the same name below `dst` (any two locations; a few at a time), the
    names in `last` after all others (a completion marker such as a checkpoint's file list), and returns the
    names copied. `files`: the listing of `src`, when the caller has it."""
    names = sorted(files if files is not None else list_files(src))
    first = [n for n in names if n not in last]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: _copy_file(join(src, n), join(dst, n)), first))
    for name in (n for n in last if n in names):
        _copy_file(join(src, name), join(dst, name))
    return names


def move_tree(src, dst) -> None:
    """Moves a folder to `dst` (which must not exist). Local: one rename. Object store: every object copied,
    then the originals deleted, so an interrupted move leaves a whole copy at `src` (and a partial one at
    `dst`), never a partial `src`."""
    if not is_remote(src) and not is_remote(dst):
        target = Path(os.fspath(location(dst)))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(os.fspath(location(src)), target)
        return
    copy_tree(src, dst)
    remove_tree(src)


# ---- a local cache of remote files ------------------------------------------------------------------------


def cache_root() -> Path:
    """Where local copies of remote files live: $MIXLM_CACHE_DIR, else $XDG_CACHE_HOME/mixlm, else
    ~/.cache/mixlm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixlm"


def cache_path(url, kind: str = "objects") -> Path:
    """The local path that mirrors a remote `url` under cache_root()/<kind>/<scheme>/<bucket>/<key>."""
    text = os.fspath(url)
    name = scheme(text)
    return cache_root() / kind / name / text.split("://", 1)[1].strip("/")


class ContentMismatchError(ValueError):
    """A downloaded file's sha256 differs from the one it was expected to have (names the URL)."""


def cached_copy(url, *, sha256: str = "") -> Path:
    """A local file with `url`'s content (a local `url` is returned as its own path). A remote file is downloaded
    once into cache_path(url) and reused while it is unchanged: with `sha256` (a manifest's) the cached copy is
    trusted when it was verified against that digest and its size and mtime are as recorded (no request to the
    store); without, when the store still reports the size and checksum it had when it was downloaded (one
    metadata request). A download whose sha256 differs from `sha256` raises ContentMismatchError and leaves
    nothing in the cache."""
    if not is_remote(url):
        return Path(os.fspath(location(url)))
    local = cache_path(url)
    marker = local.with_name(f".{local.name}.mixlm-cache.json")
    try:
        record = json.loads(marker.read_text())
        st = local.stat()
        unchanged = (st.st_size, st.st_mtime_ns) == (record["size"], record["mtime_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        record, unchanged = {}, False
    if unchanged and sha256 and record.get("sha256") == sha256:
        return local
    fs, key = _fs(url)
    info = fs.info(key)
    remote = {"size": int(info["size"]), "checksum": str(info.get("crc32c") or info.get("ETag") or "").strip('"')}
    if unchanged and not sha256 and record.get("remote") == remote:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    try:
        hasher = hashlib.sha256()
        with fs.open(key, "rb") as src, os.fdopen(fd, "wb") as out:  # hashed as it arrives: one pass
            while chunk := src.read(1 << 22):
                hasher.update(chunk)
                out.write(chunk)
        digest = hasher.hexdigest()
        if sha256 and digest != sha256:
            raise ContentMismatchError(f"{os.fspath(url)}: sha256 {digest[:16]}... differs from the expected "
                                       f"{sha256[:16]}...")
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    st = local.stat()
    write_atomic(marker, json.dumps({"url": os.fspath(url), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                     "sha256": digest, "remote": remote}))
    return local


# ---- a text file that grows by lines ----------------------------------------------------------------------


class AppendLog:
    """Lines appended to a text file. Local: opened in append mode, each line written and flushed as it comes
    (a killed writer leaves at most a torn last line). Object store (no append): the file's text is kept in
    memory and the object rewritten whole (one atomic PUT) when `flush_every_s` passed since the last write,
    on flush() and on close(), so a writer killed without a flush loses the lines of at most the last
    `flush_every_s` seconds, and a reader never sees a torn line."""

    def __init__(self, path, *, flush_every_s: float = REMOTE_FLUSH_S):
        self.path, self.flush_every_s = location(path), flush_every_s
        self.remote = is_remote(self.path)
        self._file = None
        self._text, self._pending, self._flushed_at = "", [], time.monotonic()
        if self.remote:
            self._text = self.path.read_text() if self.path.exists() else ""
        else:
            make_dirs(self.path.parent)
            self._file = open(os.fspath(self.path), "a")  # noqa: SIM115 - closed in close()

    def append(self, line: str) -> None:
        """Appends `line` (which ends with a newline). Raises OSError when the file or object cannot be written."""
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._pending.append(line)
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    @property
    def unflushed(self) -> int:
        """Lines appended since the last write to the object store (0 for a local file)."""
        return len(self._pending)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            return
        if self._pending:
            text = self._text + "".join(self._pending)
            write_atomic(self.path, text)
            self._text, self._pending = text, []
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Flushes and closes; a failed final write raises OSError (the file is closed either way)."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
        else:
            self.flush()

    def abandon(self) -> None:
        """Closes after a failed write without writing again (its unwritten lines are dropped)."""
        file, self._file, self._pending = self._file, None, []
        if file is not None:
            try:
                file.close()  # flushes the failed line again and fails again, but closes the file either way
            except OSError:
                pass
