"""Proxy sweeps (RegMix): one base config × N mixtures → one short training run each → a results table.

    runs = plan_sweep("configs/experiments/proxy.yaml", read_csv("mixtures/mixtures.csv"), "runs/sweep")
    run_sweep(runs, "runs/sweep", domains, parallel=2)    # finished runs are skipped: rerunning resumes the sweep

Each run lives in `<out>/runs/<index>/`: its proxy.yaml (the resolved config it trains, mixture inlined,
written once by the plan), then what training writes there (config.yaml, metrics.jsonl, result.json). The runs
train through mixlm.proxies (worker processes, this process, or swarms of K in one jitted step); a run is done
when its result.json says so. `<out>/results.csv` is derived from the finished runs' result.json files,
rewritten whole after every sweep in RegMix's layout (`index`, one column per domain weight, one
`metric/<domain>_val_loss` per domain and per eval-only domain, plus `metric/val_loss`, the token-weighted total
over the trained domains), rows in index order; a failed run has no row.

A sweep spread over machines (`--shard I/K`, launch/sweep.py's job array) trains its share and leaves
results.csv alone; one plain sweep afterwards trains nothing and writes it. Each finished run prints its loss on
the search target (search_target: the eval-only domains of eval.domains, else val_loss) with how many runs (or
swarms) are left and about how long; every sweep ends with sweep_summary, the best runs on that target and
their mixtures.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from mixlm import storage
from mixlm.errors import ConfigError, ProxyRunsFailedError, SweepStoppedError
from mixlm.mixing.tables import METRIC_PREFIX, Table, loss_column, write_csv
from mixlm.proxies import ProxyOutcome, ProxyRun, plan_proxy, planned_otherwise, run_proxies
from mixlm.run_config import load_run_config

RESULTS = "results.csv"
SWARMS = "swarms"


def plan_sweep(base_config: str, mixtures: Table, out_dir, overrides: Sequence[str] = (), *,
               swarm: int = 0) -> list[ProxyRun]:
    """One ProxyRun per mixture row, its proxy.yaml written in `<out_dir>/runs/<index>/`: the base config with
    `overrides`, the row's weights as data.mixture and the run's folder. A run trained alone (swarm=0) shows no
    progress bar (it writes to its train.log) and keeps no checkpoint; swarm members checkpoint and show their
    swarm's bar as configured."""
    base = load_run_config(base_config, list(overrides))  # fail on a bad base config before any run starts
    if base.eval.batches < 1:
        raise ConfigError(f"{base_config}: eval.batches is 0; a sweep scores each run by its final validation "
                          "loss: set eval.batches to 1 or more")
    if not swarm:
        base = base.replace(logging=dataclasses.replace(base.logging, progress=False),
                            checkpoint=dataclasses.replace(base.checkpoint, every=0, save_at_end=False))
    runs = []
    for index, row in zip(mixtures.index_N, mixtures.values_NxC):
        # Zero weights stay in: the run still reports those domains' validation loss.
        weights = {d: float(w) for d, w in zip(mixtures.weight_columns(), row)}
        run_dir = storage.location(out_dir) / "runs" / f"{int(index):04d}"
        cfg = base.replace(data=dataclasses.replace(base.data, mixture=weights),
                           train=dataclasses.replace(base.train, output_dir=str(run_dir)))
        runs.append(plan_proxy(int(index), weights, cfg))
    return runs


def shard_of(table: Table, shard: str, group: int = 1) -> Table:
    """The rows of shard 'I/K' (0 <= I < K): every K-th group of `group` consecutive mixtures (one swarm;
    1: one mixture) from the I-th, so shards take similar numbers of runs. '' is every row."""
    if not shard:
        return table
    try:
        i, k = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: expected I/K with 0 <= I < K, e.g. 0/4") from None
    if not 0 <= i < k:
        raise ConfigError(f"--shard {shard!r}: expected I/K with 0 <= I < K, e.g. 0/4")
    groups = [table.index_N[j:j + group] for j in range(0, len(table.index_N), group)]
    return table.rows([index for g in groups[i::k] for index in g])


# ---- the search target --------------------------------------------------------------------------------------


def search_target(runs: Sequence[ProxyRun], domains: Sequence[str]) -> tuple[str, ...]:
    """The loss keys a sweep searches on, from its runs' config: `val_loss/<d>` of every eval-only domain
    (eval.domains not among the mixture's `domains`: a target no run trains on; several are averaged, as
    `mix fit --target a,b`), else ('val_loss',), the token-weighted loss over the trained domains."""
    if not runs:
        return ("val_loss",)
    held_out = [d for d in runs[0].cfg.eval.domains if d not in domains]
    return tuple(f"val_loss/{d}" for d in dict.fromkeys(held_out)) or ("val_loss",)


def target_value(losses: Mapping[str, float], target: Sequence[str]) -> float:
    """The mean of the target's losses in one run's final losses (NaN where one is missing)."""
    return sum(float(losses.get(k, float("nan"))) for k in target) / len(target)


def target_label(target: Sequence[str]) -> str:
    """'val_loss/office', or 'mean of val_loss/a, val_loss/b'."""
    return target[0] if len(target) == 1 else "mean of " + ", ".join(target)


def target_columns(target: Sequence[str]) -> str:
    """The results.csv column(s) of the target, as `mix fit --target` takes them."""
    return ",".join(f"{METRIC_PREFIX}val_loss" if k == "val_loss" else loss_column(k.split("/", 1)[1])
                    for k in target)


def run_line(target: Sequence[str]):
    """The line a finished run prints (mixlm.proxies.Describe): its search target first, then the trained
    domains' loss."""

    def describe(run: ProxyRun, result: dict, took: str) -> str:
        losses = result["eval"]
        line = f"run {run.index} done{took}, {target_label(target)} {target_value(losses, target):.4f}"
        if tuple(target) == ("val_loss",):
            return line
        return line + f" (trained domains' val_loss {losses.get('val_loss', float('nan')):.4f})"

    return describe


SUMMARY_TOP = 5


def sweep_summary(runs: Sequence[ProxyRun], target: Sequence[str], top: int = SUMMARY_TOP) -> str:
    """The lines that end a sweep: how many of `runs` finished, and the `top` best on the search target (lowest
    first), each with its loss and its mixture (non-zero weights, largest first)."""
    finished = []
    for run in runs:
        result = run.result()
        if result is not None and result["status"] == "finished":
            finished.append((target_value(result["eval"], target), run))
    finished.sort(key=lambda item: (math.isnan(item[0]), item[0]))  # a NaN target last
    head = (f"sweep summary: {len(finished)} of {len(runs)} runs finished; best {min(top, len(finished))} on "
            f"{target_label(target)} (mix fit --target {target_columns(target)}), lowest first:")
    lines = [head]
    width = max((len(str(r.index)) for _, r in finished[:top]), default=1)
    for value, run in finished[:top]:
        weights = sorted(((w, d) for d, w in run.weights.items() if w > 0), reverse=True)
        mixture = ", ".join(f"{d} {100 * w:.1f}%" if w >= 0.001 else f"{d} <0.1%" for w, d in weights)
        lines.append(f"  run {run.index:>{width}}  {value:.4f}  {mixture}")
    return "\n".join(lines)


# ---- results.csv --------------------------------------------------------------------------------------------


def results_table(runs: Sequence[ProxyRun], domains: Sequence[str]) -> Table:
    """results.csv from the finished runs' result.json, rows in index order: index, the weight of every domain,
    each domain's loss, the loss of every other evaluated domain (eval.domains: a target no run trains on,
    sorted) and the total (a loss a run lacks is NaN)."""
    finished = sorted((run.index, run, r["eval"]) for run in runs
                      if (r := run.result()) is not None and r["status"] == "finished" and "val_loss" in r["eval"])
    extra = sorted({k.split("/", 1)[1] for _, _, losses in finished for k in losses
                    if k.startswith("val_loss/") and k.split("/", 1)[1] not in domains})
    columns = (*domains, *(loss_column(d) for d in [*domains, *extra]), f"{METRIC_PREFIX}val_loss")
    rows = []
    for _, run, losses in finished:
        rows.append([*(run.weights.get(d, 0.0) for d in domains),
                     *(losses.get(f"val_loss/{d}", float("nan")) for d in [*domains, *extra]), losses["val_loss"]])
    index = np.array([i for i, _, _ in finished], dtype=np.int64)
    return Table(index, columns, np.array(rows, dtype=np.float64).reshape(len(rows), len(columns)))


def write_results(out_dir, runs: Sequence[ProxyRun], domains: Sequence[str]):
    """Rewrites `<out_dir>/results.csv` whole (atomically) from the runs' result.json; returns its path."""
    path = storage.location(out_dir) / RESULTS
    write_csv(path, results_table(runs, domains))
    return path


# ---- the sweep ----------------------------------------------------------------------------------------------


def run_sweep(runs: list[ProxyRun], out_dir, domains: list[str], *, parallel: int = 1, record: bool = True,
              log=print, accelerator: str = "auto", gpus: Sequence[str] | None = None, swarm: int = 0,
              target: Sequence[str] | None = None):
    """Trains every unfinished run (mixlm.proxies.run_proxies: `parallel` worker processes, 0 in this process,
    or swarms of `swarm` in one jitted step) and, with `record` (process 0 of a distributed sweep), rewrites
    results.csv from every finished run; record=False (one shard of a sweep spread over machines, which must not
    write one shared file at once) only trains. Each finished run prints its loss on the search target
    (`target`, default search_target); the sweep ends with sweep_summary. Returns results.csv's path. Raises
    ProxyRunsFailedError (runs failed; the others are recorded) or SweepStoppedError (a signal stopped it after a
    checkpoint), each one line."""
    import jax

    target = tuple(target or search_target(runs, domains))
    lead = jax.process_index() == 0
    record = record and lead
    done = [run for run in runs if run.result() is not None]
    way = f" in swarms of {swarm}" if swarm else ""
    if lead:
        log(f"sweep: {len(runs)} runs, {len(done)} finished before, {len(runs) - len(done)} to run{way}")
        otherwise = [run.index for run in done if planned_otherwise(run)]
        if otherwise:
            log(f"sweep: runs {otherwise} finished with another config than this sweep's (see their proxy.yaml) "
                "and are kept as they are; delete a run's result.json to train it again with this one")
    outcome: ProxyOutcome = run_proxies(
        runs, parallel=parallel, swarm=swarm, swarm_root=storage.location(out_dir) / SWARMS, accelerator=accelerator,
        gpus=gpus, log=log, label="sweep", describe=run_line(target))
    path = storage.location(out_dir) / RESULTS
    if record:
        path = write_results(out_dir, runs, domains)
    if lead:
        log(sweep_summary(runs, target))
    if outcome.stopped:
        raise SweepStoppedError(f"stopped: {outcome.stopped}; rerun the same command to resume the sweep")
    if outcome.failed:
        reasons = "; ".join(f"run {i}: {why}" for i, why in sorted(outcome.failed.items()))
        raise ProxyRunsFailedError(
            f"runs {sorted(outcome.failed)} failed ({reasons}); the other runs are recorded. A failed run "
            "without a result.json is retried by rerunning the same command; a failed swarm member keeps its "
            "result.json: train it alone (without --swarm) or with another config")
    return path
