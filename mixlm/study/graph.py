"""Stages of a study: each a folder named after the content of its inputs, done when its stage.json is there.

    stage = Stage("fit-r0", "fit", {"target": [...], "folds": 5}, deps=(sample, sweep))
    stage.key            # sha256 of (name, kind, settings, the keys of its deps): its inputs, not its outputs
    stage.folder(root)   # <root>/stages/fit-r0-<key[:10]>/

A stage's key covers its own settings and, through its dependencies' keys, everything upstream, so a rerun finds
every stage whose inputs did not change already done (its folder holds a stage.json) and a changed setting gives
new folders to exactly the stages downstream of it. Settings hold no machine paths (config hashes leave out
data.prepared_dir, train.output_dir and the mixture a run is given; data is keyed by its manifests' bytes), so
a study folder moved or rebuilt elsewhere keys the same. stage.json is written last, atomically: the one answer
to "is this stage done?"; a stage killed before it is redone (its verbs resume what they can: a sweep keeps its
finished runs, a training run its checkpoints). One process works in a stage folder at a time (its lock).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from mixlm import storage
from mixlm.errors import RunFolderLockedError
from mixlm.folder_lock import LOCK_FILE, writer_lock

STAGES = "stages"
RECORD = "stage.json"
RECORD_VERSION = 1
KEY_CHARS = 10  # of the sha256 in a folder name


def canonical_json(value: Any) -> str:
    """The one text a value hashes as: sorted keys, no spaces, floats as repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """name: unique in a study (`sweep-small-r0`); kind: what runs it (mixlm.study.pipeline); settings: the
    JSON-able values it computes from; deps: the stages whose outputs it reads."""

    name: str
    kind: str
    settings: Mapping[str, Any]
    deps: tuple[Stage, ...] = ()

    @functools.cached_property
    def key(self) -> str:
        return content_hash({"name": self.name, "kind": self.kind, "settings": self.settings,
                             "deps": {d.name: d.key for d in self.deps}})

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.key[:KEY_CHARS]}"

    def folder(self, root):
        return storage.location(root) / STAGES / self.dirname


class StageError(RuntimeError):
    """A stage's verb failed; `exit_code` is the verb's (the study exits with it)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StageLockedError(RunFolderLockedError):
    """Another process works in the stage folder (exit 2, as for a training run folder)."""


STUDY_VAR = "$STUDY"  # how a record writes a path inside the study folder


def _swap(value, old: str, new: str):
    """`value` with the folder `old` written as `new` in every string (where it stands whole or before a /)."""
    if isinstance(value, str):
        return new if value == old else value.replace(old + "/", new + "/")
    if isinstance(value, list):
        return [_swap(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _swap(v, old, new) for k, v in value.items()}
    return value


def relative_to_study(value, root):
    """Paths under the study folder as $STUDY/...: records read the same wherever the folder is moved."""
    return _swap(value, os.fspath(storage.location(root)), STUDY_VAR)


def absolute_in_study(value, root):
    return _swap(value, STUDY_VAR, os.fspath(storage.location(root)))


def read_record(stage: Stage, root) -> dict | None:
    """The stage's stage.json when it finished with these inputs (its $STUDY paths made absolute), else None."""
    path = stage.folder(root) / RECORD
    if not path.exists():
        return None
    try:
        record = storage.read_json(path)
    except ValueError:
        return None
    ok = isinstance(record, dict) and record.get("version") == RECORD_VERSION and record.get("key") == stage.key
    return absolute_in_study(record, root) if ok else None


def is_running(stage: Stage, root) -> bool:
    """Whether a live process holds the stage folder's lock (probed without taking it; a local folder)."""
    path = stage.folder(root) / LOCK_FILE
    if storage.is_remote(path) or not path.exists():
        return False
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@dataclasses.dataclass
class StageWork:
    """What a stage's function gets: its folder, and where it notes the commands it ran (the verbs' argv) and
    whether it trained (the record then counts device time)."""

    stage: Stage
    folder: Any
    log: Callable[[str], None]
    commands: list[list[str]] = dataclasses.field(default_factory=list)
    trained: bool = False


def _devices() -> tuple[str, int]:
    """(platform, devices) of this process's jax backend when jax is loaded: what a training stage occupied.
    A CPU host counts as one device (its fake devices share its cores)."""
    if "jax" not in sys.modules:
        return "cpu", 1
    import jax

    platform = jax.devices()[0].platform
    return platform, 1 if platform == "cpu" else jax.device_count()


def run_stage(stage: Stage, root, work: Callable[[StageWork], dict], log: Callable[[str], None] = print) -> dict:
    """The stage's record: read back when it is done, else made by `work` (holding the folder's lock) and written
    as stage.json. `work` returns the stage's outputs (JSON-able), kept in the record for the stages after it."""
    done = read_record(stage, root)
    if done is not None:
        return done
    folder = stage.folder(root)
    with writer_lock(folder, "mixlm study", StageLockedError,
                     rerun_note="(a rerun of the study continues after it)"):
        done = read_record(stage, root)  # finished by the holder we waited behind
        if done is not None:
            return done
        log(f"study: stage {stage.name} ({stage.kind}) -> {folder}")
        started = time.time()
        task = StageWork(stage, folder, log)
        outputs = work(task)
        seconds = time.time() - started
        platform, devices = _devices() if task.trained else ("cpu", 0)
        record = {
            "version": RECORD_VERSION, "name": stage.name, "kind": stage.kind, "key": stage.key,
            "settings": dict(stage.settings), "deps": {d.name: d.key for d in stage.deps},
            "commands": task.commands, "outputs": outputs, "seconds": round(seconds, 3),
            "platform": platform, "devices": devices,
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_json(folder / RECORD, relative_to_study(record, root))
        log(f"study: stage {stage.name} done in {seconds:.0f}s")
        return absolute_in_study(relative_to_study(record, root), root)
