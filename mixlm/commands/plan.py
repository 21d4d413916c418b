"""`mixlm plan CONFIG [section.key=value ...] [--devices N] [--device-kind KIND] [--mfu F]`: per-device memory
(params, optimizer state, gradients, saved activations), whether it fits, FLOPs/token, tokens/s and days to
train, without allocating anything (mixlm.plan). Needs N fake CPU devices: when this process has a different
device set it reruns itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N."""

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


def child_argv(args: argparse.Namespace) -> list[str]:
    """This command line for `python -m mixlm.cli` (the subprocess with the right fake devices)."""
    argv = ["plan", args.config, *args.overrides, "--devices", str(args.devices), "--device-kind", args.device_kind,
            "--mfu", repr(args.mfu)]
    return argv + (["--analytic-only"] if args.analytic_only else []) + (["--json"] if args.json else [])


def run(args: argparse.Namespace) -> int:
    from mixlm.errors import ConfigError
    from mixlm.plan import device_kind, fake_device_env, make_plan, with_fake_devices
    from mixlm.run_config import load_run_config

    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: expected at least 1")
    device_kind(args.device_kind)
    cfg = load_run_config(args.config, args.overrides)  # config errors surface before any subprocess
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
