"""mixlm sweep BASE_CONFIG --mixtures DIR|CSV --out DIR [--parallel N | --swarm K] [--shard I/N] [key=value ...]

With --swarm K the proxies train K at a time in one process and one jitted step (mixlm.train with K member
configs: params stacked on a member axis, sharded over the devices); --shard then hands out whole swarms. With --swarm K and --distributed
(or --coordinator HOST:PORT --num-processes N --process-id I) every process of a pod or cluster job runs the
same command and each swarm spans all their devices (K a multiple of N; process 0 writes results.csv).

With --parallel N on a GPU host each worker process gets its own GPUs (CUDA_VISIBLE_DEVICES; workers sharing a
GPU also get XLA_PYTHON_CLIENT_MEM_FRACTION); on TPU --parallel > 1 is refused (one process per host); on CPU
workers share the host (mixlm.worker_devices.worker_envs)."""

from __future__ import annotations

import argparse

from mixlm.cli import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="base experiment YAML of the proxy runs (data.source: prepared)")
    add_overrides_argument(parser, "train.steps=100 (applied to every run)")
    parser.add_argument("--mixtures", required=True,
                        help="a `mixlm mix sample` folder (its mixtures.csv) or a CSV: index + one column per domain")
    parser.add_argument("--out", required=True, help="sweep folder: runs/<index>/ and results.csv")
    parser.add_argument("--parallel", type=int, default=1, help="proxy runs at once as separate processes (0: in this process, sequentially)")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "tpu"],
                        help="how --parallel workers get devices (auto: JAX_PLATFORMS, a TPU VM, nvidia-smi)")
    parser.add_argument("--gpus", default=None,
                        help="GPU ids the workers split, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES or all GPUs)")
    parser.add_argument("--swarm", type=int, default=0, metavar="K",
                        help="train K proxies at once in this process, in one jitted step (their own mixture, data "
                             "and seed; --parallel does not apply); a sweep of N mixtures runs as ceil(N/K) swarms")
    parser.add_argument("--distributed", action="store_true",
                        help="with --swarm: call jax.distributed.initialize() (TPU pods, SLURM); every process "
                             "runs this command and the swarms span all their devices")
    parser.add_argument("--coordinator", default="", help="with --swarm: host:port of process 0 (multi-process "
                                                          "without a cluster)")
    parser.add_argument("--num-processes", type=int, default=0)
    parser.add_argument("--process-id", type=int, default=-1)
    parser.add_argument("--limit", type=int, default=0, help="run only the first N mixtures")
    parser.add_argument("--shard", default="",
                        help="I/K: train every K-th mixture (with --swarm: every K-th swarm) from the I-th and leave "
                             "results.csv alone (one shard per machine or array task); then run once without "
                             "--shard to record them")


def run(args) -> int:
    import sys

    from mixlm import storage
    from mixlm.errors import ConfigError
    from mixlm.mixing.tables import read_csv
    from mixlm.run_config import load_run_config
    from mixlm.sweep import plan_sweep, run_sweep, shard_of

    if args.swarm < 0:
        raise ConfigError(f"--swarm {args.swarm}: expected a member count K >= 1 (or 0: no swarm)")
    storage.check_location(args.out, "--out")
    path = storage.location(args.mixtures)  # local or gs:// / s3://, as --out
    table = read_csv(path / "mixtures.csv" if path.is_dir() else path)
    if args.limit:
        table = table.rows(table.index_N[: args.limit])
    cfg = load_run_config(args.config, args.overrides)
    if (args.distributed or args.coordinator) and not args.swarm:
        raise ConfigError("--distributed/--coordinator need --swarm K (one sweep spanning processes trains "
                          "swarms); without --swarm give each host its own --shard I/N")
    if args.distributed or args.coordinator:
        from mixlm.commands.train import initialize_distributed

        initialize_distributed(args, cfg.train.heartbeat_timeout_s)
    runs = plan_sweep(args.config, shard_of(table, args.shard, group=max(args.swarm, 1)), args.out, args.overrides,
                      swarm=args.swarm)
    gpus = None if args.gpus is None else [g.strip() for g in args.gpus.split(",") if g.strip()]
    from mixlm.checkpoint import CheckpointError, ConfigMismatchError, RunFolderLockedError
    from mixlm.errors import DataError, SweepIncompleteError

    # The exit codes of `mixlm train`: 2 another sweep / config holds the folder, 3 runs failed or the sweep
    # stopped, 4 checkpoints, 5 data.
    try:
        results = run_sweep(runs, args.out, list(table.weight_columns()), parallel=args.parallel,
                            record=not args.shard, accelerator=args.accelerator, gpus=gpus, swarm=args.swarm)
    except (ConfigMismatchError, RunFolderLockedError) as e:
        print(f"mixlm sweep: {e}", file=sys.stderr)
        return 2
    except SweepIncompleteError as e:
        print(f"mixlm sweep: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"mixlm sweep: {e}", file=sys.stderr)
        return 4
    except DataError as e:
        print(f"mixlm sweep: data error: {e}", file=sys.stderr)
        return 5
    if args.shard:
        print(f"shard {args.shard}: {len(runs)} runs trained; record them with the same command without --shard")
    else:
        print(f"results: {results}")
    return 0
