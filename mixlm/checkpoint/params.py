"""Params-only initialisation (checkpoint.init_from): the step folder a path names, and its params restored
onto a target layout (vocabulary padding, scanned or unrolled layers), checked when the step is unlisted."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mixlm import storage
from mixlm.checkpoint import staging
from mixlm.checkpoint.integrity import is_listed, newest_complete_step, restore_args_for, unlisted_problem
from mixlm.checkpoint.manager import RunCheckpoints, quiet_orbax_errors
from mixlm.checkpoint.metadata import CHECKPOINT_SUBDIR, read_meta
from mixlm.config import CheckpointConfig
from mixlm.errors import (
    CheckpointCorruptWarning,
    CheckpointError,
)
from mixlm.models import stacked


def resolve_step_dir(path: str | Path) -> epath.Path:
    """`checkpoint.init_from` may name a step folder (holds state/), a checkpoints/ folder or a run's
    output folder (local, gs:// or s3://); for the latter two the newest good step is used (read-only: nothing
    is moved). Returns a folder Orbax reads (an s3:// step: its local copy, mixlm.checkpoint.staging)."""
    p = storage.location(path)
    if (p / "state").is_dir():
        readable = staging.readable_steps(p.parent, {int(p.name): p}) if p.name.isdigit() else {0: p}
        if not readable:
            raise CheckpointError(f"checkpoint.init_from={path!r}: the step has no file list (its upload to S3 "
                                  "was cut short); point it at an earlier step")
        return next(iter(readable.values()))
    ckpts = steps_folder(p)
    if not ckpts.is_dir():
        raise CheckpointError(f"checkpoint.init_from={path!r}: no such folder")
    reader = RunCheckpoints(ckpts, CheckpointConfig(), read_only=True)
    steps = {step: reader.directory / str(step) for step in reader.steps()}

    def skip(step: int, step_dir, problem: str) -> None:
        warnings.warn(f"checkpoint.init_from: step {step} ({step_dir}) is corrupt: {problem}; "
                      "trying the one before", CheckpointCorruptWarning, stacklevel=4)

    chosen = newest_complete_step(steps, skip)
    if chosen is not None:
        return steps[chosen]
    raise CheckpointError(f"checkpoint.init_from={path!r}: no usable checkpoint step in {ckpts}")


def steps_folder(path):
    """The folder holding the step folders: `path`/checkpoints/ of a run's output folder, else `path`."""
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def saved_state_tree(state_dir: epath.Path) -> dict:
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
    saved_tree = saved_state_tree(state_dir)
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
    meta = read_meta(step_dir)
    problem = unlisted_problem({"params": params}, meta, exact)
    if problem:
        raise CheckpointError(f"checkpoint step {step_dir}: {problem}. Point checkpoint.init_from at an earlier "
                              "step folder")
