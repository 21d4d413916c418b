"""One writer per folder: a run folder (train.output_dir), a prepared domain folder, a `mixlm select` --out. `RunFolderLock` holds an
flock the kernel drops with its holder, so a crashed writer never leaves the folder locked; `writer_lock` is the
form data jobs hold (a second job refused in one line naming the first)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from mixlm.errors import CheckpointError, RunFolderLockedError, os_reason

LOCK_FILE = ".mixlm.lock"


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
        return (f"{self.folder} is in use by another mixlm run ({who}; lock {self.path}): only one run may "
                "write to a train.output_dir. Wait for it to finish or stop it, or choose another "
                "train.output_dir")

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
