"""Write (and optionally submit) an sbatch script that trains on a SLURM GPU cluster: one task per GPU
(jax's SLURM detection gives each process the GPU of its SLURM_LOCALID, so one task per node would use
one GPU of each node), `srun ... mixlm train ... --distributed`, SIGTERM two minutes before the time
limit so the run saves a checkpoint and can be requeued. --job-name, --time, --partition and --account
go into `#SBATCH` lines and may hold only letters, digits and _ . , : @ % + = / -; --workdir, --mixlm and
the command are shell-quoted (a leading ~/ of --workdir becomes "$HOME"/...).

  python launch/slurm.py --nodes 2 --gpus-per-node 8 --workdir /shared/mixlm --out job.sbatch --submit \\
      -- train configs/experiments/regmix-1b.yaml     # without --out: print the script
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run by path (python launch/slurm.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common
from mixlm.errors import ConfigError


def slurm_script(
    argv: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    workdir: str,
    job_name: str = "mixlm",
    time_limit: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    cpus_per_task: int = 8,
    output: str = "slurm-%j.out",
    requeue: bool = True,
    executable: str = common.DEFAULT_EXECUTABLE,
) -> str:
    """An sbatch script running `mixlm <argv> --distributed` as nodes x gpus_per_node tasks."""
    argv = common.check_command(argv)
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must both be >= 1")
    lines = common.sbatch_header(job_name, time_limit, output, partition, account)
    lines += [
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",  # one jax process per GPU (SLURM_LOCALID -> its GPU)
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        "#SBATCH --signal=TERM@120",  # SIGTERM to every task 2 min before the limit: mixlm saves and exits 0
    ]
    if requeue:
        lines.append("#SBATCH --requeue")
    lines += [
        "",
        "set -euo pipefail",
        f"cd {common.shell_path('--workdir', workdir)}",
        "# jax.distributed finds the coordinator, process count and id in SLURM's environment.",
        "srun --kill-on-bad-exit=1 " + common.shell_command(executable, [*argv, "--distributed"]),
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--no-requeue", action="store_true")
    common.add_sbatch_arguments(parser, job_name="mixlm", time_limit="24:00:00")
    common.add_executable_argument(parser)
    common.add_command_argument(parser)


def run(args: argparse.Namespace) -> int:
    script = slurm_script(
        args.command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, workdir=args.workdir,
        job_name=args.job_name, time_limit=args.time, partition=args.partition, account=args.account,
        cpus_per_task=args.cpus_per_task, requeue=not args.no_requeue, executable=args.mixlm,
    )
    return common.emit_sbatch_script(script, args.out, submit=args.submit, dry_run=args.dry_run)


def main(argv: Sequence[str] | None = None, prog: str = "launch/slurm.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
