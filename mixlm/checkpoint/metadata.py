"""Where a run's checkpoints live and what each step records about the run (config, mixture, tokens seen,
versions, mesh), and which config keys may change when a run resumes."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

import mixlm
from mixlm.config import ExperimentConfig, config_diff, config_from_dict
from mixlm.errors import (
    ConfigMismatchError,
)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints_corrupt"

# Config keys that may change when a run resumes (everything else must match the checkpoint's config):
# how long to train (the schedule is recomputed for the new total), where and how often to log, eval and
# save, the device layout, the loader's worker count (batches do not depend on it), the multi-process
# heartbeat, and how attention is computed / what is rematerialised (same math, other kernels and memory).
RESUMABLE_KEYS = ("train.steps", "train.output_dir", "train.heartbeat_timeout_s", "data.num_workers", "model.attention",
                  "model.remat", "train.grad_accum_steps")  # same math: micro-batch sums add up to the batch
RESUMABLE_SECTIONS = ("mesh", "checkpoint", "eval", "logging")


def checkpoint_dir(output_dir: str | Path) -> epath.Path:
    return absolute_path(epath.Path(output_dir)) / CHECKPOINT_SUBDIR


def absolute_path(path: epath.Path) -> epath.Path:
    """Orbax refuses relative paths; a local relative folder (train.output_dir=runs/x) is made absolute,
    a remote one (gs://...) is left as it is."""
    text = str(path)
    return path if "://" in text or text.startswith("/") else epath.Path(Path(text).absolute())


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


def read_meta(step_dir) -> dict:
    """The checkpoint's JSON `meta` item ({} when the step has none); RunCheckpoints.read_meta without a
    CheckpointManager, for a single step folder (local or gs://)."""
    meta_dir = epath.Path(step_dir) / "meta"
    if not meta_dir.is_dir():
        return {}
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(epath.Path(meta_dir)))
