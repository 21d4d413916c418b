"""Proxy sweeps: one base config × N mixtures → one short training run each → a results table.

    runs = plan_sweep("configs/experiments/proxy.yaml", read_csv("mixtures/mixtures.csv"), "runs/sweep")
    run_sweep(runs, parallel=2)        # finished runs are skipped: rerunning resumes the sweep

Each run lives in `<out>/runs/<index>/` (its mixture.yaml, config.yaml, metrics.jsonl); when it ends
its final per-domain validation losses are appended to `<out>/results.csv` in RegMix's layout
(`index`, one column per domain weight, one `metric/<domain>_val_loss` per domain, plus
`metric/val_loss`, the token-weighted total). Runs in parallel are separate processes; the parent is
the only writer of results.csv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mixlm.config import ConfigError, load_config
from mixlm.mixing.tables import INDEX, METRIC_PREFIX, Table, loss_column, read_csv

RESULTS = "results.csv"


@dataclass(frozen=True)
class ProxyRun:
    index: int
    weights: dict[str, float]
    run_dir: Path
    command: tuple[str, ...]  # the `mixlm train` invocation of this run


def final_losses(run_dir: Path, steps: int) -> dict[str, float] | None:
    """The final eval row of a finished run ({'val_loss/<domain>': x, 'val_loss': x}), else None."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == steps and "val_loss" in row:
            final = {k: v for k, v in row.items() if k.startswith("val_loss")}
    return final


def plan_sweep(base_config: str, mixtures: Table, out_dir: str | Path, overrides: list[str] = ()) -> list[ProxyRun]:
    """One ProxyRun per mixture row; writes each run's mixture.yaml (the only file planning creates)."""
    out_dir = Path(out_dir)
    load_config(base_config, list(overrides))  # fail on a bad base config before any run starts
    runs = []
    for index, row in zip(mixtures.index_N, mixtures.values_NxC):
        # Zero weights stay in: the run still reports those domains' validation loss.
        weights = {d: float(w) for d, w in zip(mixtures.weight_columns(), row)}
        run_dir = out_dir / "runs" / f"{int(index):04d}"
        mixture_path = run_dir / "mixture.yaml"
        if not mixture_path.exists():
            mixture_path.parent.mkdir(parents=True, exist_ok=True)
            mixture_path.write_text(f"# sweep run {int(index)}\n" + yaml.safe_dump(weights, sort_keys=False))
        command = (
            sys.executable, "-m", "mixlm.cli", "train", str(base_config), *overrides,
            f"data.mixture={mixture_path}", f"train.output_dir={run_dir}", "logging.progress=false",
            "checkpoint.save_at_end=false", "checkpoint.every=0",
        )
        runs.append(ProxyRun(int(index), weights, run_dir, command))
    return runs


def append_result(out_dir: Path, run: ProxyRun, domains: list[str], losses: dict[str, float]) -> None:
    """One row per run: index, the weights of every domain, each domain's loss, the loss of every other
    evaluated domain (eval.domains: a target trained on by no run) and the total. The first row fixes
    the columns; later rows follow them (a loss a run lacks is NaN)."""
    path = out_dir / RESULTS
    extra = sorted(k.split("/", 1)[1] for k in losses if k.startswith("val_loss/") and k.split("/", 1)[1] not in domains)
    value = {d: run.weights.get(d, 0.0) for d in domains}
    value.update({loss_column(d): losses.get(f"val_loss/{d}", float("nan")) for d in [*domains, *extra]})
    value[f"{METRIC_PREFIX}val_loss"] = losses["val_loss"]
    new = not path.exists()
    if new:
        columns = [*domains, *(loss_column(d) for d in [*domains, *extra]), f"{METRIC_PREFIX}val_loss"]
    else:
        with path.open() as f:
            columns = f.readline().strip().split(",")[1:]
    with path.open("a") as f:
        if new:
            f.write(",".join([INDEX, *columns]) + "\n")
        f.write(",".join([str(run.index), *(repr(float(value.get(c, float("nan")))) for c in columns)]) + "\n")


def train_in_process(run: ProxyRun) -> dict[str, float]:
    from mixlm.config import load_config
    from mixlm.train import train

    args = list(run.command[run.command.index("train") + 1:])
    cfg = load_config(args[0], args[1:])
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return {k: v for k, v in train(cfg).eval.items() if k.startswith("val_loss")}


def _no_record(*_args) -> None:
    """A shard's runs are recorded later, by one process (see run_sweep's record)."""


def shard_of(table: Table, shard: str) -> Table:
    """The rows of shard 'I/K' (0 <= I < K): every K-th mixture from the I-th, so shards take similar
    numbers of runs. '' is every row."""
    if not shard:
        return table
    try:
        i, k = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: expected I/K with 0 <= I < K, e.g. 0/4") from None
    if not 0 <= i < k:
        raise ConfigError(f"--shard {shard!r}: expected I/K with 0 <= I < K, e.g. 0/4")
    return table.rows(table.index_N[i::k])


def done_indices(out_dir: Path) -> set[int]:
    path = Path(out_dir) / RESULTS
    return set(read_csv(path).index_N.tolist()) if path.is_file() else set()


def run_sweep(runs: list[ProxyRun], out_dir: str | Path, domains: list[str], *, steps: int, parallel: int = 1,
              record: bool = True, log=print) -> Path:
    """Runs every unfinished proxy (up to `parallel` processes at once; 0: in this process, one after
    another) and appends its losses. record=False (one shard of a sweep spread over machines, which
    must not write one shared file at once): train only; a later run with record=True writes the
    finished runs' losses to results.csv without training them again."""
    out_dir = Path(out_dir)
    finished = done_indices(out_dir)
    if not record:
        finished |= {r.index for r in runs if final_losses(r.run_dir, steps) is not None}
    todo = [r for r in runs if r.index not in finished]
    record_result = append_result if record else _no_record
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already in {out_dir / RESULTS}, {len(todo)} to run")
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out_dir / ".jax_cache"))  # proxies share one shape
    running: list[tuple[ProxyRun, subprocess.Popen, float]] = []  # each Popen owns its log file
    failures = []

    def reap(block: bool) -> None:
        for item in list(running):
            run, proc, started = item
            if proc.poll() is None and not block:
                continue
            proc.wait()
            proc.log_file.close()
            running.remove(item)
            losses = final_losses(run.run_dir, steps)
            if proc.returncode != 0 or losses is None:
                failures.append(run.index)
                log(f"sweep: run {run.index} failed (exit {proc.returncode}); see {run.run_dir / 'train.log'}")
                continue
            record_result(out_dir, run, domains, losses)
            log(f"sweep: run {run.index} done in {time.time() - started:.0f}s, val_loss {losses['val_loss']:.4f}")

    for run in todo:
        if parallel == 0:  # in this process, one after another (no per-run start-up cost)
            losses = final_losses(run.run_dir, steps) or train_in_process(run)
            record_result(out_dir, run, domains, losses)
            log(f"sweep: run {run.index} done, val_loss {losses['val_loss']:.4f}")
            continue
        while len(running) >= parallel:
            reap(block=False)
            time.sleep(0.2)
        losses = final_losses(run.run_dir, steps)
        if losses is not None:  # trained but not recorded (the sweep was stopped in between)
            record_result(out_dir, run, domains, losses)
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # an interrupted run starts over
        log_file = open(run.run_dir / "train.log", "w")  # noqa: SIM115 - closed in reap() when the run ends
        proc = subprocess.Popen(run.command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        proc.log_file = log_file
        running.append((run, proc, time.time()))
    while running:
        reap(block=True)
    if failures:
        raise RuntimeError(f"sweep: runs {failures} failed; rerun the same command to retry them")
    return out_dir / RESULTS
