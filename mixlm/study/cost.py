"""What a study's training stages cost on the hardware `cost:` names: the training FLOPs of every run
(mixlm.models.flops_per_token, as `mixlm plan` counts them) at `cost.mfu` of the device's dense bf16 peak, in
device-hours, and proxies per hour for a sweep; `--dry-run` adds `mixlm plan`'s memory check of each training
config (a subprocess per config: `mixlm plan CONFIG ... --analytic-only --json`, on fake CPU devices; with
cost.compile_for, `--compile-for TARGET`: the target's own compiler's peak memory of the real train step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from mixlm.study.pipeline import Study, Training
from mixlm.study.spec import compile_target


@dataclass(frozen=True)
class StageCost:
    """One training stage: `runs` runs of `tokens` tokens at `flops_per_token`, on `devices` devices of `kind`."""

    stage: str
    runs: int
    tokens: int
    flops_per_token: float
    devices: int
    device_hours: float
    runs_per_hour: float
    config: str
    note: str = ""


def _resolved(study: Study, training: Training):
    """The config a stage's runs train, resolved where the data exists (vocabulary from its tokenizer); before
    the demo corpus is made, its vocabulary size stands in."""
    from mixlm.run_config import load_run_config

    overrides = list(training.overrides)
    prepared = study.records.get("prepared", study.records.get("data"))
    note = ""
    if prepared is not None:
        overrides.append(f"data.prepared_dir={prepared['outputs']['prepared_dir']}")
    elif study.spec.data.demo is not None:
        overrides.append(f"model.vocab_size={study.spec.data.demo.vocab_size}")
        note = "vocabulary: the demo tokenizer's size (data not made yet)"
    elif study.spec.data.prepared_dir:
        overrides.append(f"data.prepared_dir={study.spec.data.prepared_dir}")
    return load_run_config(training.config, overrides), overrides, note


def stage_costs(study: Study) -> list[StageCost]:
    """The cost of each training stage met by the walk (module docstring)."""
    from mixlm import models
    from mixlm.plan import device_kind

    cost = study.spec.cost
    peak = device_kind(cost.device_kind).peak_flops
    out = []
    for name, training in study.training.items():
        cfg, _, note = _resolved(study, training)
        tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
        fpt = models.flops_per_token(cfg.model, cfg.data.seq_len, causal=True)
        devices = training.devices
        seconds_per_run = tokens * fpt / (cost.mfu * peak * devices)
        out.append(StageCost(name, training.runs, tokens, fpt, devices,
                             training.runs * seconds_per_run * devices / 3600, 3600 / seconds_per_run,
                             os.path.relpath(training.config), note))
    return out


def plan_check(study: Study, training: Training, devices: int) -> dict:
    """`mixlm plan --json` of a training stage's config on `devices` of the cost's kind: {total, usable_bytes,
    fits, how} (analytic, or the compiler's peak with cost.compile_for), or {error}."""
    cost = study.spec.cost
    _, overrides, _ = _resolved(study, training)
    argv = [sys.executable, "-m", "mixlm.cli", "plan", training.config, *overrides, "--devices", str(devices),
            "--device-kind", cost.device_kind, "--mfu", repr(cost.mfu), "--json"]
    target = compile_target(cost.compile_for, devices) if cost.compile_for else ""
    argv += ["--compile-for", target, "--no-fixes"] if target else ["--analytic-only"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["mixlm plan failed"])[-1]}
    plan = json.loads(done.stdout)
    if not target:
        how = f"on {devices} x {cost.device_kind}"
        return {"total": plan["analytic_total"], "usable_bytes": plan["usable_bytes"], "fits": plan["fits"], "how": how}
    step = plan["steps"][0]  # the config as given (--no-fixes compiles nothing else)
    if step["peak"] is None:
        return {"error": f"the compiler for {target} gave no memory: {step.get('refusal') or 'no reason given'}"}
    return {"total": step["peak"], "usable_bytes": plan["usable_bytes"], "fits": step["fits"],
            "how": f"compiled for {target}"}


def _memory(check: dict, members: int) -> str:
    """The memory cell of one run's plan, times the swarm members a device holds (each its own params, optimizer
    state and activations)."""
    total, usable = check["total"] * members, check["usable_bytes"]
    fits = check["fits"] and total <= usable
    each = f" ({members} swarm members per device x {check['total'] / 2**30:,.1f})" if members > 1 else ""
    return (f"{total / 2**30:,.1f} of {usable / 2**30:,.1f} GiB {check['how']}{each}: "
            f"{'fits' if fits else 'does NOT fit'}")


def format_dry_run(study: Study) -> str:
    """The stages a run would meet, what is done, and the cost of the training left (`--dry-run`)."""
    from mixlm.study.pipeline import status_rows

    costs = {c.stage: c for c in stage_costs(study)}
    checks: dict[tuple, dict] = {}
    lines = [(f"study {study.spec.name}: {len(study.planned)} stages in {study.root} (cost at {study.spec.cost.mfu:.0%} "
              f"MFU of {study.spec.cost.device_kind}; refinement rounds counted to the budget)"),
             "",
             "| stage | kind | state | runs | tokens/run | device-hours | runs/hour | memory (mixlm plan) |",
             "|---|---|---|---|---|---|---|---|"]
    total = left = 0.0
    for row in status_rows(study):
        c = costs.get(row["stage"])
        if c is None:
            lines.append(f"| {row['stage']} | {row['kind']} | {row['state']} | | | | | |")
            continue
        training = study.training[row["stage"]]
        key = (training.config, tuple(training.overrides), c.devices)
        if key not in checks:
            checks[key] = plan_check(study, training, c.devices)
        check = checks[key]
        memory = check.get("error") or _memory(check, training.members_per_device)
        total += c.device_hours
        left += c.device_hours if row["state"] != "done" else 0.0
        lines.append(f"| {row['stage']} | {row['kind']} | {row['state']} | {c.runs} | {c.tokens:,} | "
                     f"{c.device_hours:.3g} | {c.runs_per_hour:.3g} | {memory} |")
    lines += ["", f"training: {total:.4g} device-hours in all, {left:.4g} left"]
    notes = sorted({c.note for c in costs.values() if c.note})
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
