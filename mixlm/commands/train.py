"""mixlm train CONFIG [section.key=value ...]"""

from __future__ import annotations

import argparse
import sys

from mixlm.cli import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (configs/experiments/*.yaml)")
    add_overrides_argument(parser, "optimizer.lr=1e-3 train.steps=200")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (auto-detects TPU pods and SLURM)")
    parser.add_argument("--coordinator", default="", help="host:port of process 0 (multi-process without a cluster)")
    parser.add_argument("--num-processes", type=int, default=0)
    parser.add_argument("--process-id", type=int, default=-1)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume an output folder whose checkpoint was written with a different config")


def initialize_distributed(args, heartbeat_timeout_s: int) -> None:
    """Must run before anything touches a jax device. heartbeat_timeout_s (train.heartbeat_timeout_s): the
    coordination service declares a silent process dead after this long and stops the others, so a run
    whose peer died exits in bounded time instead of waiting in a collective."""
    import jax

    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
    elif args.distributed:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)


def run(args) -> int:
    from mixlm.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)  # config errors surface before any device work
    initialize_distributed(args, cfg.train.heartbeat_timeout_s)
    from mixlm.checkpoint import CheckpointError, ConfigMismatchError, RunFolderLockedError
    from mixlm.errors import DataError
    from mixlm.metrics import MetricsWriteError
    from mixlm.train import NonFiniteLossError, train

    try:
        result = train(cfg, allow_config_change=args.allow_config_change)
    except NonFiniteLossError as e:
        print(f"mixlm train: {e}", file=sys.stderr)
        return 3
    except (ConfigMismatchError, RunFolderLockedError) as e:  # another config, or another run, in the folder
        print(f"mixlm train: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, MetricsWriteError) as e:  # an unusable checkpoint, a run folder it cannot write
        print(f"mixlm train: {e}", file=sys.stderr)
        return 4
    except DataError as e:  # a corrupt shard, a domain used up: the message names the file and the fix
        print(f"mixlm train: data error: {e}", file=sys.stderr)
        return 5
    if result.preempted_at is not None:  # a clean stop: the scheduler should not count it as a failure
        print(f"preempted: checkpoint of step {result.preempted_at} saved; rerun the same command to resume")
        return 0
    if result.already_finished:  # a rerun: report what the run's result.json holds, write nothing
        loss, val = result.members[0].loss, result.eval.get("val_loss")
        logged = ", ".join(text for text in (f"loss {loss:.4f}" if loss is not None else "",
                                             f"val_loss {val:.4f}" if val is not None else "") if text)
        print(f"already finished: step {result.step}" + (f", {logged} (from result.json)" if logged else "")
              + f"; nothing to train, outputs in {result.out_dir}. Raise train.steps to train further")
        return 0
    loss = result.members[0].loss
    print(f"done: step {cfg.train.steps}, loss {loss if loss is not None else float('nan'):.4f}, outputs in "
          f"{result.out_dir}")
    return 0
