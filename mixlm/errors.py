"""The errors a user can act on, in one leaf module (it imports nothing of mixlm), and the exit code each gives.

Every message names what, where and what to do, in one line; the verbs print it and exit with the code of
this table (`mixlm.cli` does so for any the verb did not handle itself: never a traceback):

    1  an input file that cannot be read as asked (PrepareError: cut short, corrupt, malformed in strict mode)
    2  usage or config: a bad flag, key or value; another run holds the folder; another config in the folder;
       an export or evaluation asked of something that cannot give it (ExportError, EvalError)
    3  training stopped on a non-finite loss; a sweep whose proxy runs failed, or that stopped before its last
       run (SweepIncompleteError: rerun the same command to resume it)
    4  no usable checkpoint, or one (or the metrics log) that cannot be written
    5  prepared data: a corrupt or exhausted shard
"""

from __future__ import annotations

import os
import re


class ConfigError(ValueError):
    """A config file, override or flag is wrong; the message names the file, the key and what to do."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that cannot serve this run; the message says what to do."""


class ConfigMismatchError(CheckpointError):
    """The output folder holds a run with a different config."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the older checkpoints are kept."""


class RunFolderLockedError(CheckpointError):
    """Another process holds the folder's lock: one writer per run folder (or prepared-data folder)."""


class DataError(RuntimeError):
    """Prepared data that cannot be used (a corrupt shard, a domain used up): one line naming the file or
    domain and what to do, printed by `mixlm train` without a traceback."""


class ShardError(DataError):
    """A prepared shard is missing, truncated or unreadable; the message names the file."""


class PrepareError(ValueError):
    """Raw input that `mixlm prepare` / `mixlm select` cannot read as asked."""


class MalformedInputError(PrepareError):
    """A malformed record in strict mode: names the file and the line / row."""


class InputFileError(PrepareError):
    """An input file cannot be read to its end: cut short, corrupt, or not the format its name says."""


class CheckpointCorruptWarning(UserWarning):
    """A checkpoint step failed validation and was set aside."""


class NonFiniteLossError(RuntimeError):
    """A loss, gradient or parameter norm became NaN or infinite; nothing was saved after it."""


class SweepIncompleteError(RuntimeError):
    """A proxy sweep (or Meta-rater's proxies) ended without every run finished; the message says which and
    what to do."""


class ProxyRunsFailedError(SweepIncompleteError):
    """Proxy runs failed (a non-finite loss, a worker that exited with an error); the others are recorded."""


class SweepStoppedError(SweepIncompleteError):
    """A signal stopped the sweep after a checkpoint of the run or swarm it was training."""


class ExportError(RuntimeError):
    """A checkpoint or model folder that cannot be exported / imported as asked."""


class EvalError(RuntimeError):
    """An evaluation that cannot run or be scored as asked."""


_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (ConfigMismatchError, 2),
    (RunFolderLockedError, 2),
    (ExportError, 2),
    (EvalError, 2),
    (NonFiniteLossError, 3),
    (SweepIncompleteError, 3),
    (CheckpointError, 4),
    (DataError, 5),
    (PrepareError, 1),
)
USER_ERRORS = tuple(kind for kind, _ in _EXIT_CODES)


def exit_code(error: BaseException) -> int:
    """The CLI exit code of a user error (the first matching row of the table above; 1 for anything else)."""
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    return 1


def short_text(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut to `limit` characters."""
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


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
    return f"{type(e).__name__}: {short_text(e)}"
