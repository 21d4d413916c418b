"""One proxy runner: a proxy run is (config, run folder), trained one of three ways, and its own result.json
(mixlm.run_dir.RunDir.result) alone says whether it is done.

    run = plan_proxy(7, weights, cfg)            # writes <cfg.train.output_dir>/proxy.yaml: the config it trains
    outcome = run_proxies(runs, parallel=2)      # worker processes: `python -m mixlm.cli train runs/0007/proxy.yaml`
    outcome = run_proxies(runs, parallel=0)      # in this process, one after another: mixlm.train.train(run.cfg)
    outcome = run_proxies(runs, swarm=4, swarm_root="sweep/swarms")   # K at a time in one jitted step

Every way ends with each run's result.json: status 'finished' with its final evaluation, or 'failed' (a swarm
member that went non-finite). A run with a result.json is done and not trained again (a swarm's failed member is
reported again on a rerun); a run without one is trained, resuming from its checkpoint if it has one. mixlm.sweep
(RegMix) and mixlm.selection.metarater plan their runs, run them here and read their results.

Swarms: runs k*K .. k*K+K-1 of the list train together (mixlm.train with K member configs), their state and
checkpoints in `<swarm_root>/<first>-<last>/`, each member still writing its own run folder. With several
jax.distributed processes every process calls run_proxies with the same runs; each swarm spans them all.
Worker processes get their devices from mixlm.worker_devices.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from mixlm import storage
from mixlm.config import ExperimentConfig
from mixlm.errors import DataError, NonFiniteLossError, RunFolderLockedError
from mixlm.run_dir import RunDir
from mixlm.worker_devices import detect_accelerator, visible_gpus, worker_envs

PROXY_CONFIG = "proxy.yaml"


@dataclasses.dataclass(frozen=True)
class ProxyRun:
    """One proxy: its index, the weights it is about (a mixture, or Meta-rater's rater weights) and the resolved
    config it trains (its train.output_dir is the run's folder)."""

    index: int
    weights: dict[str, float]
    cfg: ExperimentConfig

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.cfg.train.output_dir)

    @property
    def config_file(self):
        return self.run_dir.path / PROXY_CONFIG

    def command(self) -> list[str]:
        """The worker process that trains it: `mixlm train` on its proxy.yaml."""
        return [sys.executable, "-m", "mixlm.cli", "train", os.fspath(self.config_file)]

    def result(self) -> dict | None:
        return self.run_dir.result()


def plan_proxy(index: int, weights: dict[str, float], cfg: ExperimentConfig) -> ProxyRun:
    """The run of `cfg` (resolved: mixlm.run_config) as ProxyRun, with its proxy.yaml written (atomically, so
    every process of a distributed sweep may plan it) unless the run is done: a finished or failed run keeps the
    proxy.yaml it was trained from (see planned_otherwise)."""
    run = ProxyRun(int(index), dict(weights), cfg)
    if run.result() is None and planned_otherwise(run):
        storage.write_atomic(run.config_file, _config_text(cfg))
    return run


def _config_text(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def planned_otherwise(run: ProxyRun) -> bool:
    """Whether the run's proxy.yaml is missing or holds another config than `run.cfg` (for a done run: it was
    trained with another config than the plan asks for now)."""
    return not run.config_file.exists() or run.config_file.read_text() != _config_text(run.cfg)


@dataclasses.dataclass
class ProxyOutcome:
    """What run_proxies saw: each done run's result.json (index -> it; failed members too), the runs that failed
    (index -> one line why) and, when a signal stopped it before the last run, what was saved."""

    results: dict[int, dict] = dataclasses.field(default_factory=dict)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    stopped: str = ""

    def record(self, run: ProxyRun, result: dict | None, missing: str) -> bool:
        """Files a run's result.json (None: failed for `missing`); True when it finished."""
        if result is None:
            self.failed[run.index] = missing
            return False
        self.results[run.index] = result
        if result["status"] != "finished":
            self.failed[run.index] = f"{result.get('reason', result['status'])} at step {result['step']}"
            return False
        return True


class Eta:
    """Work items done of a total and the time left at the mean pace so far (this process's items only)."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.time()

    def step(self, n: int = 1) -> str:
        self.done += n
        left = self.total - self.done
        if left <= 0:
            return f"{self.done}/{self.total}"
        seconds = (time.time() - self.started) / self.done * left
        return f"{self.done}/{self.total}, about {duration(seconds)} left"


def duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f}s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


# (run, its result.json, ' in 12s' or '') -> the line saying it finished
Describe = Callable[[ProxyRun, dict, str], str]


def default_describe(run: ProxyRun, result: dict, took: str) -> str:
    val = result["eval"].get("val_loss")
    return f"run {run.index} done{took}" + (f", val_loss {val:.4f}" if val is not None else "")


def swarms_of(runs: Sequence[ProxyRun], swarm: int) -> list[list[ProxyRun]]:
    """Consecutive groups of `swarm` runs (the last may be smaller): the plan's swarms."""
    return [list(runs[j:j + swarm]) for j in range(0, len(runs), swarm)]


def swarm_dir_of(root, members: Sequence[ProxyRun]):
    return storage.location(root) / f"{members[0].index:04d}-{members[-1].index:04d}"


def run_proxies(runs: Sequence[ProxyRun], *, parallel: int = 1, swarm: int = 0, swarm_root=None,
                accelerator: str = "auto", gpus: Sequence[str] | None = None, log: Callable[[str], None] = print,
                label: str = "sweep", describe: Describe = default_describe) -> ProxyOutcome:
    """Trains every run without a result.json and returns what all of them reached: `swarm` K > 0: K at a time
    in this process (swarm folders under `swarm_root`); else `parallel` worker processes at once (0: in this
    process, one after another), each with the devices of its slot (mixlm.worker_devices; `accelerator` 'auto'
    detects the host, `gpus` defaults to the visible ones). Each run that finishes logs `describe(...)` with the
    runs (or swarms) left; `label` starts every line. Raises what a run raises other than a non-finite loss or a
    data error (those fail the run: ProxyOutcome.failed), e.g. RunFolderLockedError."""
    outcome = ProxyOutcome()
    todo = []
    for run in runs:
        result = run.result()
        if result is None:
            todo.append(run)
        else:
            outcome.record(run, result, "")
    if not todo:
        return outcome
    if swarm:
        return _run_swarms(runs, todo, outcome, swarm=swarm, root=swarm_root, log=log, label=label,
                           describe=describe)
    if parallel == 0:
        return _run_here(todo, outcome, log=log, label=label, describe=describe)
    return _run_workers(todo, outcome, parallel=parallel, accelerator=accelerator, gpus=gpus, log=log, label=label,
                        describe=describe)


def _run_here(todo: Sequence[ProxyRun], outcome: ProxyOutcome, *, log, label: str, describe: Describe) -> ProxyOutcome:
    from mixlm.train import train

    eta = Eta(len(todo))
    for run in todo:  # train() reuses the compiled step of an earlier run with the same program_key
        try:
            trained = train(run.cfg)
        except (NonFiniteLossError, DataError) as e:
            outcome.failed[run.index] = str(e)
            log(f"{label}: run {run.index} failed: {e}; runs {eta.step()}")
            continue
        if trained.preempted_at is not None:
            outcome.stopped = f"run {run.index} stopped after step {trained.preempted_at} (checkpoint saved)"
            return outcome
        if outcome.record(run, run.result(), "it wrote no result.json"):
            log(f"{label}: {describe(run, outcome.results[run.index], '')}; runs {eta.step()}")
        else:
            log(f"{label}: run {run.index} failed: {outcome.failed[run.index]}; runs {eta.step()}")
    return outcome


def _run_workers(todo: Sequence[ProxyRun], outcome: ProxyOutcome, *, parallel: int, accelerator: str, gpus, log,
                 label: str, describe: Describe) -> ProxyOutcome:
    if accelerator == "auto":
        accelerator = detect_accelerator()
    slots = worker_envs(parallel, accelerator, visible_gpus() if gpus is None and accelerator == "gpu" else gpus or ())
    for slot, extra in enumerate(slots):
        if extra:
            log(f"{label}: worker {slot}: " + " ".join(f"{k}={v}" for k, v in extra.items()))
    env = dict(os.environ)
    runs_root = todo[0].run_dir.path.parent
    cache = storage.cache_path(runs_root, "jax") if storage.is_remote(runs_root) else runs_root / ".jax_cache"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.fspath(cache))  # proxies share one program (beside the runs)
    running: list[tuple[ProxyRun, subprocess.Popen, float, int]] = []  # each Popen owns its log file
    eta = Eta(len(todo))

    def reap(block: bool) -> None:
        for item in list(running):
            run, proc, started, _slot = item
            if proc.poll() is None and not block:
                continue
            proc.wait()
            proc.log_file.close()
            running.remove(item)
            train_log = run.run_dir.path / "train.log"
            if storage.is_remote(run.run_dir.path):  # the child's output went to a local file: upload it
                storage.copy_tree(os.path.dirname(proc.log_file.name), run.run_dir.path)
            if proc.returncode == 0 and outcome.record(run, run.result(), "it wrote no result.json"):
                took = f" in {time.time() - started:.0f}s"
                log(f"{label}: {describe(run, outcome.results[run.index], took)}; runs {eta.step()}")
                continue
            outcome.failed[run.index] = f"exit {proc.returncode}, see {train_log}"
            log(f"{label}: run {run.index} failed (exit {proc.returncode}); see {train_log}; runs {eta.step()}")

    for run in todo:
        while len(running) >= parallel:
            reap(block=False)
            time.sleep(0.2)
        slot = min(set(range(parallel)) - {item[3] for item in running})
        remote = storage.is_remote(run.run_dir.path)
        log_dir = storage.cache_path(run.run_dir.path, "logs") if remote else Path(os.fspath(run.run_dir.path))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(log_dir / "train.log", "w")  # noqa: SIM115 - closed in reap() when the run ends
        if slots[slot]:
            log_file.write(f"mixlm {label}: worker {slot}: " + " ".join(f"{k}={v}" for k, v in slots[slot].items())
                           + "\n")
            log_file.flush()
        proc = subprocess.Popen(run.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                env={**env, **slots[slot]})
        proc.log_file = log_file
        running.append((run, proc, time.time(), slot))
    while running:
        reap(block=True)
    return outcome


def _locked_swarm_message(where, label: str) -> str:
    """One line for a swarm folder another process holds: who holds it and what to do."""
    from mixlm.folder_lock import LOCK_FILE

    try:
        info = storage.read_json(where / LOCK_FILE)
        who = f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that is just starting"
    return (f"swarm {where} is being trained by another process ({who}): another `mixlm {label}` on "
            f"{where.parent.parent} is running; wait for it to finish (a rerun then records its runs) or stop it, "
            "or give this sweep another --out")


def _run_swarms(runs: Sequence[ProxyRun], todo: Sequence[ProxyRun], outcome: ProxyOutcome, *, swarm: int, root, log,
                label: str, describe: Describe) -> ProxyOutcome:
    import jax

    from mixlm.collectives import barrier
    from mixlm.train import train

    waiting = {r.index for r in todo}
    groups = [g for g in swarms_of(runs, swarm) if any(r.index in waiting for r in g)]
    eta = Eta(len(groups))
    for members in groups:
        where = swarm_dir_of(root, members)
        started = time.time()
        log(f"{label}: swarm {where.name} ({eta.done + 1} of {eta.total} to train, {len(members)} members)")
        try:  # print (the default log): the swarm prints above its progress bar
            trained = train([r.cfg for r in members], where, log_fn=None if log is print else log)
        except RunFolderLockedError:
            raise RunFolderLockedError(_locked_swarm_message(where, label)) from None
        except (NonFiniteLossError, DataError) as e:  # a swarm of one is a single run
            for r in members:
                outcome.failed[r.index] = str(e)
            log(f"{label}: swarm {where.name} failed: {e}; swarms {eta.step()}")
            continue
        barrier(f"mixlm {label}: swarm {where.name} done")  # every member's result.json is written
        if trained.preempted_at is not None:
            outcome.stopped = f"swarm {where.name} stopped after step {trained.preempted_at} (checkpoint saved)"
            return outcome
        log(f"{label}: swarm {where.name} ({len(members)} members) done in {time.time() - started:.0f}s; swarms "
            f"{eta.step()}")
        for run in members:
            finished = outcome.record(run, run.result(), "it wrote no result.json")
            if jax.process_index() > 0:
                continue
            if finished:
                log(f"{label}: {describe(run, outcome.results[run.index], '')}")
            else:
                log(f"{label}: run {run.index} failed in swarm {where.name}: {outcome.failed[run.index]}; see "
                    f"{run.run_dir.metrics_file}")
    return outcome
