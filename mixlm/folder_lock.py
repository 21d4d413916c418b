"""One writer per folder: a run folder (train.output_dir), a prepared domain folder, a `mixlm select` --out.
`RunFolderLock` holds an flock the kernel drops with its holder, so a crashed writer never leaves the folder
locked; `writer_lock` is the form data jobs hold (a second job refused in one line naming the first). An object
store has no locks: there a run holds an `ObjectStoreLease` (a lease object created only if absent, renewed by a
heartbeat, taken over once it expires). `folder_lock(folder)` gives the one that fits the folder."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from mixlm import storage
from mixlm.errors import CheckpointError, RunFolderLockedError, os_reason

LOCK_FILE = ".mixlm.lock"
LEASE_DIR = ".mixlm.lease"
# A lease not renewed for this long belongs to a dead (or cut-off) run and may be taken over; renewed every
# quarter of it. Host clocks must agree to well within it (NTP does).
LEASE_TTL_S = 60.0
_OUT_DIR_ADVICE = ("only one run may write to a train.output_dir. Wait for it to finish or stop it, or choose "
                   "another train.output_dir")


class RunFolderLock:
    """An exclusive `fcntl.flock` on `<folder>/.mixlm.lock` from `acquire()` to `release()`. The kernel drops
    it when the process dies (SIGKILL, OOM), so a crashed run never leaves the folder locked; the file holds
    the holder's host, pid and start time for the message that refuses a second writer. It is removed on
    release (re-checked by inode on acquire, so a writer never locks a file that was just removed). Works on
    local and NFS folders; a file system without locks gets a warning and no lock."""

    def __init__(self, folder: str | Path, log: Callable[[str], None] = print):
        self.folder, self.log = Path(folder), log
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        """Takes the lock (creating the folder). Raises RunFolderLockedError naming the holder, or
        CheckpointError when the folder cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 4096).decode(errors="replace")
                    os.close(fd)
                    raise RunFolderLockedError(self._in_use_message(holder)) from None
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    self.log(f"WARNING: {self.folder} does not support file locks ({e.strerror}): nothing stops "
                             "a second run from writing to it at the same time")
                    return self
                if _same_file(fd, self.path):
                    self._fd = fd
                else:  # the previous holder removed the file between our open and our lock: open it anew
                    os.close(fd)
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, json.dumps(info).encode())
        except OSError as e:
            self.release()
            raise CheckpointError(f"cannot write to the run folder {self.folder} ({os_reason(e)}); fix its "
                                  "permissions or free space there, or choose another train.output_dir") from None
        return self

    def _in_use_message(self, holder: str) -> str:
        try:
            info = json.loads(holder)
            who = f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (ValueError, KeyError, TypeError):
            who = "a process that is just starting"
        return f"{self.folder} is in use by another mixlm run ({who}; lock {self.path}): {_OUT_DIR_ADVICE}"

    def check(self) -> None:
        """Nothing to check: the kernel keeps an flock for as long as this process lives."""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # an unlisted folder or a lost file: closing still releases the lock
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def writer_lock(folder: str | Path, job: str, locked_error: type[Exception], *, rerun_note: str = "",
                error: type[Exception] | None = None) -> Iterator[None]:
    """Holds `folder`'s RunFolderLock while the block runs (creating the folder). Another holder: `locked_error`
    naming it ("{folder} is being written by another {job} (host, pid, since; lock): wait ... or choose another
    --out"); a folder that cannot be written: `error` (default `locked_error`) saying so."""
    lock = RunFolderLock(folder, log=lambda message: print(message, file=sys.stderr))
    try:
        lock.acquire()
    except RunFolderLockedError:
        try:
            held = json.loads(lock.path.read_text())
            who = f"host {held['host']}, pid {held['pid']}, since {held['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that is just starting"
        raise locked_error(
            f"{folder} is being written by another {job} ({who}; lock {lock.path}): wait for it to finish"
            f"{' ' + rerun_note if rerun_note else ''} or stop it, or choose another --out"
        ) from None
    except CheckpointError as e:
        cause = e.__context__ if isinstance(e.__context__, OSError) else e
        raise (error or locked_error)(f"cannot write to {folder} ({getattr(cause, 'strerror', None) or cause}); fix "
                                      "its permissions or free space there, or choose another --out") from None
    try:
        yield
    finally:
        lock.release()
# ---- object stores: a lease -------------------------------------------------------------------------------


def _this_machine() -> str:
    """The kernel's boot id (Linux): tells two machines that share a host name apart; '' elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (Linux /proc), '' when unknown: a pid reused by
    another process has another start."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class ObjectStoreLease:
    """One writer per run folder on an object store (gs://, s3://), which has no file locks.

    Leases are numbered objects `<folder>/.mixlm.lease/<n>` (JSON: holder host, pid, start, heartbeat, TTL and
    a random token). The holder of the highest number holds the folder. To acquire, a run reads the highest
    lease n: when it is held (not released, heartbeat younger than its TTL, holder not known dead) the run is
    refused with one line naming the holder; else it creates n + 1 *only if absent* (storage.create_exclusive:
    ifGenerationMatch=0 on GCS, If-None-Match on S3), so of two runs racing for a free folder the store lets
    exactly one win, and reads it back to check its token. A thread renews the lease (rewrites n + 1 with a new
    heartbeat) every TTL/4 and watches for a higher number: a run presumed dead whose lease was taken over
    learns so there, and `check()` (called before every checkpoint save) raises. `release()` marks the lease
    released, so the next run starts at once; a killed run's lease is taken over after its TTL, or at once by
    a run on the same machine that sees the holder's process gone."""

    def __init__(self, folder, log: Callable[[str], None] = print, *, ttl_s: float = LEASE_TTL_S):
        self.folder, self.log, self.ttl_s = storage.location(folder), log, float(ttl_s)
        self.path = self.folder / LEASE_DIR
        self._number: int | None = None
        self._doc: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str = ""

    def _lease(self, number: int):
        return self.path / f"{number:012d}"

    def _numbers(self) -> list[int]:
        return sorted(int(name) for name in storage.list_files(self.path) if name.isdigit())

    def _read(self, number: int) -> dict | None:
        try:
            doc = storage.read_json(self._lease(number))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def acquire(self) -> ObjectStoreLease:
        """Takes the lease. Raises RunFolderLockedError naming the holder, or CheckpointError when the folder
        cannot be read or written."""
        try:
            numbers = self._numbers()
            newest = numbers[-1] if numbers else 0
            if newest:
                holder = self._read(newest)
                if holder is not None and not holder.get("released"):
                    why = self._free_because(holder)
                    if not why:
                        raise RunFolderLockedError(self._in_use_message(holder, newest))
                    self.log(f"{self.folder}: taking over the lease of {_who(holder)}: {why}")
            mine = newest + 1
            doc = {"host": socket.gethostname(), "machine": _this_machine(), "pid": os.getpid(),
                   "process_start": _process_start(os.getpid()), "token": uuid.uuid4().hex,
                   "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "heartbeat": time.time(), "ttl_s": self.ttl_s}
            won = storage.create_exclusive(self._lease(mine), json.dumps(doc))
            if not won or (self._read(mine) or {}).get("token") != doc["token"]:
                raise RunFolderLockedError(self._in_use_message(self._read(mine) or {}, mine))
            self._number, self._doc = mine, doc
            for old in numbers:
                storage.remove(self._lease(old))
        except OSError as e:
            raise CheckpointError(f"cannot write to the run folder {self.folder} ({os_reason(e)}); check the "
                                  "bucket's permissions, or choose another train.output_dir") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="mixlm-lease", daemon=True)
        self._thread.start()
        return self

    def _free_because(self, holder: dict) -> str:
        """Why a lease that is not released may be taken over ('' when it is held)."""
        try:
            age, ttl = time.time() - float(holder["heartbeat"]), float(holder["ttl_s"])
        except (KeyError, TypeError, ValueError):
            return ""
        if age > ttl:
            return f"its last heartbeat was {age:.0f} s ago, over its {ttl:.0f} s lease"
        same_machine = holder.get("host") == socket.gethostname() and holder.get("machine") == _this_machine()
        pid = holder.get("pid")
        if not (same_machine and isinstance(pid, int) and pid != os.getpid()):
            return ""
        reused = holder.get("process_start") and _process_start(pid) != holder["process_start"]
        return f"its process {pid} on this machine has exited" if reused or not _pid_alive(pid) else ""

    def _in_use_message(self, holder: dict, number: int) -> str:
        try:
            age = time.time() - float(holder["heartbeat"])
            who = (f"{_who(holder)}; last heartbeat {age:.0f} s ago, lease {self._lease(number)}, taken over "
                   f"{max(float(holder['ttl_s']) - age, 0):.0f} s after its holder stops")
        except (KeyError, TypeError, ValueError):
            who = f"an unreadable lease {self._lease(number)}; delete it if no run uses this folder"
        return f"{self.folder} is in use by another mixlm run ({who}): {_OUT_DIR_ADVICE}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                newer = [n for n in self._numbers() if n > self._number]
                if newer:
                    holder = self._read(newer[-1]) or {}
                    self._lost = f"its lease was taken over by {_who(holder)} (lease {self._lease(newer[-1])})"
                    return
                self._doc["heartbeat"] = time.time()
                storage.write_atomic(self._lease(self._number), json.dumps(self._doc))
            except OSError:
                continue  # the next beat tries again; the lease lasts TTL, four beats

    def check(self) -> None:
        """Raises RunFolderLockedError when another run took the lease over (this one was presumed dead)."""
        if self._lost:
            raise RunFolderLockedError(f"{self.folder}: this run stopped writing because {self._lost}; its "
                                       "heartbeats did not reach the bucket in time. Rerun when that run is done")

    def release(self) -> None:
        if self._number is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost:
            try:
                storage.write_atomic(self._lease(self._number), json.dumps({**self._doc, "released": True}))
            except OSError:
                pass  # it expires by itself after its TTL
        self._number, self._thread = None, None


def _who(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"


def folder_lock(folder, log: Callable[[str], None] = print) -> RunFolderLock | ObjectStoreLease:
    """The lock of a run folder: an flock on a local (or NFS) folder, a lease on an object store."""
    if storage.is_remote(folder):
        return ObjectStoreLease(folder, log)
    return RunFolderLock(Path(str(folder)), log)
