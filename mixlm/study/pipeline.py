"""A walk over a study's stages: `Study` meets each stage (reads its record, runs it in run mode), and the status of
a plan-mode walk (`mixlm study status`). mixlm.study.stages orders the stages; the builders of each part meet
them here.

`Study.stage` is the one place a stage is met: it records the stage in the walk's order, reads its stage.json
when it is done, and in run mode runs it when it is not (with --stage NAME only that one, its dependencies
already done; with --shard I/N a sweep stage trains one shard and records nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from mixlm import storage
from mixlm.config import load_config
from mixlm.study.graph import Stage, StageError, StageWork, content_hash, is_running, read_record, run_stage
from mixlm.study.spec import StudySpec
from mixlm.study.verbs import shown

MODES = ("run", "plan")
# Keys of a resolved config that name machine paths or what a stage sets per run: left out of its hash.
PER_RUN_KEYS = (("data", "prepared_dir"), ("data", "mixture"), ("data", "mixture_index"), ("data", "tokenizer"),
                ("train", "output_dir"), ("train", "seed"), ("data", "seed"))


def config_hash(path: str, overrides: Sequence[str]) -> str:
    """The hash of an experiment config as loaded (nothing resolved) without PER_RUN_KEYS."""
    tree = load_config(path, list(overrides)).to_dict()
    for section, key in PER_RUN_KEYS:
        tree.get(section, {}).pop(key, None)
    return content_hash(tree)


class Training:
    """A stage that trains: `runs` runs of `config` + `overrides` on `devices` devices (for the cost), `swarm` of
    them at once in one program (0: one at a time), and `command()`, the `mixlm train|sweep` argv the stage runs
    once its inputs are done (a launcher's job)."""

    def __init__(self, config: str, overrides: Sequence[str], runs: int, devices: int,
                 command: Callable[[], list[str]], swarm: int = 0):
        self.config, self.overrides, self.runs, self.devices = config, list(overrides), runs, devices
        self.command, self.swarm = command, swarm

    @property
    def members_per_device(self) -> int:
        """The runs one device holds at once: a swarm's members spread over its devices, else 1."""
        return max(1, -(-min(self.swarm, self.runs) // self.devices)) if self.swarm else 1


class Study:
    """One walk over a study's stages (see the module docstring). `records` holds each done stage's stage.json by
    name, `planned` every stage met, `notes` a word on stages left out (a converged round), `training` what
    each training stage trains."""

    def __init__(self, spec: StudySpec, *, out: str | None = None, mode: str = "run", only: str = "",
                 shard: str = "", log: Callable[[str], None] = print):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}")
        self.spec, self.mode, self.only, self.shard, self.log = spec, mode, only, shard, log
        self.root = storage.location(out or spec.out)
        self.planned: list[Stage] = []
        self.records: dict[str, dict] = {}
        self.notes: dict[str, str] = {}
        self.training: dict[str, Training] = {}
        self.ran: list[str] = []  # stages this walk ran

    def outputs(self, name: str) -> dict:
        """The outputs of a done stage (a stage's work reads its dependencies' this way)."""
        return self.records[name]["outputs"]

    def stage(self, stage: Stage, work: Callable[[StageWork], dict], *, training: Training | None = None,
              shard_work: Callable[[], None] | None = None) -> dict | None:
        """Meets `stage` in the walk: its outputs when done (after running it in run mode), else None."""
        if any(s.name == stage.name for s in self.planned):
            raise ValueError(f"stage {stage.name} met twice")  # a bug in a builder
        self.planned.append(stage)
        if training is not None:
            self.training[stage.name] = training
        record = read_record(stage, self.root)
        wanted = self.mode == "run" and (not self.only or self.only == stage.name)
        if record is None and wanted:
            missing = [d.name for d in stage.deps if d.name not in self.records]
            if missing:
                raise StageError(f"stage {stage.name} needs {', '.join(missing)} done first: run `mixlm study run "
                                 f"{self.spec.source}` (or --stage {missing[0]})", 2)
            if self.shard:
                if shard_work is None:
                    raise StageError(f"--shard applies to sweep stages; {stage.name} is a {stage.kind} stage", 2)
                shard_work()
                self.log(f"study: shard {self.shard} of {stage.name} trained; run --stage {stage.name} without "
                         "--shard once every shard is done, to record it")
                return None
            record = run_stage(stage, self.root, work, self.log)
            self.ran.append(stage.name)
        if record is not None:
            self.records[stage.name] = record
            return record["outputs"]
        return None

    def folder(self, name: str):
        """The folder of a stage met in this walk."""
        return next(s for s in self.planned if s.name == name).folder(self.root)

    def stage_of(self, name: str) -> Stage:
        return next(s for s in self.planned if s.name == name)


def status_rows(study: Study) -> list[dict]:
    """Per stage met by a plan-mode walk: name, kind, state (done | running | started | left | skipped), its
    folder (relative to the study) and, for a sweep, how many of its runs finished (their result.json)."""
    from mixlm.study.runner import finished_runs

    rows = []
    for stage in study.planned:
        folder = stage.folder(study.root)
        if read_record(stage, study.root) is not None:
            state = "done"
        elif is_running(stage, study.root):
            state = "running"
        elif folder.exists():
            state = "started"
        else:
            state = "left"
        row = {"stage": stage.name, "kind": stage.kind, "state": state,
               "folder": f"stages/{stage.dirname}", "note": study.notes.get(stage.name, "")}
        training = study.training.get(stage.name)
        if training is not None and stage.kind == "sweep":
            row["runs"] = f"{finished_runs(folder)}/{training.runs}"
        rows.append(row)
    return rows


def format_status(study: Study) -> str:
    rows = status_rows(study)
    width = max(len(r["stage"]) for r in rows)
    done = sum(r["state"] == "done" for r in rows)
    lines = [f"study {study.spec.name} in {study.root}: {done} of {len(rows)} stages done"]
    for r in rows:
        extra = f"  runs {r['runs']}" if "runs" in r else ""
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"  {r['stage']:<{width}}  {r['state']:<8} {r['folder']}{extra}{note}")
    left = [r["stage"] for r in rows if r["state"] in ("left", "started")]
    if left:
        lines.append(f"next: {left[0]} (`mixlm study run {study.spec.source}` runs what is left; `--stage "
                     f"{left[0]}` runs one stage, e.g. as a cluster job)")
    ready = ready_commands(study)
    if ready:
        lines.append("training stages whose inputs are done, as commands a launcher runs (`mixlm launch slurm|tpu "
                     "... -- COMMAND`; a sweep also `mixlm launch slurm-sweep --shards N ... -- COMMAND`); a rerun "
                     "of the study then records them without training again:")
        lines += [f"  {name}: {shown(argv)}" for name, argv in ready.items()]
    return "\n".join(lines)


def ready_commands(study: Study) -> dict[str, list[str]]:
    """{stage: its `mixlm train|sweep` argv} for each training stage not done whose dependencies are done."""
    ready = {}
    for stage in study.planned:
        training = study.training.get(stage.name)
        if training is not None and stage.name not in study.records and all(d.name in study.records
                                                                               for d in stage.deps):
            ready[stage.name] = training.command()
    return ready


def dump(value) -> str:
    return json.dumps(value, indent=1, default=str)
