"""The study's one link to mixlm's proxy runner (mixlm.sweep over mixlm.proxies) and to the result.json every
finished run writes, the one answer to "is this run done?".

    sweep_argv(config, overrides, mixtures_csv, out, swarm=8)   # the `mixlm sweep` a sweep stage runs
    finished_runs(out)                                          # runs of a sweep folder whose result.json says so
    run_result(task, run_folder)                                # a finished run's result.json (else a StageError)

A sweep stage runs `mixlm sweep` (the runner's verb), so its folder is exactly what the verb writes (runs/<index>/
with proxy.yaml and result.json, results.csv derived from them) and its record holds the command a researcher
reruns by hand; a rerun of an unfinished stage trains only the runs without a result.json.
"""

from __future__ import annotations

import os

from mixlm.run_dir import RunDir
from mixlm.study.graph import StageError, StageWork
from mixlm.study.verbs import shown

RUNS = "runs"  # mixlm.sweep.plan_sweep's <out>/runs/<index>/


def sweep_argv(config: str, overrides: list[str], mixtures_csv, out, *, swarm: int = 0, parallel: int = 0,
               limit: int = 0, shard: str = "") -> list[str]:
    """The `mixlm sweep` command of a proxy sweep: `config` + `overrides` for every run, one run per row of
    `mixtures_csv` (the first `limit`), into the sweep folder `out`; K at a time in one program (`swarm`) or
    `parallel` processes (0: one after another here); `shard` I/N trains one shard and records nothing."""
    argv = ["sweep", config, *overrides, "--mixtures", os.fspath(mixtures_csv), "--out", os.fspath(out)]
    argv += ["--swarm", str(swarm)] if swarm else ["--parallel", str(parallel)]
    if limit:
        argv += ["--limit", str(limit)]
    if shard:
        argv += ["--shard", shard]
    return argv


def finished_runs(out) -> int:
    """How many runs of the sweep folder `out` have a result.json with status 'finished'."""
    runs = out / RUNS
    if not runs.exists():
        return 0
    results = (RunDir(folder).result() for folder in runs.iterdir())
    return sum(r is not None and r["status"] == "finished" for r in results)


def run_result(task: StageWork, run) -> dict:
    """The result.json of the training run in folder `run` once it finished; a StageError (exit 3, as a failed
    sweep) when the verb returned without one."""
    result = RunDir(run).result()
    if result is None or result["status"] != "finished":
        why = "no result.json" if result is None else f"result.json says {result['status']}: {result.get('reason')}"
        raise StageError(f"stage {task.stage.name}: `{shown(task.commands[-1])}` ended with {why}; see {run}/"
                         "metrics.jsonl, then rerun the study (finished stages are kept)", 3)
    return result
