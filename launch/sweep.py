"""Write (and optionally submit) a SLURM job array that runs a proxy sweep: task I of K trains
`mixlm sweep BASE --mixtures M --out O --shard I/K` and leaves results.csv alone; one plain
`mixlm sweep BASE --mixtures M --out O` afterwards records every finished run without training again.

  python launch/sweep.py --shards 16 --workdir /shared/mixlm --out sweep.sbatch --submit \\
      -- sweep configs/experiments/regmix-proxy.yaml --mixtures mixtures/ --out sweep/
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run by path (python launch/sweep.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common
from mixlm.config import ConfigError


def sweep_array_script(
    argv: Sequence[str],
    *,
    shards: int,
    workdir: str,
    gpus_per_task: int = 1,
    parallel: int = 1,
    job_name: str = "mixlm-sweep",
    time_limit: str = "04:00:00",
    partition: str | None = None,
    account: str | None = None,
    cpus_per_task: int = 8,
    executable: str = common.DEFAULT_EXECUTABLE,
) -> str:
    """An sbatch job array of `shards` tasks, task I running `mixlm <argv> --shard I/shards` (argv: a
    `sweep BASE --mixtures M --out O ...` command line). Proxies are one process each; `parallel` of
    them share a task's GPUs. Afterwards, `mixlm <argv>` once records every run in results.csv."""
    argv = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not argv or argv[0] != "sweep":
        raise ConfigError(f"a job array runs `sweep BASE --mixtures M --out O`, got {shlex.join(argv) or 'nothing'}")
    if any(a == "--shard" or a.startswith("--shard=") for a in argv):
        raise ConfigError("--shard is set by the job array; leave it out of the command")
    if shards < 1:
        raise ConfigError(f"shards={shards} must be >= 1")
    lines = common.sbatch_header(job_name, time_limit, "slurm-%A_%a.out", partition, account)
    lines += [
        f"#SBATCH --array=0-{shards - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
    ]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    has_parallel = any(a == "--parallel" or a.startswith("--parallel=") for a in argv)
    run = common.shell_command(executable, [*argv, *([] if has_parallel else ["--parallel", str(parallel)])])
    lines += [
        "",
        "set -euo pipefail",
        f"cd {common.shell_path('--workdir', workdir)}",
        f'{run} --shard "$SLURM_ARRAY_TASK_ID/{shards}"',
        f"# when every task has finished, record the runs once: {common.shell_command(executable, argv)}",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, required=True, help="array tasks (K)")
    parser.add_argument("--gpus-per-task", type=int, default=1, help="0 for CPU-only tasks")
    parser.add_argument("--parallel", type=int, default=1, help="proxy runs at once within a task")
    common.add_sbatch_arguments(parser, job_name="mixlm-sweep", time_limit="04:00:00")
    common.add_executable_argument(parser)
    common.add_command_argument(parser, help="-- sweep BASE --mixtures M --out O [section.key=value ...]")


def run(args: argparse.Namespace) -> int:
    script = sweep_array_script(
        args.command, shards=args.shards, workdir=args.workdir, gpus_per_task=args.gpus_per_task,
        parallel=args.parallel, job_name=args.job_name, time_limit=args.time, partition=args.partition,
        account=args.account, cpus_per_task=args.cpus_per_task, executable=args.mixlm,
    )
    return common.emit_sbatch_script(script, args.out, submit=args.submit, dry_run=args.dry_run)


def main(argv: Sequence[str] | None = None, prog: str = "launch/sweep.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
