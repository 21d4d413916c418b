"""One writer per output folder: the lock every data job (`mixlm prepare` per domain folder, each `mixlm select`
verb on its --out) holds from start to end, so a second job writing the same folder is refused in one line
naming the first, and a crashed or killed job never leaves the folder locked (the kernel drops the lock)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def writer_lock(folder: str | Path, job: str, locked_error: type[Exception], *, rerun_note: str = "",
                error: type[Exception] | None = None) -> Iterator[None]:
    """Holds `folder`'s RunFolderLock while the block runs (creating the folder). Another holder: `locked_error`
    naming it ("{folder} is being written by another {job} (host, pid, since; lock): wait ... or choose another
    --out"); a folder that cannot be written: `error` (default `locked_error`) saying so."""
    from mixlm.checkpoint import CheckpointError, RunFolderLock, RunFolderLockedError

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
