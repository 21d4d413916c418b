"""Orbax checkpoints of a training run: save, retain, validate, resume, and stop cleanly on preemption.

One Orbax `CheckpointManager` over `<train.output_dir>/checkpoints/`; each step is a Composite:

    checkpoints/<step>/state/            TrainState (step, params, optimizer state): sharded arrays, OCDBT
    checkpoints/<step>/data/metadata     the data source's `get_state()` (JSON), so batches resume exactly
    checkpoints/<step>/meta/metadata     JSON: resolved config, mixture, tokens seen per domain, mixlm
                                         version, git commit, mesh shape, time, value sums of every array
                                         of the state (VALUE_SUMS)
    checkpoints/<step>/mixlm_files.json  size and crc32 of every file above, written once the step has
                                         committed (crc32 with checkpoint.verify, the default)
    .mixlm.lock                          the run folder's lock while a run writes to it (RunFolderLock)

Guarantees, and who gives them:
* A save is atomic (Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it on commit; leftovers of a
  killed save are removed on the next start), and retention deletes an old step only after the newer one
  committed (Orbax's finalize thread: commit, then delete).
* One writer per run folder: a writing RunCheckpoints holds an flock on `<train.output_dir>/.mixlm.lock`
  (taken by process 0 before Orbax touches the folder, released by `close()` or by the kernel when the
  process dies); a second run is refused with RunFolderLockedError naming the holder (host, pid, since).
* On resume each step, newest first, is validated: its file list must match `mixlm_files.json` (missing
  or truncated files, and with checkpoint.verify a changed crc32: same-size corruption; lists without
  checksums, from older mixlm, are checked by size) and it must restore without error. A step with no file list
  (a run killed right after the save committed, before the list was written) is checked by what it restores:
  its values against the value sums (VALUE_SUMS) its meta item was saved with (an older checkpoint without
  them: every value must be finite); only then is its file list written, so later damage is caught.
  A bad step is moved to `checkpoints_corrupt/<step>` with a warning naming it, and the next older step is
  used. When no step is good nothing is moved and `CheckpointError` is raised: a long run never silently
  restarts from scratch.
* Restore targets the *current* mesh (`TrainSetup.abstract_state` carries its shardings), so a run saved
  on 8 devices resumes on 4 or on 1. Embedding rows are padded to a multiple of the device count; a
  difference in that padding (and nothing else) is absorbed by truncating/zero-padding the padding rows.
* Elastic resume: a step saved by P processes restores on any other process count Q (and device count)
  for which the config still validates (train.global_batch_size divisible by Q and by the data-parallel
  size). Orbax reads every saving process's OCDBT folder onto the current mesh's shardings; the data state is
  global (one copy, from process 0; see mixlm.data.pipeline), so the next global batches are the ones the
  uninterrupted run would have trained on; checksums are verified by `checksum_owner` for the current count;
  the meta item's process_count and mesh are recorded and reported on such a resume, never checked. Nothing
  else depends on the process count (tests/test_elastic_resume.py: 2 processes -> 1 and -> 4).
* Resuming with a different config is refused naming the keys (`config_diff`), except RESUMABLE_KEYS and
  RESUMABLE_SECTIONS below; `allow_config_change` (CLI: --allow-config-change) resumes anyway.
* A save that fails (disk full, permissions) raises CheckpointSaveError naming the step folder and the
  previous step, which is kept. Orbax's own error logs and tracebacks of such a failure go to debug level
  (quiet_orbax_errors): the user sees mixlm's one line.
* `PreemptionGuard`: SIGTERM/SIGINT end the loop after the current step, which is then saved and waited for.
* Reading for export (the last section): `open_checkpoint(path, step=None)` is the newest complete step
  as an `OrbaxSource` that restores one param at a time (a param that does not read back, or holds NaN/inf,
  raises CheckpointError naming the step); `MemorySource` wraps params already in memory.

Multi-process: every process calls the same methods; Orbax coordinates array writes, only the primary
process writes JSON items, `mixlm_files.json` and moves corrupt steps. Checksums are split by
`checksum_owner`: each process hashes its own `state/ocdbt.process_<i>/` folder (at save it hands them to
process 0 in `mixlm_files.json.process_<i>`), process 0 the rest, so no process reads the whole step back. The data state is saved once (by
process 0), so it must be the same on every process (it is for both mixlm sources: the global step and
global packing cursors).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import mixlm
from mixlm.config import (
    CheckpointConfig,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    config_diff,
    config_from_dict,
)
from mixlm.errors import ExportError
from mixlm.models import stacked

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints_corrupt"
FILE_LIST = "mixlm_files.json"
LOCK_FILE = ".mixlm.lock"
# zlib.crc32 of each file: benchmarks/checkpoint_io.py times it against adler32, md5, sha256 and blake2b on a
# step's files ("Which checksum"); it catches torn and overwritten bytes, it is no defence against tampering.
CHECKSUM = "crc32"
_OCDBT_PREFIX = "ocdbt.process_"

# Config keys that may change when a run resumes (everything else must match the checkpoint's config):
# how long to train (the schedule is recomputed for the new total), where and how often to log, eval and
# save, the device layout, the loader's worker count (batches do not depend on it), the multi-process
# heartbeat, and how attention is computed / what is rematerialised (same math, other kernels and memory).
RESUMABLE_KEYS = ("train.steps", "train.output_dir", "train.heartbeat_timeout_s", "data.num_workers", "model.attention",
                  "model.remat", "train.grad_accum_steps")  # same math: micro-batch sums add up to the batch
RESUMABLE_SECTIONS = ("mesh", "checkpoint", "eval", "logging")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that cannot serve this run; the message says what to do."""


class ConfigMismatchError(CheckpointError):
    """The output folder holds a run with a different config."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the older checkpoints are kept."""


class RunFolderLockedError(CheckpointError):
    """Another process holds the run folder's lock (RunFolderLock): one writer per train.output_dir."""


class CheckpointCorruptWarning(UserWarning):
    """A checkpoint step failed validation and was moved aside."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # TrainState on the current mesh
    data_state: dict
    meta: dict
    path: str


def checkpoint_dir(output_dir: str | Path) -> epath.Path:
    return _absolute(epath.Path(output_dir)) / CHECKPOINT_SUBDIR


def _absolute(path: epath.Path) -> epath.Path:
    """Orbax refuses relative paths; a local relative folder (train.output_dir=runs/x) is made absolute,
    a remote one (gs://...) is left as it is."""
    text = str(path)
    return path if "://" in text or text.startswith("/") else epath.Path(Path(text).absolute())


# ---- metadata ------------------------------------------------------------------------------------------

_GIT_COMMIT: str | None = None


def git_commit() -> str:
    """`git describe --always --dirty` of the mixlm source tree ('' outside a git checkout); cached."""
    global _GIT_COMMIT
    if _GIT_COMMIT is None:
        try:
            out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], check=False,
                                 cwd=Path(mixlm.__file__).parent, capture_output=True, text=True, timeout=10)
            _GIT_COMMIT = out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            _GIT_COMMIT = ""
    return _GIT_COMMIT


def run_metadata(cfg: ExperimentConfig, step: int, *, tokens_seen: dict[str, int], mesh=None) -> dict:
    """The `meta` item of a checkpoint (JSON)."""
    return {
        "step": step,
        "config": cfg.to_dict(),
        "mixture": cfg.data.mixture,
        "tokens_seen": {k: int(v) for k, v in tokens_seen.items()},
        "tokens_seen_total": int(sum(tokens_seen.values())),
        "mixlm_version": mixlm.__version__,
        "git_commit": git_commit(),
        "mesh": dict(mesh.shape) if mesh is not None else {},
        "process_count": jax.process_count(),
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def resume_ignored_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    d = cfg.to_dict()
    return RESUMABLE_KEYS + tuple(f"{s}.{k}" for s in RESUMABLE_SECTIONS for k in d[s])


def check_resume_config(saved: dict, cfg: ExperimentConfig, *, where: str, allow_change: bool,
                        log: Callable[[str], None]) -> None:
    """Raises ConfigMismatchError naming the keys that differ between `saved` (a config dict) and `cfg`,
    apart from RESUMABLE_KEYS / RESUMABLE_SECTIONS; with `allow_change` it only reports them."""
    saved_cfg = config_from_dict(saved)
    if saved_cfg.train.steps != cfg.train.steps and cfg.schedule.kind != "constant":
        log(f"train.steps changed from {saved_cfg.train.steps} to {cfg.train.steps}: the {cfg.schedule.kind} "
            "learning-rate schedule is recomputed for the new total from here on")
    diffs = config_diff(saved_cfg, cfg, ignore=resume_ignored_keys(cfg))
    if not diffs:
        return
    old, new = saved_cfg.to_dict(), cfg.to_dict()
    listing = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in diffs)
    if allow_change:
        log(f"resuming {where} with a changed config (--allow-config-change): {listing}")
        return
    raise ConfigMismatchError(
        f"{where} was written by a run with a different config: {listing}. Use another train.output_dir, "
        "restore the old values, or pass --allow-config-change to resume with the new ones"
    )


def _get(tree: dict, dotted: str):
    section, key = dotted.split(".", 1)
    return tree.get(section, {}).get(key)


# ---- validation ----------------------------------------------------------------------------------------


def _step_files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """{path relative to step_dir: path} of every file below it but the file list and its per-process parts
    (a walk with iterdir: works on GCS)."""
    files, folders = {}, [step_dir]
    while folders:
        for p in folders.pop().iterdir():
            if p.is_dir():
                folders.append(p)
            elif not p.name.startswith(FILE_LIST):
                files[str(p.relative_to(step_dir))] = p
    return files


def file_crc32(path: epath.Path) -> str:
    """zlib.crc32 of a file's bytes, as 8 hex digits (read in 4 MiB chunks)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_owner(name: str, process_count: int) -> int:
    """The process that checksums a file of a step (at save and at restore): files under process k's OCDBT
    folder (`state/ocdbt.process_k/`) are process k's (k mod the current count), the rest process 0's."""
    for part in name.split("/"):
        if part.startswith(_OCDBT_PREFIX) and part[len(_OCDBT_PREFIX):].isdigit():
            return int(part[len(_OCDBT_PREFIX):]) % process_count
    return 0


def _checksums(files: dict[str, epath.Path], process_index: int = 0, process_count: int = 1) -> dict[str, str]:
    """{name: crc32} of the files this process owns (checksum_owner); a few threads, as zlib releases the GIL
    and a remote file system rewards overlapping reads."""
    mine = sorted(n for n in files if checksum_owner(n, process_count) == process_index)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(mine, pool.map(lambda n: file_crc32(files[n]), mine)))


def _part_path(step_dir: epath.Path, process_index: int) -> epath.Path:
    return step_dir / f"{FILE_LIST}.process_{process_index}"


def write_checksum_part(step_dir: epath.Path, process_index: int, process_count: int) -> None:
    """Multi-process, processes > 0: the checksums of this process's files, for process 0 to merge into the
    file list (write_file_list) so that no process reads the whole checkpoint back."""
    sums = _checksums(_step_files(step_dir), process_index, process_count)
    _part_path(step_dir, process_index).write_text(json.dumps(sums, sort_keys=True))


def write_file_list(step_dir: epath.Path, *, checksums: bool = True, process_count: int = 1) -> None:
    """Records every file's size, and with `checksums` its crc32 (this process's files, plus the parts other
    processes wrote), in `<step>/mixlm_files.json` (call on process 0 once the step has committed)."""
    files = _step_files(step_dir)
    listing: dict = {"files": {name: p.stat().length for name, p in files.items()}}
    if checksums:
        sums = _checksums(files, 0, process_count)
        for i in range(1, process_count):
            part = _part_path(step_dir, i)
            if part.exists():  # else those files keep their size check only
                sums.update(json.loads(part.read_text()))
        listing[CHECKSUM] = {name: sums[name] for name in sorted(sums) if name in files}
    tmp = step_dir / (FILE_LIST + ".tmp")
    tmp.write_text(json.dumps(listing, sort_keys=True))
    tmp.replace(step_dir / FILE_LIST)
    for i in range(1, process_count):
        _part_path(step_dir, i).unlink(missing_ok=True)


def file_problem(step_dir: epath.Path, *, verify: bool = True, process_index: int = 0,
                 process_count: int = 1) -> str:
    """'' when every file in `mixlm_files.json` is present at its recorded size and, with `verify`, has its
    recorded crc32 (the files this process owns, checksum_owner; lists written without checksums are checked
    by size only), else what is wrong. A step with no list at all (a run killed right after the commit) gives ''
    here: it is unverified (is_listed), and its callers check what it restores (unlisted_problem)."""
    listing = step_dir / FILE_LIST
    if not listing.exists():
        return ""
    try:
        recorded = json.loads(listing.read_text())
        expected, sums = recorded["files"], recorded.get(CHECKSUM, {}) if verify else {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its file list {FILE_LIST} is unreadable"
    actual = _step_files(step_dir)
    for name, size in sorted(expected.items()):
        if name not in actual:
            return f"{name} is missing"
        length = actual[name].stat().length
        if length != size:
            return f"{name} is {length} bytes, expected {size}"
    try:
        found = _checksums({n: actual[n] for n in sums if n in actual}, process_index, process_count)
    except OSError as e:
        return f"a file does not read back ({e})"
    for name, crc in sorted(found.items()):
        if crc != sums[name]:
            return f"{name} has {CHECKSUM} {crc}, expected {sums[name]} (same size: its bytes changed)"
    return ""


def is_listed(step_dir: epath.Path) -> bool:
    """Whether the step has its file list (else nothing records what its files should hold: it is unverified)."""
    return (epath.Path(step_dir) / FILE_LIST).exists()


def _replicated_jit(fn: Callable, arrays: list):
    """fn(arrays) jitted with every output replicated on the arrays' mesh (so each process reads them whole)."""
    meshes = [a.sharding.mesh for a in arrays if isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding)]
    out = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec()) if meshes else None
    return jax.jit(fn, out_shardings=out)(arrays)


def non_finite_values(tree) -> dict[str, int]:
    """{leaf path: count of NaN/inf elements} of the floating-point leaves of `tree` (jax or numpy arrays) that
    have any; {} when every value is finite. One jitted reduction per call; the counts are global (every
    process gets the same answer)."""
    named = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
             if np.issubdtype(x.dtype, np.inexact)]
    if not named:
        return {}
    counts = _replicated_jit(lambda xs: [jax.numpy.sum(~jax.numpy.isfinite(x)) for x in xs],
                             [x for _, x in named])
    return {name: int(c) for (name, _), c in zip(named, counts) if int(c)}


# ---- value sums: what a step's arrays held when it was saved, in its own meta item ---------------------
# Per leaf, two wrapping uint32 sums of the values' bit patterns: plain, and weighted by an odd number made
# from each element's coordinates. Integer sums are exact in any order, so they match across meshes, process
# counts and host or device arithmetic; any one changed element changes the first, a moved one the second.
# They verify a step whose file list is missing (a run killed right after the commit): Orbax commits the meta
# item together with the arrays.

VALUE_SUMS = "value_sums"
_COORD_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C)
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def leaf_names(tree) -> list[str]:
    """'params/layers/0/mlp/down_proj/kernel'-style names of `tree`'s leaves, in jax.tree order."""
    def part(key) -> str:
        return str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))))

    return ["/".join(part(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _summable(x) -> bool:
    return np.dtype(x.dtype).itemsize in _UINT_OF_SIZE and np.dtype(x.dtype) != np.bool_


def _device_sums(x):
    uint = _UINT_OF_SIZE[np.dtype(x.dtype).itemsize]
    bits = jax.lax.bitcast_convert_type(x, uint).astype(np.uint32)
    weight = jax.numpy.ones(x.shape, np.uint32)
    for axis in range(x.ndim):
        coord = jax.lax.broadcasted_iota(np.uint32, x.shape, axis)
        weight = weight + 2 * coord * np.uint32(_COORD_MULTIPLIERS[axis % len(_COORD_MULTIPLIERS)])
    return jax.numpy.sum(bits, dtype=np.uint32), jax.numpy.sum(bits * weight, dtype=np.uint32)


def host_value_sum(a: np.ndarray, rows_per_chunk: int = 1 << 16) -> str:
    """The value sum (see VALUE_SUMS) of a host array, as 16 hex digits; computed in chunks of rows so a large
    embedding needs no full-size temporaries."""
    a = np.ascontiguousarray(a)
    bits = a.view(_UINT_OF_SIZE[a.dtype.itemsize]).reshape(a.shape)
    if a.ndim == 0:
        bits = bits.reshape(1)
    plain = weighted = 0
    for start in range(0, bits.shape[0], rows_per_chunk):
        chunk = bits[start:start + rows_per_chunk].astype(np.uint32)
        weight = np.ones(chunk.shape, np.uint32)
        for axis in range(a.ndim):
            shape = [1] * chunk.ndim
            shape[axis] = chunk.shape[axis]
            coord = np.arange(chunk.shape[axis], dtype=np.uint32) + np.uint32(start if axis == 0 else 0)
            weight += np.uint32(2) * coord.reshape(shape) * np.uint32(_COORD_MULTIPLIERS[axis % len(_COORD_MULTIPLIERS)])
        plain = (plain + int(chunk.sum(dtype=np.uint32))) & 0xFFFFFFFF
        weighted = (weighted + int((chunk * weight).sum(dtype=np.uint32))) & 0xFFFFFFFF
    return f"{plain:08x}{weighted:08x}"


def value_sums(tree) -> dict[str, str]:
    """{leaf name: value sum} of a pytree of jax arrays (one jitted reduction; every process gets all of
    them); equals host_value_sum of each leaf's values."""
    named = [(n, x) for n, x in zip(leaf_names(tree), jax.tree.leaves(tree)) if _summable(x)]
    if not named:
        return {}
    sums = _replicated_jit(lambda xs: [_device_sums(x) for x in xs], [x for _, x in named])
    return {n: f"{int(p):08x}{int(w):08x}" for (n, _), (p, w) in zip(named, sums)}


def unlisted_problem(state, meta: dict, exact: bool) -> str:
    """What is wrong with a step that has no file list, from what it restored ('' when nothing): `state`'s
    values against the value sums of the step's `meta` item (saved with the arrays), else (an older
    checkpoint, other leaves, or `exact` False: vocabulary padding changed on restore) whether they are all
    finite."""
    unlisted = f"it has no file list {FILE_LIST} (the run stopped right after saving it)"
    saved, now = meta.get(VALUE_SUMS) or {}, value_sums(state)
    if exact and now and set(now) <= set(saved):
        changed = [n for n, v in now.items() if saved[n] != v]
        if changed:
            return (f"{unlisted} and the values it restores differ from those saved (value sums of "
                    f"{len(changed)} arrays, e.g. {', '.join(changed[:3])})")
        return ""
    non_finite = non_finite_values(state)
    return f"{unlisted} and {_non_finite_text(non_finite)}" if non_finite else ""


def _non_finite_text(bad: dict[str, int]) -> str:
    total = sum(bad.values())
    first = ", ".join(f"{name} ({n:,})" for name, n in list(bad.items())[:3])
    return f"{total:,} restored values are NaN or infinite (in {first}{', ...' if len(bad) > 3 else ''})"


def _all_processes(ok: bool) -> bool:
    """True only if `ok` on every process (so all processes take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_args_for(saved_tree, target, vocab_size: int):
    """Checks a checkpoint's array shapes against the restore target. Returns True (strict restore) when
    all match, False when some differ only in vocabulary padding (a dimension padded to a multiple of the
    device count: both sizes ≥ vocab_size); raises CheckpointError for any other difference."""
    saved = ocp.tree.to_flat_dict(saved_tree, sep=".")
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(target, keep_empty_nodes=True), sep=".")
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint's state has a different structure: missing {missing[:5]}, unexpected "
            f"{extra[:5]} (was it written with another model or optimizer?)"
        )
    strict = True
    for key, want in wanted.items():
        have = tuple(getattr(saved[key], "shape", ()) or ())
        if have == tuple(want.shape):
            continue
        differ = [i for i, (a, b) in enumerate(zip(have, want.shape)) if a != b]
        padding_only = len(differ) == 1 and min(have[differ[0]], want.shape[differ[0]]) >= vocab_size
        if len(have) == len(want.shape) and padding_only:
            strict = False  # only the padding rows beyond vocab_size change
            continue
        raise CheckpointError(
            f"the checkpoint's {key} has shape {have}, this run needs {tuple(want.shape)}; the model config "
            "differs from the one that wrote the checkpoint"
        )
    return strict


# ---- one writer per run folder ------------------------------------------------------------------------


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


def _lock_on_process_0(folder: epath.Path, log: Callable[[str], None]) -> RunFolderLock | None:
    """The run folder's lock, taken by process 0 only; every process raises when process 0 could not take
    it. None for an object store (gs://...: no file locks there)."""
    if "://" in str(folder):
        return None
    lock, error = RunFolderLock(Path(str(folder)), log), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except CheckpointError as e:
            error = e
    if not _all_processes(error is None):
        lock.release()
        raise error or RunFolderLockedError(f"process 0 could not lock the run folder {folder}; its log says why")
    return lock


def os_reason(e: BaseException) -> str:
    """'<strerror>: <file>' for an OSError (also one wrapped by Orbax, or TensorStore's text of one:
    `... Failed writing: "<file>" ... [os_error_code='28']`), else the short text."""
    while not isinstance(e, OSError) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        where = re.search(r'(?:Failed writing|Error opening|Failed to open)[^"]*"([^"]+)"', text)
        reason = os.strerror(int(code.group(1)))
        return f"{reason}: {where.group(1)}" if where else reason
    return f"{type(e).__name__}: {_short(e)}"


# ---- Orbax's own error output ---------------------------------------------------------------------------
# A failed save or restore makes Orbax log each failing background operation at ERROR with a traceback,
# asyncio log Orbax's gathered futures whose "exception was never retrieved", and TensorStore's callbacks into
# Orbax's closed event loops print "Event loop is closed" tracebacks (hundreds, as unraisable exceptions);
# mixlm turns the failure itself into one line (CheckpointSaveError, ...). These go to debug level: the
# 'absl' and 'asyncio' loggers' records (at DEBUG) and the 'mixlm.checkpoint' logger.

_log = logging.getLogger("mixlm.checkpoint")
_ORBAX_DIR = f"{os.sep}orbax{os.sep}"
_quiet_installed = False


def _from_orbax(record: logging.LogRecord) -> bool:
    """Logged by Orbax, or about an exception raised inside Orbax."""
    if _ORBAX_DIR in record.pathname:
        return True
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if _ORBAX_DIR in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _OrbaxErrorsToDebug(logging.Filter):
    """Orbax's ERROR records (and asyncio's about Orbax's failed futures) become DEBUG records, shown only
    when their logger logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and _from_orbax(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_orbax_errors() -> None:
    """Moves Orbax's error tracebacks and TensorStore's "Event loop is closed" tracebacks to debug level
    (idempotent; what mixlm reports about a failed save or restore is unchanged)."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxErrorsToDebug())
    previous = sys.unraisablehook

    def unraisable(info) -> None:
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
            _log.debug("TensorStore callback into a closed Orbax event loop",
                       exc_info=(info.exc_type, info.exc_value, info.exc_traceback))
            return
        previous(info)

    sys.unraisablehook = unraisable


# ---- the manager ---------------------------------------------------------------------------------------


def _item_handlers() -> dict:
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


class RunCheckpoints:
    """The checkpoints of one run: `save` every `checkpoint.every` steps and at the end, keep the last
    `keep_last` (0: all) plus every `keep_every`-th step, `restore_latest` the newest good one."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False,
                 log: Callable[[str], None] = print):
        self.directory = _absolute(epath.Path(directory))
        self.cfg, self.log, self.read_only = cfg, log, read_only
        quiet_orbax_errors()
        # The run folder's one writer: locked before Orbax creates folders or cleans up a save in progress.
        self._lock = None if read_only else _lock_on_process_0(self.directory.parent, log)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last or None, keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=not read_only,
            create=not read_only, read_only=read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=_item_handlers())
        except OSError as e:
            self._release_lock()
            raise CheckpointError(f"cannot create the checkpoint folder {self.directory} ({os_reason(e)}); "
                                  "fix its permissions or choose another train.output_dir") from None
        except BaseException:
            self._release_lock()
            raise
        self._unlisted: int | None = None  # a committed (or committing) step without its file list yet
        self._save_error: CheckpointSaveError | None = None  # sticky: Orbax re-raises a failed save forever

    # ---- saving ----
    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int, last_step: int) -> bool:
        every = self.cfg.every and step % self.cfg.every == 0
        return bool(every or (step == last_step and self.cfg.save_at_end))

    def save(self, step: int, state, *, data_state: dict, meta: dict) -> bool:
        """Starts saving (returns once the arrays are copied off the devices when async_save; the state
        may then be donated). False when `step` is already saved."""
        self.wait()  # the previous save must commit first (Orbax would wait here anyway)
        if step in self._manager.all_steps():
            return False
        meta = {**meta, VALUE_SUMS: value_sums(state)}  # committed with the arrays: verifies them without a list
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - a sync save (or the start of an async one) failed
            self._save_failed(step, e)
        self._unlisted = step
        return True

    def wait(self) -> None:
        """Blocks until the last save committed, then records its file list (sizes and, with
        checkpoint.verify, checksums: process 0 those of its files, every other process those of its own
        OCDBT folder). Raises CheckpointSaveError if the save failed (older checkpoints are then untouched)."""
        if self._save_error is not None:
            raise self._save_error
        step, self._unlisted = self._unlisted, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background write or the commit failed
            self._save_failed(step, e)
        if step is not None:
            self._list_step(self.directory / str(step))

    def _list_step(self, step_dir: epath.Path) -> None:
        """Writes a committed step's file list (every process calls it: each checksums its own files)."""
        count = jax.process_count()
        if self.cfg.verify and count > 1:
            _sync("mixlm_checkpoint_committed")  # process 0's commit rename is done
            if jax.process_index() > 0 and step_dir.exists():
                write_checksum_part(step_dir, jax.process_index(), count)
            _sync("mixlm_checkpoint_checksum_parts")
        if jax.process_index() == 0 and step_dir.exists():
            write_file_list(step_dir, checksums=self.cfg.verify, process_count=count)
        _sync("mixlm_checkpoint_file_list")

    def _save_failed(self, step: int | None, e: Exception):
        # From the folder: Orbax's own list may already have dropped a step that retention deletes after this
        # save commits (which it now never will).
        kept = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.exists() else []
        kept = [s for s in kept if step is None or s < step]
        where = self.directory / str(step) if step is not None else self.directory
        previous = (f"the previous checkpoint (step {max(kept)}, {self.directory / str(max(kept))}) is kept"
                    if kept else "there is no earlier checkpoint")
        self._save_error = CheckpointSaveError(
            f"saving checkpoint step {step} to {where} failed ({os_reason(e)}); {previous}. Free disk space or "
            "fix the folder's permissions, then rerun the same command to resume")
        raise self._save_error from e

    def close(self) -> None:
        """Waits for the last save, closes Orbax and releases the run folder's lock (also when a save
        failed: that error is raised once, by the wait that saw it)."""
        try:
            if self._save_error is None:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if self._save_error is None:
                    raise
            finally:
                self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def reached_preemption(self, step: int) -> bool:
        """Multi-process: JAX's preemption sync point (all processes agree on the step)."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)

    # ---- restoring ----
    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _restore(self, step: int, abstract_state, vocab_size: int) -> tuple[Any, dict, bool]:
        """(state, data state, whether the shapes matched exactly: no vocabulary padding was cut or added)."""
        saved_tree = self._manager.item_metadata(step)["state"]
        strict = restore_args_for(getattr(saved_tree, "tree", saved_tree), abstract_state, vocab_size)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state, strict=strict), data=ocp.args.JsonRestore()))
        return out["state"], out["data"], strict

    def restore_latest(self, abstract_state, cfg: ExperimentConfig, *,
                       allow_config_change: bool = False) -> Restored | None:
        """The newest step that validates, restored onto `abstract_state`'s shardings (with its data state
        and meta); None when the folder holds no checkpoint. Newer steps that fail validation are reported
        and moved to checkpoints_corrupt/, but only once a good step is found (else CheckpointError). A step
        without a file list is used only if what it restores checks out (unlisted_problem); its list is then
        written."""
        bad: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            listed = _all_processes(is_listed(step_dir))
            problem = file_problem(step_dir, verify=self.cfg.verify, process_index=jax.process_index(),
                                   process_count=jax.process_count())
            meta = None
            if not problem:
                try:
                    meta = self.read_meta(step)
                    if "config" not in meta:
                        problem = "its meta item has no config"
                except Exception as e:  # noqa: BLE001 - any read failure means an unusable step
                    problem = f"its metadata is unreadable ({type(e).__name__}: {_short(e)})"
            if _all_processes(not problem):
                # A config mismatch is not corruption: refuse before touching anything.
                where = f"{self.directory.parent} (checkpoint step {step})"
                check_resume_config(meta["config"], cfg, where=where, allow_change=allow_config_change,
                                    log=self.log)
                try:
                    state, data_state, exact = self._restore(step, abstract_state, cfg.model.vocab_size)
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001
                    problem = f"it does not restore ({type(e).__name__}: {_short(e)})"
                    state = None
                if not listed and state is not None:
                    problem = unlisted_problem(state, meta, exact)
                if _all_processes(not problem):
                    if not listed and not self.read_only:
                        self._list_step(step_dir)
                        self.log(f"checkpoint step {step} ({step_dir}) had no file list (the run stopped right "
                                 "after saving it): its restored values check out; its file list is written now")
                    self._move_aside(bad, good=step)
                    self._report_elastic(step, meta, abstract_state)
                    return Restored(step=step, state=state, data_state=data_state, meta=meta,
                                    path=str(step_dir))
            bad.append((step, problem or _ON_ANOTHER_PROCESS))
        if bad:
            listing = "; ".join(f"step {s} ({self.directory / str(s)}): {p}" for s, p in bad)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: {listing}. Nothing was moved or deleted; move "
                "the folder away to start from scratch"
            )
        return None

    def _report_elastic(self, step: int, meta: dict, abstract_state) -> None:
        """One line when the step was saved by another number of processes or on another mesh."""
        meshes = [x.sharding.mesh for x in jax.tree.leaves(abstract_state)
                  if hasattr(getattr(x, "sharding", None), "mesh")]
        mesh_now = dict(meshes[0].shape) if meshes else {}
        saved_count, saved_mesh = meta.get("process_count"), meta.get("mesh") or {}
        if saved_count is None or (saved_count, saved_mesh) == (jax.process_count(), mesh_now):
            return

        def processes(n: int) -> str:
            return f"{n} process" if n == 1 else f"{n} processes"

        self.log(f"elastic resume: checkpoint step {step} was saved by {processes(saved_count)} on mesh "
                 f"{saved_mesh}; restored onto {processes(jax.process_count())} on mesh {mesh_now} (the "
                 "data state is global: the next global batches are the same)")

    def _move_aside(self, bad: list[tuple[int, str]], *, good: int) -> None:
        """Warns about each bad step and moves it to checkpoints_corrupt/ (kept for inspection; out of the way
        of the step numbers this run will save again)."""
        if not bad:
            return
        corrupt_dir = self.directory.parent / CORRUPT_SUBDIR
        for step, problem in bad:
            src = self.directory / str(step)
            dest = corrupt_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            msg = (f"checkpoint step {step} ({src}) is corrupt: {problem}; moved it to {dest}; using step "
                   f"{good} ({self.directory / str(good)})")
            if jax.process_index() == 0:
                warnings.warn(msg, CheckpointCorruptWarning, stacklevel=3)
                self.log(f"WARNING: {msg}")
                corrupt_dir.mkdir(parents=True, exist_ok=True)
                src.rename(dest)
            elif problem != _ON_ANOTHER_PROCESS:  # what this process found (e.g. a checksum of its files)
                self.log(f"WARNING: {msg}")
        _sync("mixlm_checkpoint_move_aside")
        self._manager.reload()


_ON_ANOTHER_PROCESS = "it fails on another process"


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


# ---- params-only initialisation ------------------------------------------------------------------------


def resolve_step_dir(path: str | Path) -> epath.Path:
    """`checkpoint.init_from` may name a step folder (holds state/), a checkpoints/ folder or a run's
    output folder; for the latter two the newest good step is used (read-only: nothing is moved)."""
    p = epath.Path(path)
    if (p / "state").is_dir():
        return p
    ckpts = _checkpoints_folder(p)
    if not ckpts.is_dir():
        raise CheckpointError(f"checkpoint.init_from={path!r}: no such folder")
    reader = RunCheckpoints(ckpts, CheckpointConfig(), read_only=True)
    steps = {step: ckpts / str(step) for step in reader.steps()}

    def skip(step: int, step_dir, problem: str) -> None:
        warnings.warn(f"checkpoint.init_from: step {step} ({step_dir}) is corrupt: {problem}; "
                      "trying the one before", CheckpointCorruptWarning, stacklevel=4)

    chosen = newest_complete_step(steps, skip)
    if chosen is not None:
        return steps[chosen]
    raise CheckpointError(f"checkpoint.init_from={path!r}: no usable checkpoint step in {ckpts}")


def _checkpoints_folder(path):
    """The folder holding the step folders: `path`/checkpoints/ of a run's output folder, else `path`."""
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def newest_complete_step(steps: dict, on_skip: Callable[[int, Any, str], None]) -> int | None:
    """The newest of `steps` ({step: step folder}) whose files are complete (file_problem); each newer one
    that is not is reported to `on_skip(step, folder, problem)`. None when no step is complete."""
    for step in sorted(steps, reverse=True):
        problem = file_problem(epath.Path(steps[step]))
        if not problem:
            return step
        on_skip(step, steps[step], problem)
    return None


def _saved_state_tree(state_dir: epath.Path) -> dict:
    """The array metadata tree of a checkpoint's state item (shapes and dtypes; nothing is restored)."""
    saved = ocp.StandardCheckpointHandler().metadata(state_dir)
    return getattr(saved, "tree", saved)


def _layer_layout_change(saved_params, target_params) -> tuple[str, bool] | None:
    """(layers key, True when the target is the stacked layout) where the checkpoint's blocks are in the other
    layout ('0', '1', ... per layer against one stacked tree), else None."""
    for key, target in target_params.items():
        saved = saved_params.get(key) if hasattr(saved_params, "get") else None
        if (isinstance(target, dict) and hasattr(saved, "keys") and target and len(saved)
                and stacked.is_unstacked(dict(saved)) != stacked.is_unstacked(target)):
            return key, stacked.is_unstacked(dict(saved))
    return None


def _restore_host_params(state_dir: epath.Path, saved_params) -> dict:
    """Every param of the checkpoint as a host numpy array, in the checkpoint's own layout."""
    item = {"params": jax.tree.map(lambda _: 0, dict(saved_params))}
    restore_args = {"params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item["params"])}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                    partial_restore=True))
    return jax.tree.map(np.asarray, dict(out["params"]))


def _fit_rows(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` cut or zero-padded to `shape` (only vocabulary padding rows differ; restore_args_for checked that)."""
    if a.shape == tuple(shape):
        return a
    out = np.zeros(shape, a.dtype)
    common = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, shape))
    out[common] = a[common]
    return out


def restore_params(step_dir: str | Path, abstract_params, vocab_size: int):
    """Only the params of a checkpoint step, restored onto `abstract_params`' shardings. A checkpoint of the
    other layer layout (model.scan_layers on one side only) is restored to host, converted
    (mixlm.models.stacked) and placed on those shardings. A step without a file list is checked by what it
    restores (as restore_latest does); CheckpointError when that fails."""
    state_dir = epath.Path(step_dir) / "state"
    quiet_orbax_errors()
    saved_tree = _saved_state_tree(state_dir)
    if "params" not in saved_tree:
        raise CheckpointError(f"{state_dir} holds no params")
    relayout = _layer_layout_change(saved_tree["params"], abstract_params)
    if relayout is not None:
        key, to_stacked = relayout
        host = _restore_host_params(state_dir, saved_tree["params"])
        _check_unlisted_params(epath.Path(step_dir), host, exact=True)  # before the layout changes
        host = stacked.stack_layers(host, key) if to_stacked else stacked.unstack_layers(host, key)
        restore_args_for(host, abstract_params, vocab_size)  # same checks as a direct restore
        return jax.tree.map(lambda a, t: jax.device_put(_fit_rows(a, t.shape).astype(t.dtype), t.sharding),
                            host, abstract_params)
    strict = restore_args_for(saved_tree["params"], abstract_params, vocab_size)
    target = {"params": abstract_params}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype,
                                       strict=strict),
        target)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                                                    partial_restore=True))
    _check_unlisted_params(epath.Path(step_dir), out["params"], exact=strict)
    return out["params"]


def _check_unlisted_params(step_dir: epath.Path, params, *, exact: bool) -> None:
    """For a step without a file list: raises CheckpointError unless `params` (as saved: `exact`, else with
    vocabulary padding changed) match the value sums of its meta item, or, without them, are all finite."""
    if is_listed(step_dir):
        return
    meta = _read_meta(Path(str(step_dir)))
    problem = unlisted_problem({"params": params}, meta, exact)
    if problem:
        raise CheckpointError(f"checkpoint step {step_dir}: {problem}. Point checkpoint.init_from at an earlier "
                              "step folder")


# ---- preemption ----------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into "stop after the current step" (`requested(step)`); a second signal of the
    same kind acts as it did before (e.g. Ctrl-C twice aborts). With several processes, JAX's preemption
    service decides (SIGTERM on any process; all stop at the same step) and no Python handler is installed,
    so that JAX's own SIGTERM notifier stays in place."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoints: RunCheckpoints | None = None, log: Callable[[str], None] = print):
        self.checkpoints, self.log = checkpoints, log
        self.signal_name = ""
        self._previous: dict = {}

    def install(self) -> PreemptionGuard:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
        self.log(f"received {self.signal_name}: finishing the current step, then saving a checkpoint and "
                 f"exiting (send {self.signal_name} again to abort without saving)")

    def requested(self, step: int) -> bool:
        if self.signal_name:
            return True
        if self.checkpoints is not None and self.checkpoints.reached_preemption(step):
            self.signal_name = "preemption notice"
            return True
        return False


# ---- reading params for export: one array at a time ----------------------------------------------------
# What mixlm.hf.export reads: a ParamSource hands out one float32 numpy array at a time in our layout
# (mixlm.models), from a checkpoint step (OrbaxSource: a partial restore of that one array) or from
# memory (MemorySource), so exporting a model needs about two copies of its largest tensor, not of it all.

ParamPath = tuple[str, ...]


class ParamSource(Protocol):
    """Where export reads our params: one array at a time, float32, in our layout (mixlm.models)."""

    cfg: ExperimentConfig
    step: int | None
    meta: dict  # the checkpoint's metadata (tokens seen per domain, versions, ...); {} when unknown
    description: str  # for messages and the model card, e.g. the checkpoint step folder

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]: ...

    def read(self, path: ParamPath) -> np.ndarray: ...


def flatten_params(params: dict, prefix: ParamPath = ()) -> dict[ParamPath, object]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten_params(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def unflatten_params(flat: dict[ParamPath, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@dataclasses.dataclass
class MemorySource:
    """Params already in memory (split_params layout; jax or numpy arrays), e.g. `train(cfg).state.params`."""

    cfg: ExperimentConfig
    params: dict
    step: int | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    description: str = "params in memory"

    def __post_init__(self):
        if isinstance(self.cfg, ModelConfig):
            self.cfg = ExperimentConfig(model=self.cfg)
        self._flat = flatten_params(self.params)

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]:
        return {p: tuple(np.shape(a)) for p, a in self._flat.items()}

    def read(self, path: ParamPath) -> np.ndarray:
        return np.asarray(self._flat[path], np.float32)


class OrbaxSource:
    """The params of one checkpoint step (<step>/state, <step>/meta), restored array by array as host
    numpy arrays, so only the array being read is in memory. `verified`: the step's files matched its file
    list (False: it has none). A param that does not read back, holds NaN/inf, or (unverified) differs from
    its value sum in the meta item raises CheckpointError."""

    def __init__(self, step_dir: Path, cfg: ExperimentConfig, meta: dict, step: int, *, verified: bool = True):
        self.step_dir, self.cfg, self.meta, self.step = Path(step_dir), cfg, meta, step
        self.verified = verified
        self.description = str(self.step_dir)
        self._state_dir = epath.Path(self.step_dir) / "state"
        quiet_orbax_errors()
        try:
            tree = _saved_state_tree(self._state_dir)
        except Exception as e:  # noqa: BLE001 - garbage in Orbax's metadata: any error means a damaged step
            raise CheckpointError(self._damaged(f"its state metadata does not read ({type(e).__name__}: "
                                                f"{_short(e, 160)})")) from None
        if "params" not in tree:
            raise ExportError(f"{self._state_dir} holds no params (keys: {sorted(tree)})")
        self._shapes = {p: tuple(m.shape) for p, m in flatten_params(dict(tree["params"])).items()}
        self._checkpointer = ocp.PyTreeCheckpointer()

    def shapes(self) -> dict[ParamPath, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, path: ParamPath) -> np.ndarray:
        if path not in self._shapes:
            raise KeyError(f"{self._state_dir} has no param {'/'.join(path)}")
        name = "/".join(path)
        item = {"params": unflatten_params({path: 0})}
        restore_args = {"params": unflatten_params({path: ocp.RestoreArgs(restore_type=np.ndarray)})}
        try:
            out = self._checkpointer.restore(self._state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - e.g. ValueError: ... ZSTD_decompressStream() of garbage bytes
            raise CheckpointError(self._damaged(f"param {name} does not read back ({type(e).__name__}: "
                                                f"{_short(e, 160)})")) from None
        node = out["params"]
        for key in path:
            node = node[key]
        saved_sum = self.meta.get(VALUE_SUMS, {}).get(f"params/{name}") if not self.verified else None
        if saved_sum is not None and host_value_sum(np.asarray(node)) != saved_sum:
            raise CheckpointError(self._damaged(f"param {name} restores other values than were saved (its value "
                                                "sum differs from the one saved in the step's meta item)"))
        array = np.asarray(node, np.float32)
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:  # training never saves past a non-finite value: these bytes changed after the save
            raise CheckpointError(self._damaged(f"param {name} holds {bad:,} NaN or infinite values (of "
                                                f"{array.size:,})"))
        return array

    def _damaged(self, what: str) -> str:
        unlisted = "" if self.verified else f", which has no file list {FILE_LIST} (the run stopped right after saving it)"
        return (f"checkpoint step {self.step} ({self.step_dir}){unlisted}: {what}; its files are damaged. Export "
                "an earlier step with --step N, or rerun `mixlm train` on the run (it sets a damaged newest step "
                "aside and trains it again)")


def _step_dirs(checkpoints: Path) -> dict[int, Path]:
    return {int(p.name): p for p in checkpoints.iterdir() if p.name.isdigit() and (p / "state").is_dir()}


def open_checkpoint(path: str | Path, step: int | None = None) -> OrbaxSource:
    """The checkpoint at `path`: a run's output folder (train.output_dir), its checkpoints/ folder, or one
    step folder. `step` picks a step; by default the newest step whose files are complete (a step with
    missing or truncated files is skipped with a warning naming it). A step without a file list comes with
    `verified=False` (each param is checked against its saved value sum as it is read). Raises ExportError, or
    CheckpointError for a step whose files are damaged."""
    p = Path(path).absolute()  # Orbax reads absolute paths only
    if not p.is_dir():
        raise ExportError(f"{path}: no such folder; pass a run's output folder (train.output_dir), its "
                          "checkpoints/ folder, or one checkpoint step folder")
    if (p / "state").is_dir() and p.name.isdigit():
        steps = {int(p.name): p}
        where = p.parent
    else:
        where = _checkpoints_folder(p)
        steps = _step_dirs(where)
    if not steps:
        raise ExportError(f"{path}: holds no mixlm checkpoint (expected checkpoints/<step>/state/); was the "
                          "run saved (checkpoint.save_at_end / checkpoint.every)?")
    if step is not None:
        if step not in steps:
            raise ExportError(f"{path}: there is no checkpoint step {step}; available steps: "
                              f"{', '.join(map(str, sorted(steps)))}")
        problem = file_problem(epath.Path(steps[step]))
        if problem:
            raise ExportError(f"checkpoint step {step} ({steps[step]}) is incomplete: {problem}")
        chosen = step
    else:

        def skip(s: int, step_dir: Path, problem: str) -> None:
            warnings.warn(f"checkpoint step {s} ({step_dir}) is incomplete: {problem}; trying the one before",
                          stacklevel=4)

        chosen = newest_complete_step(steps, skip)
        if chosen is None:
            raise ExportError(f"{where}: no complete checkpoint step (all of {sorted(steps)} have missing or "
                              "truncated files)")
    step_dir = steps[chosen]
    try:
        meta = _read_meta(step_dir)
    except Exception as e:  # noqa: BLE001 - garbage in the JSON item
        raise CheckpointError(f"checkpoint step {chosen} ({step_dir}): its metadata does not read "
                              f"({type(e).__name__}: {_short(e, 160)}); its files are damaged. Export an earlier "
                              "step with --step N") from None
    cfg_dict = meta.get("config")
    if cfg_dict is None:
        run_config = where.parent / "config.yaml"
        if not run_config.is_file():
            raise ExportError(f"{step_dir}: its metadata has no config and there is no {run_config}")
        import yaml

        cfg_dict = yaml.safe_load(run_config.read_text())
    try:
        cfg = config_from_dict(cfg_dict)
    except ConfigError as e:
        raise ExportError(f"{step_dir}: the saved config does not load: {e}") from None
    return OrbaxSource(step_dir, cfg, meta, chosen, verified=is_listed(epath.Path(step_dir)))


def _read_meta(step_dir: Path) -> dict:
    """The checkpoint's JSON `meta` item ({} when the step has none); RunCheckpoints.read_meta without a
    CheckpointManager, for a single step folder."""
    meta_dir = step_dir / "meta"
    if not meta_dir.is_dir():
        return {}
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(epath.Path(meta_dir)))
