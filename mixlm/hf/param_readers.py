"""What mixlm.hf.export reads: our params one float32 array at a time in our layout (mixlm.models), from a
checkpoint step (CheckpointReader: a partial restore of that one array) or from memory (MemoryReader), so
exporting a model needs about two copies of its largest tensor, not of it all."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mixlm.config import ExperimentConfig, ModelConfig, config_from_dict

# ---- reading params for export: one array at a time ----------------------------------------------------
# What mixlm.hf.export reads: a ParamReader hands out one float32 numpy array at a time in our layout
# (mixlm.models), from a checkpoint step (CheckpointReader: a partial restore of that one array) or from
# memory (MemoryReader), so exporting a model needs about two copies of its largest tensor, not of it all.

ParamPath = tuple[str, ...]
from mixlm import storage
from mixlm.checkpoint import staging
from mixlm.checkpoint.integrity import (
    FILE_LIST,
    VALUE_SUMS,
    file_problem,
    host_value_sum,
    is_listed,
    newest_complete_step,
)
from mixlm.checkpoint.manager import quiet_orbax_errors
from mixlm.checkpoint.metadata import read_meta
from mixlm.checkpoint.params import saved_state_tree, steps_folder
from mixlm.errors import CheckpointError, ConfigError, ExportError, short_text


class ParamReader(Protocol):
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
class MemoryReader:
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


class CheckpointReader:
    """The params of one checkpoint step (<step>/state, <step>/meta), restored array by array as host
    numpy arrays, so only the array being read is in memory. `verified`: the step's files matched its file
    list (False: it has none). A param that does not read back, holds NaN/inf, or (unverified) differs from
    its value sum in the meta item raises CheckpointError."""

    def __init__(self, step_dir, cfg: ExperimentConfig, meta: dict, step: int, *, verified: bool = True,
                 description: str = ""):
        self.step_dir, self.cfg, self.meta, self.step = epath.Path(step_dir), cfg, meta, step
        self.verified = verified
        self.description = description or str(self.step_dir)  # where the step lives (an s3:// URL, not its copy)
        self._state_dir = self.step_dir / "state"
        quiet_orbax_errors()
        try:
            tree = saved_state_tree(self._state_dir)
        except Exception as e:  # noqa: BLE001 - garbage in Orbax's metadata: any error means a damaged step
            raise CheckpointError(self._damaged(f"its state metadata does not read ({type(e).__name__}: "
                                                f"{short_text(e, 160)})")) from None
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
                                                f"{short_text(e, 160)})")) from None
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
        return (f"checkpoint step {self.step} ({self.description}){unlisted}: {what}; its files are damaged. Export "
                "an earlier step with --step N, or rerun `mixlm train` on the run (it sets a damaged newest step "
                "aside and trains it again)")


def _step_dirs(checkpoints) -> dict[int, epath.Path]:
    return {int(p.name): p for p in checkpoints.iterdir() if p.name.isdigit() and (p / "state").is_dir()}


def open_checkpoint(path: str | Path, step: int | None = None) -> CheckpointReader:
    """The checkpoint at `path` (local, gs:// or s3://): a run's output folder (train.output_dir), its
    checkpoints/ folder, or one step folder. `step` picks a step; by default the newest step whose files are
    complete (a step with missing or truncated files is skipped with a warning naming it). A step without a file
    list comes with `verified=False` (each param is checked against its saved value sum as it is read); on s3://
    only steps with a file list are read, from local copies (mixlm.checkpoint.staging). Raises ExportError, or
    CheckpointError for a step whose files are damaged."""
    p = storage.location(path)
    if not storage.is_remote(p):
        p = epath.Path(Path(str(p)).absolute())  # Orbax reads absolute paths only
    if not p.is_dir():
        raise ExportError(f"{path}: no such folder; pass a run's output folder (train.output_dir), its "
                          "checkpoints/ folder, or one checkpoint step folder")
    if (p / "state").is_dir() and p.name.isdigit():
        steps = {int(p.name): p}
        where = p.parent
    else:
        where = steps_folder(p)
        steps = _step_dirs(where)
    shown = {s: str(d) for s, d in steps.items()}
    steps = staging.readable_steps(where, steps)
    if not steps:
        raise ExportError(f"{path}: holds no mixlm checkpoint (expected checkpoints/<step>/state/); was the "
                          "run saved (checkpoint.save_at_end / checkpoint.every)?")
    if step is not None:
        if step not in steps:
            raise ExportError(f"{path}: there is no checkpoint step {step}; available steps: "
                              f"{', '.join(map(str, sorted(steps)))}")
        problem = file_problem(epath.Path(steps[step]))
        if problem:
            raise ExportError(f"checkpoint step {step} ({shown[step]}) is incomplete: {problem}")
        chosen = step
    else:

        def skip(s: int, step_dir, problem: str) -> None:
            warnings.warn(f"checkpoint step {s} ({shown[s]}) is incomplete: {problem}; trying the one before",
                          stacklevel=4)

        chosen = newest_complete_step(steps, skip)
        if chosen is None:
            raise ExportError(f"{where}: no complete checkpoint step (all of {sorted(steps)} have missing or "
                              "truncated files)")
    step_dir = steps[chosen]
    try:
        meta = read_meta(step_dir)
    except Exception as e:  # noqa: BLE001 - garbage in the JSON item
        raise CheckpointError(f"checkpoint step {chosen} ({step_dir}): its metadata does not read "
                              f"({type(e).__name__}: {short_text(e, 160)}); its files are damaged. Export an earlier "
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
    return CheckpointReader(step_dir, cfg, meta, chosen, verified=is_listed(epath.Path(step_dir)),
                            description=shown[chosen])
