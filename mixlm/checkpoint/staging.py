"""Checkpoints on s3:// through a local staging folder.

Orbax 0.12.8 writes arrays through tensorstore only to local paths and gs:// (its kvstore spec builder knows the
gcs driver and nothing else: an s3:// step fails with "Checkpoint path should be absolute. Got s3:/..."). So a
run whose checkpoints live on S3 saves each step with Orbax into a local folder (`staging_dir`: under
storage.cache_root()/staging/s3/...) and, once the step committed and its file list is written, uploads it:
every file, then the file list last, so a step on S3 is whole exactly when its `mixlm_files.json` is there (an
upload cut short leaves no list and is never restored). Retention deletes a step on S3 only after the newer step
is uploaded. At start the staging folder is made a copy of the S3 steps (a step already there with the same file
list is kept, others are downloaded; local steps that never reached S3 are dropped), and restore validates the
local copy as it validates any local step (sizes and crc32 from the file list).

One process only: Orbax's multi-process save needs every process to write one shared folder.
"""

from __future__ import annotations

from etils import epath

from mixlm import storage
from mixlm.checkpoint.integrity import FILE_LIST


def needs_staging(directory) -> bool:
    return storage.scheme(directory) == "s3"


def staging_dir(remote, *, writer: bool = True) -> epath.Path:
    """The local folder that stages the checkpoints folder `remote`: the writing run's, or the one readers
    (init_from, export, eval) copy steps into, so a reader never drops a step the writer has not uploaded."""
    return epath.Path(storage.cache_path(remote, "staging" if writer else "checkpoint-copies"))


def _listed_steps(files: dict[str, storage.FileInfo]) -> set[str]:
    """The step folders (names of digits) among a listing that hold their file list."""
    return {name.split("/", 1)[0] for name in files
            if name.count("/") == 1 and name.endswith("/" + FILE_LIST) and name.split("/", 1)[0].isdigit()}


def pull(remote, local, *, steps: set[int] | None = None) -> list[int]:
    """Makes `local` (a checkpoints folder) hold the steps of `remote` that have a file list (only `steps`,
    when given), downloading those it lacks or holds with another file list, and dropping its step folders
    that are not such steps. Returns the steps now there."""
    remote_files = storage.list_files(remote)
    listed = {s for s in _listed_steps(remote_files) if steps is None or int(s) in steps}
    local_path = epath.Path(local)
    for p in (local_path.iterdir() if local_path.exists() else []):
        if p.name.isdigit() and p.name not in listed:
            storage.remove_tree(p)  # never reached S3 (or was deleted there): not a checkpoint of this run
        elif not p.name.isdigit() and ".orbax-checkpoint-tmp" in p.name:
            storage.remove_tree(p)
    for step in sorted(listed, key=int):
        here = local_path / step / FILE_LIST
        there = storage.join(remote, step, FILE_LIST)
        if here.exists() and here.read_bytes() == storage.location(there).read_bytes():
            continue
        storage.remove_tree(local_path / step)
        files = {name.split("/", 1)[1]: info for name, info in remote_files.items() if name.split("/", 1)[0] == step}
        storage.copy_tree(storage.join(remote, step), local_path / step, last=(FILE_LIST,), files=files)
    return sorted(int(s) for s in listed)


def push(local_step, remote_step) -> None:
    """Uploads one committed, listed step folder: its files, then its file list. What an upload cut short left
    under that step (no file list: never a checkpoint) is deleted first, so no stray object outlives it."""
    storage.remove_tree(remote_step)
    storage.copy_tree(local_step, remote_step, last=(FILE_LIST,))


def prune(remote, keep: set[int]) -> None:
    """Deletes the step folders of `remote` that are not in `keep` (Orbax's retention already deleted their
    staged copies, after the newer step committed; it is uploaded before this runs)."""
    steps = {name.split("/", 1)[0] for name in storage.list_files(remote) if name.split("/", 1)[0].isdigit()}
    for step in steps:
        if int(step) not in keep:
            storage.remove_tree(storage.join(remote, step))


def readable_steps(checkpoints, step_dirs: dict[int, epath.Path]) -> dict[int, epath.Path]:
    """{step: folder Orbax can read} for steps of the checkpoints folder `checkpoints`: on s3://, local copies
    (in the readers' staging folder) of those that have a file list (one without is an upload cut short);
    elsewhere the folders themselves."""
    if not needs_staging(checkpoints):
        return step_dirs
    local = staging_dir(checkpoints, writer=False)
    return {step: local / str(step) for step in pull(checkpoints, local, steps=set(step_dirs))}
