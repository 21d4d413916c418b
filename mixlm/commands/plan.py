"""`mixlm plan CONFIG [section.key=value ...] [--devices N] [--device-kind KIND] [--mfu F]`: per-device memory
(params, optimizer state, gradients, saved activations), whether it fits, FLOPs/token, tokens/s and days to
train, without allocating anything (mixlm.plan). Needs N fake CPU devices: when this process has a different
device set it reruns itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N.

`--compile-for TARGET` (v5p-32, v5e-256, v6e-8, v4-8, v5p:2x2x4, h100-8, a100-32, h200-8) instead compiles
the real train step with the target's own compiler on compile-only devices (mixlm.compiled.plan): the
compiler's per-device memory beside the analytic column, the fixes compiled until one fits, and (TPU) the
compiler's step-time estimate. No fake CPU devices are needed, so it runs in this process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from mixlm.cli import add_overrides_argument
from mixlm.plan import DEVICE_MEMORY_GIB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (configs/experiments/*.yaml)")
    add_overrides_argument(parser, "model.remat=full train.grad_accum_steps=4")
    parser.add_argument("--devices", type=int, default=8, help="accelerators the run would use (default 8)")
    parser.add_argument("--device-kind", default="h100", choices=sorted(DEVICE_MEMORY_GIB),
                        help="target device: its memory and dense bf16 peak (default h100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for tokens/s (default 0.4)")
    parser.add_argument("--analytic-only", action="store_true",
                        help="skip compiling the train step on fake CPU devices (the compiled column)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--compile-for", metavar="TARGET", default="",
                        help="compile the train step with the TPU/GPU compiler for this slice or host, e.g. "
                             "v5p-32, v5e-256, v6e-8, v4-8, v5p:2x2x4, h100-8, a100-32, h200-8 (sets the devices "
                             "and device kind; nothing is allocated, no accelerator needed)")
    parser.add_argument("--no-fixes", action="store_true",
                        help="with --compile-for: do not compile the planner's fixes when the config does not fit")


def child_argv(args: argparse.Namespace) -> list[str]:
    """This command line for `python -m mixlm.cli` (the subprocess with the right fake devices)."""
    argv = ["plan", args.config, *args.overrides, "--devices", str(args.devices), "--device-kind", args.device_kind,
            "--mfu", repr(args.mfu)]
    return argv + (["--analytic-only"] if args.analytic_only else []) + (["--json"] if args.json else [])


def run_compile_for(args: argparse.Namespace, cfg) -> int:
    """--compile-for: the compiled plan, in this process (JAX stays on the CPU; the target is compile-only)."""
    import jax

    from mixlm.compiled.plan import compile_plan
    from mixlm.compiled.step import CompilerError

    if args.analytic_only:
        from mixlm.config import ConfigError

        raise ConfigError("--compile-for compiles the train step: drop --analytic-only (or --compile-for)")
    jax.config.update("jax_platforms", "cpu")  # never take a local accelerator: the target is compile-only
    try:
        report = compile_plan(cfg, args.compile_for, mfu=args.mfu, name=cfg.model.name or args.config,
                              try_fixes=not args.no_fixes)
    except CompilerError as e:
        print(f"mixlm plan: the compiler for {args.compile_for} fails on {args.config}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.to_text(), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from mixlm.errors import ConfigError
    from mixlm.plan import device_kind, fake_device_env, make_plan, with_fake_devices
    from mixlm.run_config import load_run_config

    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: expected at least 1")
    device_kind(args.device_kind)
    cfg = load_run_config(args.config, args.overrides)  # config errors surface before any subprocess
    if args.compile_for:
        return run_compile_for(args, cfg)
    devices = with_fake_devices(args.devices)
    if devices is None:
        if os.environ.get("MIXLM_PLAN_CHILD"):  # never recurse
            raise ConfigError(f"mixlm plan: the subprocess still lacks {args.devices} CPU devices")
        env = dict(fake_device_env(args.devices), MIXLM_PLAN_CHILD="1")
        return subprocess.run([sys.executable, "-m", "mixlm.cli", *child_argv(args)], env=env, check=False).returncode
    plan = make_plan(cfg, devices=devices, device_kind_name=args.device_kind, mfu=args.mfu,
                     compile=not args.analytic_only, name=cfg.model.name or args.config)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.to_text(), flush=True)
    return 0
