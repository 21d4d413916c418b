"""One writer per run folder: a second trainer is refused naming the first (host, pid, since when) and
leaves the folder as it was; the lock dies with its holder (SIGKILL) and is free after a clean exit."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import xla_flags
from test_checkpoint import quiet, tiny_cfg, write_config

from mixlm.checkpoint import RunFolderLockedError
from mixlm.folder_lock import LOCK_FILE, RunFolderLock
from mixlm.train import train

REPO = Path(__file__).resolve().parents[1]


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock (as a running trainer does) until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from mixlm.folder_lock import RunFolderLock
        RunFolderLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_trainer_is_refused_naming_the_first_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, "train.steps=2", "checkpoint.every=1", "eval.batches=0")
    longer = tiny_cfg(out, "train.steps=3", "checkpoint.every=1", "eval.batches=0")
    train(cfg, log_fn=quiet)
    assert not (out / LOCK_FILE).exists()  # a clean exit removes the lock file

    holder = hold_lock(out)
    try:
        before = folder_snapshot(out)
        held = json.loads((out / LOCK_FILE).read_text())
        assert held["pid"] == holder.pid and held["host"] and held["since"]
        config_file = write_config(tmp_path / "tiny.yaml", "train.steps=3", "checkpoint.every=1", "eval.batches=0")
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
        proc = subprocess.run([sys.executable, "-m", "mixlm.cli", "train", str(config_file),
                               f"train.output_dir={out}"], capture_output=True, text=True, env=env, cwd=REPO,
                              check=False, timeout=180)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("mixlm train:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"{out} is in use by another mixlm run (host {held['host']}, pid {holder.pid}, since " in lines[0]
        assert "choose another train.output_dir" in lines[0]
        with pytest.raises(RunFolderLockedError, match=f"pid {holder.pid}"):  # in-process: the same refusal
            train(longer, log_fn=quiet)
        assert folder_snapshot(out) == before  # no config.yaml rewrite, no metrics rows, no checkpoint
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)

    RunFolderLock(out).acquire().release()  # the kernel dropped the dead holder's lock
    messages = []
    train(longer, log_fn=messages.append)
    assert any("resumed from" in m and "(step 2," in m for m in messages), messages
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # nothing duplicated


def test_the_lock_is_exclusive_and_reusable_in_one_process(tmp_path):
    first = RunFolderLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderLockedError, match=f"pid {os.getpid()}"):
        RunFolderLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunFolderLock(tmp_path / "run").acquire().release()
