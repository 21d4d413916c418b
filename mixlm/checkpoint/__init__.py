"""Orbax checkpoints of a training run: save, retain, validate, resume, and stop cleanly on preemption.

One Orbax `CheckpointManager` over `<train.output_dir>/checkpoints/`; each step is a Composite:

    checkpoints/<step>/state/            TrainState (step, params, optimizer state): sharded arrays, OCDBT
    checkpoints/<step>/data/metadata     the data source's `get_state()` (JSON), so batches resume exactly
    checkpoints/<step>/meta/metadata     JSON: resolved config, mixture, tokens seen per domain, mixlm
                                         version, git commit, mesh shape, time, value sums of every array
                                         of the state (VALUE_SUMS)
    checkpoints/<step>/mixlm_files.json  size and crc32 of every file above, written once the step has
                                         committed (crc32 with checkpoint.verify, the default; on gs:// and
                                         s3:// the store's own crc32c / ETag of each object, from one listing)
    .mixlm.lock                          the run folder's lock while a run writes to it (RunFolderLock)
    .mixlm.lease/<n>                     the same on an object store: a lease (mixlm.folder_lock)

Guarantees, and who gives them:
* A save is atomic (Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it on commit; leftovers of a
  killed save are removed on the next start), and retention deletes an old step only after the newer one
  committed (Orbax's finalize thread: commit, then delete).
* One writer per run folder: a writing RunCheckpoints holds an flock (mixlm.folder_lock) on `<train.output_dir>/.mixlm.lock`
  (taken by process 0 before Orbax touches the folder, released by `close()` or by the kernel when the
  process dies); a second run is refused with RunFolderLockedError naming the holder (host, pid, since). On
  gs:// and s3:// the lock is a lease object created only if absent and renewed by a heartbeat
  (ObjectStoreLease); each save first checks that it was not taken over.
* s3:// steps are saved through a local staging folder and uploaded, their file list last
  (mixlm.checkpoint.staging): Orbax 0.12.8 writes arrays to local paths and gs:// only.
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
* `mixlm.preemption.PreemptionGuard`: SIGTERM/SIGINT end the loop after the current step, which is then saved
  and waited for.
* Reading for export (mixlm.hf.param_readers): `open_checkpoint(path, step=None)` is the newest complete step
  as a `CheckpointReader` that restores one param at a time (a param that does not read back, or holds NaN/inf,
  raises CheckpointError naming the step); `MemoryReader` wraps params already in memory.

The modules: metadata (where steps live, what each records, which keys may change on resume), integrity (file
lists, crc32, value sums, the newest complete step), manager (RunCheckpoints), params (init_from: params-only
restore onto another layout); the run folder's lock is mixlm.folder_lock.

Multi-process: every process calls the same methods; Orbax coordinates array writes, only the primary
process writes JSON items, `mixlm_files.json` and moves corrupt steps. Checksums are split by
`checksum_owner`: each process hashes its own `state/ocdbt.process_<i>/` folder (at save it hands them to
process 0 in `mixlm_files.json.process_<i>`), process 0 the rest, so no process reads the whole step back. The data state is saved once (by
process 0), so it must be the same on every process (it is for both mixlm sources: the global step and
global packing cursors).
"""

from mixlm.checkpoint.integrity import FILE_LIST, VALUE_SUMS, file_problem, value_sums, write_file_list
from mixlm.checkpoint.manager import Restored, RunCheckpoints
from mixlm.checkpoint.metadata import CHECKPOINT_SUBDIR, CORRUPT_SUBDIR, checkpoint_dir, run_metadata
from mixlm.checkpoint.params import resolve_step_dir, restore_params
from mixlm.errors import (
    CheckpointCorruptWarning,
    CheckpointError,
    CheckpointSaveError,
    ConfigMismatchError,
    RunFolderLockedError,
)

__all__ = ["CHECKPOINT_SUBDIR", "CORRUPT_SUBDIR", "FILE_LIST", "VALUE_SUMS", "CheckpointCorruptWarning",
           "CheckpointError", "CheckpointSaveError", "ConfigMismatchError", "Restored", "RunCheckpoints",
           "RunFolderLockedError", "checkpoint_dir", "file_problem", "resolve_step_dir", "restore_params",
           "run_metadata", "value_sums", "write_file_list"]
