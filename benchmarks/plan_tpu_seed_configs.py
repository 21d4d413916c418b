"""The seed recipes compiled for their TPU pods and GPU hosts with the real compilers on this CPU host (`mixlm plan
--compile-for`, mixlm.compiled.plan); writes benchmarks/results/plan_tpu_seed_configs.md (+ .json, one record per
line, so a rerun with --resume compiles only what is missing).

Each line runs in its own subprocess (`python benchmarks/plan_tpu_seed_configs.py --line N`): the compilers
hold several GB of host memory for a 1B model. Nothing is allocated on any accelerator; none is needed.

    .venv/bin/python benchmarks/plan_tpu_seed_configs.py                      # every line (hours on 2 cores)
    .venv/bin/python benchmarks/plan_tpu_seed_configs.py --only regmix --resume
    .venv/bin/python benchmarks/plan_tpu_seed_configs.py --budget 3600        # stop starting lines after 1 h
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1 << 30
RESULTS = ROOT / "benchmarks/results/plan_tpu_seed_configs"
PROXY = "configs/experiments/regmix-1m-proxy.yaml"
SMALL_PROXY = ["train.global_batch_size=8", "data.seq_len=512"]  # RegMix-sized model, a small batch


@dataclasses.dataclass(frozen=True)
class Line:
    label: str
    config: str
    target: str
    overrides: tuple[str, ...] = ()
    members: int = 0  # > 0: a swarm of this many proxies (one train step over a member axis) instead of one run
    hardware: str = ""  # as published
    group: str = "main"  # main | variant | proxy | gpu


# The recipes' layers are a Python loop; compiled unrolled, regmix-1b took over 10 min on this host. Scanned
# (one compiled block, the same math and nearly the same memory) it takes about one: every line scans.
SCAN = ("model.scan_layers=true",)


def lines() -> list[Line]:
    out = [
        Line("regmix-1b", "configs/experiments/regmix-1b.yaml", "v5p-32", SCAN, hardware="TPU v5p-32 (RegMix: 8 x H100)"),
        Line("metarater-1.3b", "configs/experiments/metarater-1.3b-random.yaml", "v5p-64", SCAN,
             hardware="TPU v5p-64 (Meta-rater: 32 x A800)"),
        Line("metarater-3.3b", "configs/experiments/metarater-3.3b-random.yaml", "v5p-64", SCAN,
             hardware="TPU v5p-64 (Meta-rater: 32 x A800)"),
        Line("dclm-1b", "configs/experiments/dclm-1b.yaml", "v5p-128", SCAN, hardware="TPU v5p-128 (DCLM: H100s)"),
        Line("gpt2-70m", "configs/experiments/gpt2-70m.yaml", "v5e-8", SCAN, hardware="TPU v5e-8 (codelion: 1 x H100)"),
        # the RegMix proxy sweep on a v5p-8 slice, both ways: one proxy over the 4 chips, or 4 at once
        Line("regmix-1m proxy, one at a time", PROXY, "v5p-8", group="proxy", hardware="fsdp 4 over the slice"),
        Line("regmix-1m proxy, swarm of 4", PROXY, "v5p-8", members=4, group="proxy",
             hardware="one member per chip"),
        Line("regmix-1m 8x512, one proxy", PROXY, "v5p:1x1x1", tuple(SMALL_PROXY), group="proxy",
             hardware="one chip"),
        Line("regmix-1m 8x512, swarm of 16", PROXY, "v5p:1x1x1", tuple(SMALL_PROXY), members=16, group="proxy",
             hardware="16 members on one chip"),
        # GPU hosts as published, with the GPU compiler
        Line("regmix-1b", "configs/experiments/regmix-1b.yaml", "h100-8", SCAN, group="gpu", hardware="8 x H100"),
        Line("dclm-1b", "configs/experiments/dclm-1b.yaml", "h100-8", SCAN, group="gpu", hardware="8 x H100"),
        Line("metarater-1.3b", "configs/experiments/metarater-1.3b-random.yaml", "a100-32", SCAN, group="gpu",
             hardware="32 x A800 (as A100 80GB)"),
        Line("metarater-3.3b", "configs/experiments/metarater-3.3b-random.yaml", "a100-32", SCAN, group="gpu",
             hardware="32 x A800 (as A100 80GB)"),
        Line("gpt2-70m", "configs/experiments/gpt2-70m.yaml", "h100-1", SCAN, group="gpu", hardware="1 x H100"),
    ]
    # remat none / dots / full and splash vs xla, each with the fewest micro-batches that fit. Run in this order
    # (--budget may stop it): each recipe's remat=full and attention=xla first, dots_saveable after.
    recipes = [("regmix-1b", "configs/experiments/regmix-1b.yaml", "v5p-32"),
               ("dclm-1b", "configs/experiments/dclm-1b.yaml", "v5p-128"),
               ("metarater-1.3b", "configs/experiments/metarater-1.3b-random.yaml", "v5p-64"),
               ("metarater-3.3b", "configs/experiments/metarater-3.3b-random.yaml", "v5p-64"),
               ("gpt2-70m", "configs/experiments/gpt2-70m.yaml", "v5e-8")]
    variants = [(label, config, target, overrides)
                for label, config, target in recipes for overrides in (("model.remat=full",), ("model.attention=xla",))]
    variants += [(label, config, target, ("model.remat=dots_saveable",)) for label, config, target in recipes]
    out += [Line(label, config, target, SCAN + overrides, group="variant")
            for label, config, target, overrides in variants]
    return out


def line_key(line: Line) -> str:
    return f"{line.label} | {line.target} | {' '.join(line.overrides)} | {line.members}"


# ---- one line, in its own process -----------------------------------------------------------------------


def run_swarm(line: Line) -> dict:
    """A swarm of line.members proxies: the fewest micro-batches per member that fit, compiled in turn."""
    import jax

    from mixlm.compiled.plan import for_target
    from mixlm.compiled.step import compile_swarm_step, estimate_swarm_step
    from mixlm.compiled.targets import compile_only_devices, resolve_target
    from mixlm.config import load_config
    from mixlm.plan import device_kind

    jax.config.update("jax_platforms", "cpu")
    target = resolve_target(line.target)
    devices = compile_only_devices(target)
    cfg, _ = for_target(load_config(ROOT / line.config, list(line.overrides)), target)
    hbm = device_kind(target.device_kind).memory_bytes
    tried = []
    k = cfg.train.grad_accum_steps
    while cfg.train.global_batch_size % k == 0:
        step = compile_swarm_step(cfg, line.members, devices, (f"train.grad_accum_steps={k}",),
                                  estimate=False)
        tried.append({"grad_accum_steps": k, "peak": step.peak, "refusal": step.refusal,
                      "compile_seconds": step.compile_seconds})
        if step.fits(hbm):
            step = estimate_swarm_step(cfg, line.members, devices, step)
            return {"tried": tried, "fits": True, "grad_accum_steps": k, "memory": dataclasses.asdict(step.memory),
                    "estimate": dataclasses.asdict(step.estimate) | {
                        "corrected_seconds": step.estimate.corrected_seconds,
                        "corrected_flops": step.estimate.corrected_flops},
                    "tokens_per_step": step.tokens_per_step, "steps": cfg.train.steps,
                    "flops_per_token": _flops_per_token(cfg), "chips": target.chips,
                    "peak_flops": device_kind(target.device_kind).peak_flops}
        k *= 2
    return {"tried": tried, "fits": False}


def _flops_per_token(cfg) -> float:
    from mixlm import models

    return models.flops_per_token(cfg.model, cfg.data.seq_len, causal=True)


def run_plan(line: Line) -> dict:
    import jax

    from mixlm.compiled.plan import compile_plan
    from mixlm.config import load_config

    jax.config.update("jax_platforms", "cpu")
    report = compile_plan(load_config(ROOT / line.config, list(line.overrides)), line.target,
                          name=line.label)
    return report.to_dict() | {"text": report.to_text()}


def run_line(index: int) -> int:
    """Compiles line `index` and prints its record (JSON) as the last line of stdout."""
    line = lines()[index]
    started = time.time()
    record = run_swarm(line) if line.members else run_plan(line)
    record["wall_seconds"] = time.time() - started
    print(json.dumps(record, default=str))
    return 0


# ---- the table ------------------------------------------------------------------------------------------


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:,.1f}"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f}"


def plan_row(line: Line, r: dict) -> str:
    """One recipe at one target: analytic vs compiled, the fit or proven fix, compile time, the estimate."""
    steps, plan = r["steps"], r["plan"]
    first = steps[0]
    analytic = r.get("analytic_now", {}).get("configured", plan["analytic_total"])
    compiled = first["peak"]
    needed = _refused_gib(first["refusal"])
    if compiled:
        ratio, compiled_text = f"{analytic / compiled:.2f}", gib(compiled)
    else:  # refused: the compiler names the temporaries it needed (the arguments come on top)
        ratio = f"{analytic / GIB / needed:.2f} (of its temporaries)" if needed else "-"
        compiled_text = f"refused: {needed:,.1f} of temporaries" if needed else "refused"
    proven = next((s for s in steps[1:] if s["fits"]), None)
    fix_analytic = r.get("analytic_now", {}).get("fix") or (proven or {}).get("analytic_total")
    if proven and fix_analytic:
        ratio += f"; fix {fix_analytic / proven['peak']:.2f}"
    if r["fits"]:
        fit = "yes"
    elif proven:
        fit = f"**no** -> `{' '.join(proven['overrides'])}` ({gib(proven['peak'])} GiB, proven)"
    else:
        fit = "**no**, no fix tried fits"
    timed = first if r["fits"] else proven  # the step one would run: as configured if it fits, else the fix
    timing = (timed or {}).get("timing") or {}
    est = "-"
    if timed and timed.get("estimate_corrected_seconds"):
        est = _ms(timed["estimate_corrected_seconds"])
    mfu = f"{timing['mfu']:.0%}" if timing else "-"
    if timing and est == "-":
        mfu += " (assumed)"  # no compiler estimate: the GPU compiler has no cost model (or it gave nonsense)
    tps = f"{timing['tokens_per_s']:,.0f}" if timing else "-"
    days = f"{timing['days']:,.1f}" if timing else "-"
    compile_s = " + ".join(f"{s['compile_seconds']:.0f}" for s in steps)
    t = r["target"]
    return (f"| {line.label} | {line.target} ({t['chips']} chips, {t['hosts']} host{'s' if t['hosts'] > 1 else ''}) | "
            f"{plan['global_batch_size']} x {plan['seq_len']} | {gib(analytic)} | {compiled_text} | {ratio} | "
            f"{fit} | {compile_s} | {est} | {tps} | {mfu} | {days} |")


def _refused_gib(refusal: str) -> float | None:
    """The temporaries (GiB, as XLA prints them) a refusal says the program needed."""
    import re

    m = re.search(r"temporaries \(([\d.]+)G\)", refusal or "")
    return float(m.group(1)) if m else None


def variant_row(line: Line, r: dict) -> str:
    """One variant: the fix it needed (if any), its compiled peak beside the analytic count, the estimate."""
    steps = r["steps"]
    proven = next((s for s in steps[1:] if s["fits"]), None)
    timed = steps[0] if r["fits"] else proven
    fix = "fits as is" if r["fits"] else (f"`{' '.join(proven['overrides'])}`" if proven else "nothing tried fits")
    timing = (timed or {}).get("timing") or {}
    now = r.get("analytic_now", {})
    analytic = (now.get("configured") if r["fits"] else now.get("fix")) or (timed or {}).get("analytic_total")
    ratio = f"{analytic / timed['peak']:.2f}" if timed and analytic else "-"
    mfu = f"{timing['mfu']:.0%}" if timing else "-"
    if timing and not timed.get("estimate_corrected_seconds"):
        mfu += " (assumed)"  # the cost model gave no usable estimate
    return (f"| {line.label} | {line.target} | `{' '.join(line.overrides)}` | {fix} | {gib(analytic)} | "
            f"{gib(timed['peak']) if timed else '-'} | {ratio} | "
            f"{_ms((timed or {}).get('estimate_corrected_seconds'))} | {mfu} |")


def proxy_row(line: Line, r: dict) -> str:
    if line.members:
        if not r.get("fits"):
            return f"| {line.label} | {line.target} | {line.hardware} | does not fit | - | - | - | - | - |"
        seconds = r["estimate"]["corrected_seconds"]
        members, steps = line.members, r["steps"]
        mfu = r["flops_per_token"] * r["tokens_per_step"] / seconds / (r["chips"] * r["peak_flops"])
        return (f"| {line.label} | {line.target} | {line.hardware}, {r['grad_accum_steps']} micro-batch(es) | "
                f"{gib(r['memory']['arguments'] + r['memory']['outputs'] - r['memory']['aliased'] + r['memory']['temp'])} | "
                f"- | {_ms(seconds)} | {seconds / members * 1e3:,.2f} | {members * 3600 / (steps * seconds):,.1f} | {mfu:.0%} |")
    steps_r = r["steps"]
    timed = steps_r[0] if r["fits"] else next((s for s in steps_r[1:] if s["fits"]), None)
    if not timed or not timed.get("estimate_corrected_seconds"):
        return f"| {line.label} | {line.target} | {line.hardware} | does not fit | - | - | - | - | - |"
    seconds = timed["estimate_corrected_seconds"]
    now = r.get("analytic_now", {})
    analytic = (now.get("configured") if r["fits"] else now.get("fix")) or timed.get("analytic_total")
    fix = "" if r["fits"] else f", `{' '.join(timed['overrides'])}`"
    steps = r["plan"]["steps"]
    ratio = f"{analytic / timed['peak']:.2f}" if analytic else "-"
    return (f"| {line.label} | {line.target} | {line.hardware}{fix} | {gib(timed['peak'])} | {ratio} | {_ms(seconds)} | "
            f"{seconds * 1e3:,.2f} | {3600 / (steps * seconds):,.1f} | {timed['timing']['mfu']:.0%} |")


def analytic_now(records: dict) -> None:
    """Recomputes each plan line's analytic totals (as configured, and its proven fix) with the current
    mixlm.plan on the target's compile-only devices: arithmetic, no compile; records keep their compiles."""
    import jax

    from mixlm.compiled.plan import for_target
    from mixlm.compiled.step import with_overrides
    from mixlm.compiled.targets import compile_only_devices, resolve_target
    from mixlm.config import load_config
    from mixlm.plan import make_plan

    jax.config.update("jax_platforms", "cpu")
    for line in lines():
        r = records.get(line_key(line))
        if not r or "error" in r or line.members:
            continue
        target = resolve_target(line.target)
        devices = compile_only_devices(target)
        cfg, _ = for_target(load_config(ROOT / line.config, list(line.overrides)), target)
        totals = {"configured": make_plan(cfg, devices=devices, device_kind_name=target.device_kind,
                                          compile=False).analytic.total}
        proven = r.get("proven")
        if proven:
            totals["fix"] = make_plan(with_overrides(cfg, proven), devices=devices,
                                      device_kind_name=target.device_kind, compile=False).analytic.total
        r["analytic_now"] = totals


def _load_text(records: dict) -> str:
    """The host's 1-min load average as the lines started and ended (recorded per line since it was added;
    the lines run before that were seen at 3-7 but not recorded)."""
    loads = [x for r in records.values() if isinstance(r, dict) for x in r.get("load_average", ())]
    unrecorded = sum(1 for k, r in records.items() if not k.startswith("_") and "load_average" not in r)
    parts = []
    if loads:
        parts.append(f"1-min load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores as each "
                     f"line started and ended")
    if unrecorded:
        parts.append(f"{unrecorded} earlier lines at a load average of 3-7, seen but not recorded")
    return "; ".join(parts) or "load not recorded"


def write_markdown(records: dict, elapsed: float, missing: list[Line]) -> str:
    from machine import describe_machine

    by_group: dict[str, list[str]] = {"main": [], "variant": [], "proxy": [], "gpu": []}
    texts = []
    for line in lines():
        r = records.get(line_key(line))
        if r is None:
            continue
        if "error" in r:
            by_group[line.group].append(f"| {line.label} | {line.target} | `{' '.join(line.overrides)}` | "
                                        f"failed: {r['error'][:200]} |")
            continue
        row = {"main": plan_row, "gpu": plan_row, "variant": variant_row, "proxy": proxy_row}[line.group](line, r)
        by_group[line.group].append(row)
        if line.group in ("main", "gpu") and "text" in r:
            texts.append(f"### {line.label} on {line.target}\n\n```\n{r['text']}\n```\n")
    head = ("| recipe | target | batch x seq | analytic GiB/device | compiled peak GiB/device | analytic / compiled "
            "| fits (or the proven fix) | compile s | est. ms/step | tokens/s | est. MFU | days |")
    rule = "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    out = [
        "# The seed recipes compiled for their TPU pods and GPU hosts",
        "",
        (f"Machine: {describe_machine()}, **shared with other engineers' jobs while this ran ({_load_text(records)}): "
         f"compile times are inflated and only say which compiles are minutes, not seconds.** Written "
         f"by `python benchmarks/plan_tpu_seed_configs.py` ({elapsed / 60:,.0f} min of compiling). Every number "
         "comes from the real compilers on compile-only devices: libtpu 0.0.42 (the TPU compiler jax[tpu]==0.10.2 "
         "pins) and the CUDA 13 PJRT plugin of jax 0.10.2 with mixlm's own H100/A100 specs; nothing was "
         "allocated and no accelerator was present."),
        "",
        ("Compiled peak = arguments + outputs - donated + temporaries from `memory_analysis()` of the real train "
         "step (the config's attention, remat, scan, micro-batches, mesh rules, bf16); analytic = mixlm.plan's "
         "count for the same mesh. A config that does not fit is refused by the TPU compiler (its message "
         "names the temporaries it needed); the analytic planner's fixes are then compiled in turn and the first "
         "that fits is **proven**. The step time is the TPU compiler's own performance model (`optimal_seconds`), "
         "corrected for its blind spots as `mixlm plan --compile-for` prints (mixlm.compiled.estimate: a program "
         "it counts whole, loops timed by differencing, splash attention's flops added): an estimate, not a "
         "measurement. MFU = mixlm.models.flops_per_token x tokens/s over the chips' dense bf16 peak. The GPU "
         "compiler has no cost model: GPU rows give memory only, and their tokens/s, MFU and days are at an "
         "assumed 40% MFU."),
        "",
        "## TPU pods",
        "",
        head, rule, *by_group["main"],
        "",
        "## Remat and attention variants (TPU)",
        "",
        "Each variant with the fewest micro-batches at which the compiler accepts it.",
        "",
        ("| recipe | target | variant | fix needed | analytic GiB/device | compiled peak GiB/device | analytic / "
         "compiled | est. ms/step | est. MFU |"),
        "|---|---|---|---|---:|---:|---:|---:|---:|",
        *by_group["variant"],
        "",
        "## The RegMix proxy sweep on a v5p slice, both ways",
        "",
        ("RegMix trains 512 regmix-1m proxies of 1000 steps x 512 x 2048 tokens. One proxy at a time sharded over "
         "the slice, or a swarm (one train step over a member axis: members vmapped, one per chip over the mesh's data axis, each "
         "micro-batched where its batch does not fit). Proxies/hour = members x 3600 / (steps x step time)."),
        "",
        ("| mode | target | layout | compiled peak GiB | analytic / compiled (one proxy; a swarm has no analytic "
         "plan) | est. ms/step | ms per member-step | proxies/hour | est. MFU |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *by_group["proxy"],
        "",
        "## GPU hosts as published (GPU compiler: memory; time at an assumed 40% MFU)",
        "",
        head, rule, *by_group["gpu"],
        "",
    ]
    if missing:
        out += ["## Not run this time", "", *[f"- {m.label} on {m.target} {' '.join(m.overrides)}"
                                             + (f" (swarm of {m.members})" if m.members else "") for m in missing], ""]
    out += ["## What `mixlm plan --compile-for` printed", "",
            ("Verbatim, when each line ran; the tables' analytic column is recomputed at write time with the "
             "final mixlm.plan (the analytic model was calibrated against these compiles while they ran)."), "",
            *texts]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--line", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--only", default="", help="run the lines whose label or target contains this (comma-separated: any of them)")
    parser.add_argument("--group", default="", help="main | variant | proxy | gpu (comma-separated: several)")
    parser.add_argument("--jobs", type=int, default=1, help="lines compiled at once (each holds GBs of memory)")
    parser.add_argument("--resume", action="store_true", help="keep the records already in the .json")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds after which no new line starts")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per line")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json, compile nothing")
    args = parser.parse_args()
    if args.line is not None:
        return run_line(args.line)

    store = RESULTS.with_suffix(".json")
    records = json.loads(store.read_text()) if args.resume and store.is_file() else {}
    started = time.time() - float(records.get("_elapsed", 0.0)) if records else time.time()
    groups = set(filter(None, args.group.split(",")))
    chosen = [(i, line) for i, line in enumerate(lines())
              if (not args.only or any(o in line.label or o in line.target for o in args.only.split(",")))
              and (not groups or line.group in groups)]
    lock = threading.Lock()

    def run(i: int, line: Line) -> None:
        key = line_key(line)
        if args.budget and time.time() - started > args.budget:
            return
        t, load_before = time.time(), os.getloadavg()[0]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        try:
            done = subprocess.run([sys.executable, __file__, "--line", str(i)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=args.timeout, check=False)
            if done.returncode:
                record = {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                record = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            record = {"error": f"no result within {args.timeout:.0f} s"}
        record["load_average"] = [load_before, os.getloadavg()[0]]  # 1-min, as the line started and ended
        with lock:
            records[key] = record
            print(f"[{time.time() - started:6.0f}s] {key}: {record.get('error', 'ok')} ({time.time() - t:.0f} s)",
                  flush=True)
            records["_elapsed"] = time.time() - started
            store.write_text(json.dumps(records, indent=1, default=str))

    todo = [] if args.render_only else [(i, line) for i, line in chosen
                                        if line_key(line) not in records or "error" in records[line_key(line)]]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each line is its own process; the store is ours
        list(pool.map(lambda item: run(*item), todo))
    missing = [line for line in lines() if line_key(line) not in records or "error" in records[line_key(line)]]
    analytic_now(records)
    RESULTS.with_suffix(".md").write_text(write_markdown(records, time.time() - started, missing))
    print(f"wrote {RESULTS.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
