"""The checkpoints of one run (RunCheckpoints: save, retain, validate, resume), and Orbax's own error output
turned down to debug level (the user sees mixlm's one line)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mixlm import collectives, storage
from mixlm.config import CheckpointConfig, ExperimentConfig

# ---- Orbax's own error output ---------------------------------------------------------------------------
# A failed save or restore makes Orbax log each failing background operation at ERROR with a traceback,
# asyncio log Orbax's gathered futures whose "exception was never retrieved", and TensorStore's callbacks into
# Orbax's closed event loops print "Event loop is closed" tracebacks (hundreds, as unraisable exceptions);
# mixlm turns the failure itself into one line (CheckpointSaveError, ...). These go to debug level: the
# 'absl' and 'asyncio' loggers' records (at DEBUG) and the 'mixlm.checkpoint' logger.

_log = logging.getLogger("mixlm.checkpoint")
_ORBAX_DIR = f"{os.sep}orbax{os.sep}"
_quiet_installed = False
from mixlm.checkpoint import staging
from mixlm.checkpoint.integrity import (
    VALUE_SUMS,
    file_problem,
    is_listed,
    restore_args_for,
    unlisted_problem,
    value_sums,
    write_checksum_part,
    write_file_list,
)
from mixlm.checkpoint.metadata import CORRUPT_SUBDIR, absolute_path, check_resume_config
from mixlm.errors import (
    CheckpointCorruptWarning,
    CheckpointError,
    CheckpointSaveError,
    RunFolderLockedError,
    os_reason,
    short_text,
)
from mixlm.folder_lock import ObjectStoreLease, RunFolderLock, folder_lock


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


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # TrainState on the current mesh
    data_state: dict
    meta: dict
    path: str


def _lock_on_process_0(folder: epath.Path, log: Callable[[str], None]) -> RunFolderLock | ObjectStoreLease:
    """The run folder's lock (mixlm.folder_lock: an flock, or a lease on an object store), taken by process 0
    only; every process raises when process 0 could not take it."""
    lock, error = folder_lock(folder, log), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except CheckpointError as e:
            error = e
    if not collectives.all_processes(error is None):
        lock.release()
        raise error or RunFolderLockedError(f"process 0 could not lock the run folder {folder}; its log says why")
    return lock


def _item_handlers() -> dict:
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


class RunCheckpoints:
    """The checkpoints of one run: `save` every `checkpoint.every` steps and at the end, keep the last
    `keep_last` (0: all) plus every `keep_every`-th step, `restore_latest` the newest good one."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False,
                 log: Callable[[str], None] = print):
        # `location`: where the checkpoints live; `directory`: where Orbax reads and writes them (the same,
        # except on s3://, which Orbax cannot write: a local staging folder, uploaded step by step).
        self.location = absolute_path(epath.Path(directory))
        self.remote = self.location if staging.needs_staging(self.location) else None
        self.directory = staging.staging_dir(self.location, writer=not read_only) if self.remote else self.location
        self.cfg, self.log, self.read_only = cfg, log, read_only
        quiet_orbax_errors()
        # The run folder's one writer: locked before Orbax creates folders or cleans up a save in progress.
        self._lock = None if read_only else _lock_on_process_0(self.location.parent, log)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last or None, keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=not read_only,
            create=not read_only, read_only=read_only,
        )
        try:
            if self.remote is not None:
                self._pull_staged()
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=_item_handlers())
        except OSError as e:
            self._release_lock()
            raise CheckpointError(f"cannot create or read the checkpoint folder {self.location} ({os_reason(e)}); "
                                  "fix its permissions (a bucket: its credentials) or choose another "
                                  "train.output_dir") from None
        except BaseException:
            self._release_lock()
            raise
        self._unlisted: int | None = None  # a committed (or committing) step without its file list yet
        self._save_error: CheckpointSaveError | None = None  # sticky: Orbax re-raises a failed save forever

    def _pull_staged(self) -> None:
        """s3://: the staging folder made a copy of the steps on S3 (mixlm.checkpoint.staging)."""
        if jax.process_count() > 1:
            raise CheckpointError(f"checkpoints on s3:// ({self.location}) are saved through a local staging "
                                  "folder, which one process alone can write; run multi-process jobs on gs:// or "
                                  "a shared file system")
        staging.pull(self.remote, self.directory)

    def shown(self, step: int | None = None) -> str:
        """Where the checkpoints (or step `step`) live, for messages: the s3:// URL, not its staging folder."""
        return str(self.location if step is None else self.location / str(step))

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
        self._check_lock()
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
            if self.remote is not None and (self.directory / str(step)).exists():
                try:  # uploaded whole, its file list last; then the steps retention deleted are deleted there
                    staging.push(self.directory / str(step), self.remote / str(step))
                    staging.prune(self.remote, keep={int(p.name) for p in self.directory.iterdir() if p.name.isdigit()})
                except OSError as e:
                    self._save_failed(step, e)

    def _check_lock(self) -> None:
        """Raises RunFolderLockedError (on every process) when process 0's lease was taken over."""
        error = None
        if self._lock is not None:
            try:
                self._lock.check()
            except RunFolderLockedError as e:
                error = e
        if not collectives.all_processes(error is None):
            raise error or RunFolderLockedError(f"process 0 lost the lease of {self.location.parent}; its log "
                                                "says why")

    def _list_step(self, step_dir: epath.Path) -> None:
        """Writes a committed step's file list (every process calls it: each checksums its own files)."""
        count = jax.process_count()
        if self.cfg.verify and count > 1:
            collectives.barrier("mixlm_checkpoint_committed")  # process 0's commit rename is done
            if jax.process_index() > 0 and step_dir.exists():
                write_checksum_part(step_dir, jax.process_index(), count)
            collectives.barrier("mixlm_checkpoint_checksum_parts")
        if jax.process_index() == 0 and step_dir.exists():
            write_file_list(step_dir, checksums=self.cfg.verify, process_count=count)
        collectives.barrier("mixlm_checkpoint_file_list")

    def _save_failed(self, step: int | None, e: Exception):
        # From the folder: Orbax's own list may already have dropped a step that retention deletes after this
        # save commits (which it now never will).
        kept = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.exists() else []
        kept = [s for s in kept if step is None or s < step]
        where = self.shown(step)
        previous = (f"the previous checkpoint (step {max(kept)}, {self.shown(max(kept))}) is kept"
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
            listed = collectives.all_processes(is_listed(step_dir))
            problem = file_problem(step_dir, verify=self.cfg.verify, process_index=jax.process_index(),
                                   process_count=jax.process_count())
            meta = None
            if not problem:
                try:
                    meta = self.read_meta(step)
                    if "config" not in meta:
                        problem = "its meta item has no config"
                except Exception as e:  # noqa: BLE001 - any read failure means an unusable step
                    problem = f"its metadata is unreadable ({type(e).__name__}: {short_text(e)})"
            if collectives.all_processes(not problem):
                # A config mismatch is not corruption: refuse before touching anything.
                where = f"{self.location.parent} (checkpoint step {step})"
                check_resume_config(meta["config"], cfg, where=where, allow_change=allow_config_change,
                                    log=self.log)
                try:
                    state, data_state, exact = self._restore(step, abstract_state, cfg.model.vocab_size)
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001
                    problem = f"it does not restore ({type(e).__name__}: {short_text(e)})"
                    state = None
                if not listed and state is not None:
                    problem = unlisted_problem(state, meta, exact)
                if collectives.all_processes(not problem):
                    if not listed and not self.read_only:
                        self._list_step(step_dir)
                        self.log(f"checkpoint step {step} ({self.shown(step)}) had no file list (the run stopped right "
                                 "after saving it): its restored values check out; its file list is written now")
                    self._move_aside(bad, good=step)
                    self._report_elastic(step, meta, abstract_state)
                    return Restored(step=step, state=state, data_state=data_state, meta=meta,
                                    path=self.shown(step))
            bad.append((step, problem or _ON_ANOTHER_PROCESS))
        if bad:
            listing = "; ".join(f"step {s} ({self.shown(s)}): {p}" for s, p in bad)
            raise CheckpointError(
                f"no usable checkpoint in {self.location}: {listing}. Nothing was moved or deleted; move "
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
        corrupt_dir = self.location.parent / CORRUPT_SUBDIR
        for step, problem in bad:
            src = self.location / str(step)
            dest = corrupt_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            msg = (f"checkpoint step {step} ({src}) is corrupt: {problem}; moved it to {dest}; using step "
                   f"{good} ({self.shown(good)})")
            if jax.process_index() == 0:
                warnings.warn(msg, CheckpointCorruptWarning, stacklevel=3)
                self.log(f"WARNING: {msg}")
                storage.move_tree(src, dest)  # an object store has no rename: copied, then deleted
                if self.remote is not None:
                    storage.remove_tree(self.directory / str(step))  # its staged copy
            elif problem != _ON_ANOTHER_PROCESS:  # what this process found (e.g. a checksum of its files)
                self.log(f"WARNING: {msg}")
        collectives.barrier("mixlm_checkpoint_move_aside")
        self._manager.reload()


_ON_ANOTHER_PROCESS = "it fails on another process"
