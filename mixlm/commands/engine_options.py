"""The flags that choose where a data stage runs (`--engine local|ray`, `--ray-address`, `--workers`), shared by
`mixlm prepare`, `mixlm tokenizer train` and `mixlm select ...`."""

from __future__ import annotations

import argparse

from mixlm.engine import ENGINES, Engine, make_engine


def add_engine_arguments(parser: argparse.ArgumentParser, *, workers: bool = True) -> None:
    """--engine and --ray-address (and --workers unless the verb has its own)."""
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: processes on this host (--workers); ray: tasks on a Ray cluster, the same "
                        "output bytes")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="with --engine ray: the cluster to use (default: RAY_ADDRESS, else a new cluster on this "
                        "host); launch/ray.py starts one on SLURM nodes or a pod's hosts")
    if workers:
        add_workers_argument(parser)


def add_workers_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument("--workers", type=int, default=None,
                        help=f"local: worker processes{what} (default 1: this process); ray: tasks at once "
                        "(default: one per CPU of the cluster)")


def engine_from_args(args: argparse.Namespace, *, progress: bool = True) -> Engine:
    """The engine the flags ask for (a context manager: close it when the stage is done)."""
    workers = args.workers if args.workers is not None else (1 if args.engine == "local" else 0)
    return make_engine(args.engine, workers=workers, address=args.ray_address, progress=progress)
