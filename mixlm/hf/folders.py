"""Output folders written atomically: files go into a hidden sibling folder that is renamed into place only
when complete, so a failed export or import never leaves a folder that looks finished."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mixlm.errors import ExportError


def staging_dir(out_dir: Path, overwrite: bool) -> Path:
    """A fresh hidden sibling of `out_dir` to write into (refuses an existing `out_dir` unless `overwrite`)."""
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another folder or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """Puts the finished `tmp` in place of `out_dir` (the old one, if any, is removed only after)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
