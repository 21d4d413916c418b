"""Proxy sweeps: one base config × N mixtures → one short training run each → a results table.

    runs = plan_sweep("configs/experiments/proxy.yaml", read_csv("mixtures/mixtures.csv"), "runs/sweep")
    run_sweep(runs, parallel=2)        # finished runs are skipped: rerunning resumes the sweep

Each run lives in `<out>/runs/<index>/` (its mixture.yaml, config.yaml, metrics.jsonl); when it ends
its final per-domain validation losses are appended to `<out>/results.csv` in RegMix's layout
(`index`, one column per domain weight, one `metric/<domain>_val_loss` per domain, plus
`metric/val_loss`, the token-weighted total). Runs in parallel are separate processes; the parent is
the only writer of results.csv.

Swarms (`run_sweep(..., swarm=K)`, `mixlm sweep --swarm K`): runs k*K .. k*K+K-1 of the plan train together
in one process and one jitted step (mixlm.swarm), their state and checkpoints in `<out>/swarms/<first>-<last>/`,
each member still writing `<out>/runs/<index>/metrics.jsonl`, so results.csv, --shard (whole swarms:
`shard_of(..., group=K)`) and the record pass read them as they read single runs. A rerun skips finished
swarms and resumes an unfinished one from its checkpoint; a member that went non-finite gets no row, like a
failed run.

Each finished run prints its loss on the search target (search_target: the eval-only domains of eval.domains,
else val_loss) with how many runs (or swarms) are left and about how long; every sweep ends with sweep_summary,
the best runs on that target and their mixtures.

Parallel workers and devices (`worker_envs`): on a GPU host each of the `parallel` worker slots gets its own
GPUs through CUDA_VISIBLE_DEVICES (G GPUs over P workers: G/P each when P divides G; P/G workers per GPU, each
capped by XLA_PYTHON_CLIENT_MEM_FRACTION, when G divides P); a TPU host's chips belong to one process, so
parallel > 1 is refused there; on CPU workers share the host as they always did.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mixlm import storage
from mixlm.errors import ConfigError
from mixlm.mixing.tables import INDEX, METRIC_PREFIX, Table, loss_column, read_csv
from mixlm.run_config import load_run_config

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


def search_target(runs: Sequence[ProxyRun], domains: Sequence[str]) -> tuple[str, ...]:
    """The loss keys a sweep searches on, from its base config: `val_loss/<d>` of every eval-only domain
    (eval.domains not among the mixture's `domains`: a target no run trains on; several are averaged, as
    `mix fit --target a,b`), else ('val_loss',), the token-weighted loss over the trained domains."""
    if not runs:
        return ("val_loss",)
    args = list(runs[0].command[runs[0].command.index("train") + 1:])
    held_out = [d for d in load_run_config(args[0], args[1:]).eval.domains if d not in domains]
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


def _run_line(run: ProxyRun, losses: Mapping[str, float], target: Sequence[str], took: str = "") -> str:
    """The line a finished run prints: its search target first, then the trained domains' loss."""
    line = f"sweep: run {run.index} done{took}, {target_label(target)} {target_value(losses, target):.4f}"
    return line if tuple(target) == ("val_loss",) else line + f" (trained domains' val_loss {losses['val_loss']:.4f})"


SUMMARY_TOP = 5


def sweep_summary(runs: Sequence[ProxyRun], steps: int, target: Sequence[str], top: int = SUMMARY_TOP) -> str:
    """The lines that end a sweep: how many of `runs` finished, and the `top` best on the search target (lowest
    first), each with its loss and its mixture (non-zero weights, largest first)."""
    finished = []
    for run in runs:
        losses = final_losses(run.run_dir, steps)
        if losses is not None:
            finished.append((target_value(losses, target), run))
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


class _Eta:
    """Work items done of a total and the time left at the mean pace so far (this process's items only)."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.time()

    def step(self, n: int = 1) -> str:
        self.done += n
        left = self.total - self.done
        if left <= 0:
            return f"{self.done}/{self.total}"
        seconds = (time.time() - self.started) / self.done * left
        return f"{self.done}/{self.total}, about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f}s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


# The single-run command's overrides that a swarm member leaves out: the swarm checkpoints as configured, and
# shows its progress bar as configured (a run in a worker process writes to its train.log: no bar there).
SINGLE_RUN_ONLY = ("logging.progress=false", "checkpoint.save_at_end=false", "checkpoint.every=0")


def plan_sweep(base_config: str, mixtures: Table, out_dir: str | Path, overrides: list[str] = ()) -> list[ProxyRun]:
    """One ProxyRun per mixture row; writes each run's mixture.yaml (the only file planning creates). `out_dir`
    may be local or on an object store."""
    out_dir = storage.location(out_dir)
    load_run_config(base_config, list(overrides))  # fail on a bad base config before any run starts
    runs = []
    for index, row in zip(mixtures.index_N, mixtures.values_NxC):
        # Zero weights stay in: the run still reports those domains' validation loss.
        weights = {d: float(w) for d, w in zip(mixtures.weight_columns(), row)}
        run_dir = out_dir / "runs" / f"{int(index):04d}"
        mixture_path = run_dir / "mixture.yaml"
        if not mixture_path.exists():  # written whole (the processes of a distributed sweep all plan it)
            storage.write_atomic(mixture_path, f"# sweep run {int(index)}\n" + yaml.safe_dump(weights, sort_keys=False))
        command = (
            sys.executable, "-m", "mixlm.cli", "train", str(base_config), *overrides,
            f"data.mixture={mixture_path}", f"train.output_dir={run_dir}", *SINGLE_RUN_ONLY,
        )
        runs.append(ProxyRun(int(index), weights, run_dir, command))
    return runs


def append_result(out_dir: Path, run: ProxyRun, domains: list[str], losses: dict[str, float]) -> None:
    """One row per run: index, the weights of every domain, each domain's loss, the loss of every other
    evaluated domain (eval.domains: a target trained on by no run) and the total. The first row fixes
    the columns; later rows follow them (a loss a run lacks is NaN)."""
    path = storage.location(out_dir) / RESULTS
    extra = sorted(k.split("/", 1)[1] for k in losses if k.startswith("val_loss/") and k.split("/", 1)[1] not in domains)
    value = {d: run.weights.get(d, 0.0) for d in domains}
    value.update({loss_column(d): losses.get(f"val_loss/{d}", float("nan")) for d in [*domains, *extra]})
    value[f"{METRIC_PREFIX}val_loss"] = losses["val_loss"]
    text = path.read_text() if path.exists() else ""
    if not text:
        columns = [*domains, *(loss_column(d) for d in [*domains, *extra]), f"{METRIC_PREFIX}val_loss"]
        text = ",".join([INDEX, *columns]) + "\n"
    else:
        columns = text.split("\n", 1)[0].strip().split(",")[1:]
    row = ",".join([str(run.index), *(repr(float(value.get(c, float("nan")))) for c in columns)]) + "\n"
    storage.write_atomic(path, text + row)  # rewritten whole: an object store has no append


def run_config(run: ProxyRun, *, swarm: bool = False):
    """The ExperimentConfig that `run.command` trains (vocabulary from the prepared data, as `mixlm train` does);
    swarm=True: as a swarm member, without SINGLE_RUN_ONLY."""
    args = list(run.command[run.command.index("train") + 1:])
    if swarm:  # plan_sweep puts them last: the user's own overrides (logging.progress=false too) stay
        args = args[:len(args) - len(SINGLE_RUN_ONLY)]
    return load_run_config(args[0], args[1:])


def train_in_process(run: ProxyRun) -> dict[str, float]:
    from mixlm.train import train

    cfg = run_config(run)  # train() reuses the compiled step of an earlier run with the same shapes
    storage.make_dirs(run.run_dir)
    storage.remove(run.run_dir / "metrics.jsonl")
    return {k: v for k, v in train(cfg).eval.items() if k.startswith("val_loss")}


def _no_record(*_args) -> None:
    """A shard's runs are recorded later, by one process (see run_sweep's record)."""


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


def done_indices(out_dir) -> set[int]:
    path = storage.location(out_dir) / RESULTS
    return set(read_csv(path).index_N.tolist()) if path.is_file() else set()


ACCELERATORS = ("auto", "cpu", "gpu", "tpu")
SHARED_GPU_MEMORY = 0.9  # of one GPU, split evenly between the workers that share it


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what `nvidia-smi` lists, else []."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def detect_accelerator(env: Mapping[str, str] | None = None) -> str:
    """'cpu' | 'gpu' | 'tpu' for this host, without initialising jax (which would reserve GPU memory in the
    parent): JAX_PLATFORMS when it names one platform, else a TPU VM's devices or variables, else GPUs."""
    env = os.environ if env is None else env
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        first = platforms[0]
        return "gpu" if first in ("cuda", "gpu", "rocm") else first if first in ("cpu", "tpu") else "cpu"
    if env.get("TPU_ACCELERATOR_TYPE") or env.get("TPU_WORKER_ID") or glob.glob("/dev/accel[0-9]*"):
        return "tpu"
    return "gpu" if visible_gpus(env) else "cpu"


def worker_envs(parallel: int, accelerator: str, gpus: Sequence[str] = ()) -> list[dict[str, str]]:
    """The environment variables worker slot i (of `parallel`) adds to its process.

    cpu: none (workers share the host's cores, as before). tpu: one process owns all of a host's chips, so
    parallel > 1 is a ConfigError (spread a sweep over hosts with --shard instead). gpu with G GPUs:
    parallel <= G needs G % parallel == 0 and slot i sees GPUs [i*g, (i+1)*g), g = G / parallel; parallel > G
    needs parallel % G == 0 and slot i shares GPU i % G with parallel / G - 1 others, each capped at
    XLA_PYTHON_CLIENT_MEM_FRACTION = SHARED_GPU_MEMORY * G / parallel (JAX would otherwise reserve 75% of the
    GPU in the first worker). Anything else is a ConfigError naming the counts that work."""
    if parallel < 1:
        return []
    if accelerator == "cpu":
        return [{} for _ in range(parallel)]
    if accelerator == "tpu":
        if parallel > 1:
            raise ConfigError(f"--parallel {parallel}: on TPU one process owns all of a host's chips, so proxies "
                              "run one at a time per host (--parallel 1, or 0 in this process); spread a sweep over "
                              "hosts with --shard I/K (launch/sweep.py writes the job array)")
        return [{}]
    if accelerator != "gpu":
        raise ConfigError(f"--accelerator {accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    gpus = list(gpus)
    g = len(gpus)
    if g == 0:
        raise ConfigError("--accelerator gpu: no GPUs found (CUDA_VISIBLE_DEVICES is empty and nvidia-smi lists "
                          "none); pass --gpus 0,1,... or --accelerator cpu")
    if parallel <= g:
        if g % parallel:
            ok = [p for p in range(1, g + 1) if g % p == 0]
            raise ConfigError(f"--parallel {parallel}: {g} GPUs do not split evenly over {parallel} workers; use "
                              f"one of {ok} (GPUs each: {[g // p for p in ok]}) or a multiple of {g} to share GPUs")
        per = g // parallel
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(parallel)]
    if parallel % g:
        raise ConfigError(f"--parallel {parallel}: more workers than the {g} GPUs must be a multiple of {g} so "
                          f"each GPU is shared by as many workers, e.g. {parallel // g * g or g} or "
                          f"{-(-parallel // g) * g}")
    share = parallel // g
    fraction = f"{int(SHARED_GPU_MEMORY / share * 100) / 100:.2f}"
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % g], "XLA_PYTHON_CLIENT_MEM_FRACTION": fraction}
            for i in range(parallel)]


def swarms_of(runs: list[ProxyRun], swarm: int) -> list[list[ProxyRun]]:
    """Consecutive groups of `swarm` runs (the last may be smaller): the plan's swarms."""
    return [runs[j:j + swarm] for j in range(0, len(runs), swarm)]


def swarm_dir_of(out_dir, members: list[ProxyRun]):
    return storage.location(out_dir) / "swarms" / f"{members[0].index:04d}-{members[-1].index:04d}"


def _locked_swarm_message(where: Path, out_dir: Path) -> str:
    """One line for a swarm folder another process holds: who holds it and what to do."""
    from mixlm.folder_lock import LOCK_FILE

    try:
        info = json.loads((where / LOCK_FILE).read_text())
        who = f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that is just starting"
    return (f"swarm {where} is being trained by another process ({who}): another `mixlm sweep` on {out_dir} is "
            "running; wait for it to finish (a rerun then records its runs) or stop it, or give this sweep "
            "another --out")


def run_swarms(runs: list[ProxyRun], out_dir: str | Path, domains: list[str], *, steps: int, swarm: int,
               record: bool = True, log=print, target: Sequence[str] = ("val_loss",)) -> Path:
    """run_sweep with swarm=K: each group of K runs (swarms_of) trains as one mixlm.swarm in this process. With
    several jax.distributed processes every process runs this; each swarm spans them all (mixlm.swarm), and
    process 0 alone writes results.csv, after every process has finished the swarm (the member folders must be
    on storage all processes see). A swarm folder another process is training raises RunFolderLockedError
    (one line: who holds it, what to do)."""
    import jax

    from mixlm.checkpoint import RunFolderLockedError
    from mixlm.swarm import read_swarm_done, train_swarm

    lead = jax.process_index() == 0
    record = record and lead
    out_dir = storage.location(out_dir)
    finished = done_indices(out_dir)
    record_result = append_result if record else _no_record
    groups = swarms_of(runs, swarm)
    trained = {r.index for r in runs if r.index not in finished and final_losses(r.run_dir, steps) is not None}
    todo = [r for r in runs if r.index not in finished and (record or r.index not in trained)]
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already in {out_dir / RESULTS}, {len(todo)} to run "
        f"in swarms of {swarm}")
    to_train = [g for g in groups if not all(r.index in finished or r.index in trained for r in g)
                and read_swarm_done(swarm_dir_of(out_dir, g)) is None]
    eta = _Eta(len(to_train))
    failures, reasons = [], []
    for members in groups:
        if all(r.index in finished for r in members):
            continue
        where = swarm_dir_of(out_dir, members)
        done = read_swarm_done(where)
        if not all(r.index in finished or r.index in trained for r in members) and done is None:
            started = time.time()
            log(f"sweep: swarm {where.name} ({eta.done + 1} of {eta.total} to train, {len(members)} members)")
            try:  # print (the default log): the swarm prints above its progress bar
                result = train_swarm([run_config(r, swarm=True) for r in members], where,
                                     log_fn=None if log is print else log)
            except RunFolderLockedError:
                raise RunFolderLockedError(_locked_swarm_message(where, out_dir)) from None
            if jax.process_count() > 1:  # every member's metrics.jsonl and swarm.json are written
                from mixlm.collectives import barrier

                barrier(f"mixlm sweep: swarm {where.name} done")
            if result.preempted_at is not None:
                raise RuntimeError(f"sweep: swarm {where.name} stopped after step {result.preempted_at} "
                                   "(checkpoint saved); rerun the same command to resume it")
            log(f"sweep: swarm {where.name} ({len(members)} members) done in {time.time() - started:.0f}s; swarms "
                f"{eta.step()}")
            done = read_swarm_done(where)
        failed = {int(m): v for m, v in (done or {}).get("failed", {}).items()}
        for m, run in enumerate(members):
            if run.index in finished:
                continue
            losses = final_losses(run.run_dir, steps)
            if losses is None:
                failures.append(run.index)
                why = failed.get(m, {})
                reasons.append(f"run {run.index}: {why.get('reason', 'no final validation row')} at step "
                               f"{why.get('step', '?')}")
                log(f"sweep: run {run.index} failed in swarm {where.name}: {reasons[-1]}; see {where / 'swarm.json'}")
                continue
            record_result(out_dir, run, domains, losses)
            if record:
                log(_run_line(run, losses, target))
    if lead:
        log(sweep_summary(runs, steps, target))
    if failures:
        raise RuntimeError(f"sweep: runs {failures} failed ({'; '.join(reasons)}); a finished swarm reports its "
                           "failed members again on a rerun: train them alone (without --swarm) or with another "
                           "config, or delete their swarm folder to train it again")
    return out_dir / RESULTS


def run_sweep(runs: list[ProxyRun], out_dir: str | Path, domains: list[str], *, steps: int, parallel: int = 1,
              record: bool = True, log=print, accelerator: str = "auto", gpus: Sequence[str] | None = None,
              swarm: int = 0, target: Sequence[str] | None = None) -> Path:
    """Runs every unfinished proxy (up to `parallel` processes at once; 0: in this process, one after
    another) and appends its losses. record=False (one shard of a sweep spread over machines, which
    must not write one shared file at once): train only; a later run with record=True writes the
    finished runs' losses to results.csv without training them again. Each worker process gets the
    devices of its slot (worker_envs; `accelerator` 'auto' detects the host, `gpus` defaults to the
    visible ones). swarm=K > 0: K runs at a time in one jitted step in this process (run_swarms; `parallel`,
    `accelerator` and `gpus` do not apply). Each finished run prints its loss on the search target (`target`,
    default search_target: the eval-only domains, else val_loss); the sweep ends with sweep_summary."""
    target = tuple(target or search_target(runs, domains))
    if swarm:
        return run_swarms(runs, out_dir, domains, steps=steps, swarm=swarm, record=record, log=log, target=target)
    out_dir = storage.location(out_dir)
    if accelerator == "auto":
        accelerator = detect_accelerator()
    slots = worker_envs(parallel, accelerator, visible_gpus() if gpus is None and accelerator == "gpu" else gpus or ())
    finished = done_indices(out_dir)
    if not record:
        finished |= {r.index for r in runs if final_losses(r.run_dir, steps) is not None}
    todo = [r for r in runs if r.index not in finished]
    record_result = append_result if record else _no_record
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already in {out_dir / RESULTS}, {len(todo)} to run")
    for slot, extra in enumerate(slots):
        if extra:
            log(f"sweep: worker {slot}: " + " ".join(f"{k}={v}" for k, v in extra.items()))
    env = dict(os.environ)
    jax_cache = storage.cache_path(out_dir, "jax") if storage.is_remote(out_dir) else out_dir / ".jax_cache"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(jax_cache))  # proxies share one shape
    running: list[tuple[ProxyRun, subprocess.Popen, float, int]] = []  # each Popen owns its log file
    failures = []
    eta = _Eta(len(todo))

    def reap(block: bool) -> None:
        for item in list(running):
            run, proc, started, _slot = item
            if proc.poll() is None and not block:
                continue
            proc.wait()
            proc.log_file.close()
            if storage.is_remote(run.run_dir):  # the child wrote its output to a local file
                storage.copy_tree(os.path.dirname(proc.log_file.name), run.run_dir)
            running.remove(item)
            losses = final_losses(run.run_dir, steps)
            if proc.returncode != 0 or losses is None:
                failures.append(run.index)
                log(f"sweep: run {run.index} failed (exit {proc.returncode}); see {run.run_dir / 'train.log'}; runs "
                    f"{eta.step()}")
                continue
            record_result(out_dir, run, domains, losses)
            log(_run_line(run, losses, target, f" in {time.time() - started:.0f}s") + f"; runs {eta.step()}")

    for run in todo:
        if parallel == 0:  # in this process, one after another (no per-run start-up cost)
            losses = final_losses(run.run_dir, steps) or train_in_process(run)
            record_result(out_dir, run, domains, losses)
            log(_run_line(run, losses, target) + f"; runs {eta.step()}")
            continue
        while len(running) >= parallel:
            reap(block=False)
            time.sleep(0.2)
        losses = final_losses(run.run_dir, steps)
        if losses is not None:  # trained but not recorded (the sweep was stopped in between)
            record_result(out_dir, run, domains, losses)
            eta.total -= 1
            continue
        storage.make_dirs(run.run_dir)
        storage.remove(run.run_dir / "metrics.jsonl")  # an interrupted run starts over
        slot = min(set(range(parallel)) - {item[3] for item in running})
        log_dir = storage.cache_path(run.run_dir, "logs") if storage.is_remote(run.run_dir) else run.run_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(log_dir / "train.log", "w")  # noqa: SIM115 - closed in reap() when the run ends
        if slots[slot]:
            log_file.write(f"mixlm sweep: worker {slot}: "
                           + " ".join(f"{k}={v}" for k, v in slots[slot].items()) + "\n")
            log_file.flush()
        proc = subprocess.Popen(run.command, stdout=log_file, stderr=subprocess.STDOUT, env={**env, **slots[slot]})
        proc.log_file = log_file
        running.append((run, proc, time.time(), slot))
    while running:
        reap(block=True)
    log(sweep_summary(runs, steps, target))
    if failures:
        raise RuntimeError(f"sweep: runs {failures} failed; rerun the same command to retry them")
    return out_dir / RESULTS
