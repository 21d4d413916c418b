"""Write (and optionally submit) a SLURM job array that runs a proxy sweep: task I of K trains
`mixlm sweep BASE --mixtures M --out O --shard I/K` and leaves results.csv alone; one plain
`mixlm sweep BASE --mixtures M --out O` afterwards records every finished run without training again.
With --swarm S each task trains its proxies S at a time in one program (`mixlm sweep ... --swarm S
--shard I/K`): a job array of swarms.

  python launch/sweep.py --shards 16 --workdir /shared/mixlm --out sweep.sbatch --submit \\
      -- sweep configs/experiments/regmix-proxy.yaml --mixtures mixtures/ --out sweep/
  python launch/sweep.py --shards 8 --swarm 64 --workdir /shared/mixlm --gpus-per-task 8 \\
      -- sweep configs/experiments/regmix-1m-proxy.yaml --mixtures mixtures-1m/ --out sweep-1m/
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
from mixlm.errors import ConfigError


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
    swarm: int = 0,
) -> str:
    """An sbatch job array of `shards` tasks, task I running `mixlm <argv> --shard I/shards` (argv: a
    `sweep BASE --mixtures M --out O ...` command line). Proxies are one process each; `parallel` of
    them share a task's GPUs. `swarm` > 0: each task trains `swarm` proxies at once in one program
    (`--swarm swarm`, no --parallel unless argv has one). Afterwards, `mixlm <argv>` once records every
    run in results.csv."""
    argv = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not argv or argv[0] != "sweep":
        raise ConfigError(f"a job array runs `sweep BASE --mixtures M --out O`, got {shlex.join(argv) or 'nothing'}")
    if any(a == "--shard" or a.startswith("--shard=") for a in argv):
        raise ConfigError("--shard is set by the job array; leave it out of the command")
    if shards < 1:
        raise ConfigError(f"shards={shards} must be >= 1")
    if swarm < 0:
        raise ConfigError(f"--swarm {swarm}: expected the number of proxies trained together (>= 1)")
    if swarm and any(a == "--swarm" or a.startswith("--swarm=") for a in argv):
        raise ConfigError("--swarm is given to the launcher and in the command; give it once")
    lines = common.sbatch_header(job_name, time_limit, "slurm-%A_%a.out", partition, account)
    lines += [
        f"#SBATCH --array=0-{shards - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
    ]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    # --parallel does not apply to a swarm (one program trains its members), so none is added to one
    chosen = any(a in ("--parallel", "--swarm") or a.startswith(("--parallel=", "--swarm=")) for a in argv)
    extra = ["--swarm", str(swarm)] if swarm else [] if chosen else ["--parallel", str(parallel)]
    run = common.shell_command(executable, [*argv, *extra])
    lines += [
        "",
        "set -euo pipefail",
        f"cd {common.shell_path('--workdir', workdir)}",
        f'{run} --shard "$SLURM_ARRAY_TASK_ID/{shards}"',
        "# when every task has finished, record the runs once: "
        + common.shell_command(executable, [*argv, *(["--swarm", str(swarm)] if swarm else [])]),
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, required=True, help="array tasks (K)")
    parser.add_argument("--gpus-per-task", type=int, default=1, help="0 for CPU-only tasks")
    parser.add_argument("--parallel", type=int, default=1, help="proxy runs at once within a task")
    parser.add_argument("--swarm", type=int, default=0,
                        help="train this many proxies together in one program per task (mixlm sweep --swarm)")
    common.add_sbatch_arguments(parser, job_name="mixlm-sweep", time_limit="04:00:00")
    common.add_executable_argument(parser)
    common.add_command_argument(parser, help="-- sweep BASE --mixtures M --out O [section.key=value ...]")


def run(args: argparse.Namespace) -> int:
    script = sweep_array_script(
        args.command, shards=args.shards, workdir=args.workdir, gpus_per_task=args.gpus_per_task,
        parallel=args.parallel, job_name=args.job_name, time_limit=args.time, partition=args.partition,
        account=args.account, cpus_per_task=args.cpus_per_task, executable=args.mixlm, swarm=args.swarm,
    )
    return common.emit_sbatch_script(script, args.out, submit=args.submit, dry_run=args.dry_run)


def main(argv: Sequence[str] | None = None, prog: str = "launch/sweep.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
