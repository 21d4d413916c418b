"""`mixlm plan` on every seed experiment at its published hardware; writes benchmarks/results/plan_seed_configs.md.

Each line is one `python -m mixlm.cli plan CONFIG [overrides] --devices N --device-kind K --json` subprocess
(the planner gives itself N fake CPU devices), so nothing is allocated and no accelerator is needed. The
analytic numbers are the ones for the target devices; the compiled CPU peak is XLA:CPU's buffer assignment of
the same train step (see mixlm/plan.py).

    .venv/bin/python benchmarks/plan_seed_configs.py                  # compiled column too (minutes)
    .venv/bin/python benchmarks/plan_seed_configs.py --analytic-only  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine

GIB = 1 << 30


# (label, experiment, overrides, devices, device kind, hardware as published)
SEED_LINES = [
    ("regmix-1b", "configs/experiments/regmix-1b.yaml", [], 8, "h100", "8 x H100 (one host)"),
    ("regmix-1b", "configs/experiments/regmix-1b.yaml", [], 16, "v5p", "TPU v5p-32 (16 chips, 4 hosts)"),
    ("dclm-1b", "configs/experiments/dclm-1b.yaml", [], 8, "h100", "8 x H100 (one host)"),
    ("metarater-1.3b", "configs/experiments/metarater-1.3b-random.yaml", [], 32, "a100",
     "32 x A800 80GB (as A100 80GB)"),
    ("metarater-3.3b", "configs/experiments/metarater-3.3b-random.yaml", [], 32, "a100",
     "32 x A800 80GB (as A100 80GB)"),
]


def plan_command(config: str, overrides: list[str], devices: int, kind: str, mfu: float, analytic_only: bool,
                 as_json: bool = True) -> list[str]:
    return [sys.executable, "-m", "mixlm.cli", "plan", config, *overrides, "--devices", str(devices),
            "--device-kind", kind, "--mfu", str(mfu)] + (["--analytic-only"] if analytic_only else []) + (
        ["--json"] if as_json else [])


def run_plan(command: list[str]) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:,.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--analytic-only", action="store_true", help="skip the compiled (CPU backend) column")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/plan_seed_configs.md"))
    args = parser.parse_args()

    rows, details = [], []
    started = time.time()
    for label, config, overrides, devices, kind, hardware in SEED_LINES:
        t = time.time()
        p = json.loads(run_plan(plan_command(config, overrides, devices, kind, args.mfu, args.analytic_only)))
        a = p["analytic"]
        print(f"{label} on {devices} x {kind}: {gib(p['analytic_total'])} GiB/device, fits {p['fits']} "
              f"({time.time() - t:.0f}s)", flush=True)
        rows.append(
            f"| {label} | {hardware} | {devices} x {kind} | {p['mesh_shape']['fsdp']}x{p['mesh_shape']['tensor']} | "
            f"{p['global_batch_size']} x {p['seq_len']} | {gib(a['params'])} | {gib(a['optimizer'])} | "
            f"{gib(a['gradients'])} | {gib(a['activations'])} | {gib(p['analytic_total'])} | "
            f"{'yes' if p['fits'] else '**no**'} ({gib(p['usable_bytes'])}) | {gib(p['compiled_peak'])} | "
            f"{p['flops_per_token']:.3e} | {p['tokens_per_s']:,.0f} | {p['days']:,.2f} |")
        fix = "; ".join(p["suggestions"]) if p["suggestions"] else "fits as configured"
        repl = "; ".join(p["replicated"]) if p["replicated"] else "none"
        details.append(f"- **{label} on {devices} x {kind}**: {fix}. Replicated weights: {repl}.")
    example = run_plan(plan_command(*SEED_LINES[0][1:5], args.mfu, args.analytic_only, as_json=False))

    command = "python benchmarks/plan_seed_configs.py" + (" --analytic-only" if args.analytic_only else "") + (
        f" --mfu {args.mfu}" if args.mfu != 0.4 else "")
    text = "\n".join([
        "# `mixlm plan` on the seed experiments at their published hardware",
        "",
        (f"Machine: {describe_machine()}. Command: `{command}` ({time.time() - started:.0f} s). Written by "
        "benchmarks/plan_seed_configs.py; nothing was allocated (each line is a `mixlm plan ... --json` subprocess "
        "on fake CPU devices)."),
        "",
        (f"Per-device GiB, **analytic for the target device** (fp32 params and AdamW moments, fp32 gradients, "
        f"saved activations for the config's remat and compute dtype, flash attention); fit = analytic total within "
        f"90% of the device memory (usable GiB in brackets). Throughput at {args.mfu:.0%} MFU against the dense "
        "bf16 peak (mixlm.metrics.PEAK_FLOPS_BY_DEVICE); days = train.steps x global batch x seq_len tokens at that "
        "rate. The compiled column is the peak of XLA:CPU's buffer assignment of the same train step on the same "
        "number of fake CPU devices: exact for params/optimizer shards, but its temp memory is the CPU backend's "
        "(blocked attention, CPU fusion) and is not a prediction for the accelerator. The target compilers' own "
        "per-device memory (libtpu, the CUDA plugin) for these recipes: benchmarks/results/plan_tpu_seed_configs.md "
        "(`mixlm plan --compile-for`)."),
        "",
        ("| config | published hardware | plan | fsdp x tensor | batch x seq | params | optimizer | grads | "
        "activations | total | fits (usable) | compiled CPU peak | FLOPs/token | tokens/s | days |"),
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
        "What the planner suggests where a line does not fit (analytic totals):",
        "",
        *details,
        "",
        ("v5p-32 counts TensorCores: 16 chips (JAX devices) on 4 hosts. The A800 is an A100 80GB with slower NVLink "
        "(same memory and bf16 peak). metarater-1.3b runs the metarater-3.3b recipe with the 1.3B model "
        "(configs/models/metarater-1.3b.yaml as model.* overrides)."),
        "",
        f"`mixlm plan {SEED_LINES[0][1]} --devices 8 --device-kind h100`:",
        "",
        "```",
        example.rstrip(),
        "```",
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
