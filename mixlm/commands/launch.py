"""`mixlm launch local|tpu|slurm [options] -- train CONFIG [overrides]`: one training on many processes;
`mixlm launch slurm-sweep [options] -- sweep BASE --mixtures M --out O`: a proxy sweep as a job array.

  mixlm launch local -n 2 --cpu-devices 4 -- train configs/experiments/demo.yaml   # 2 processes here
  mixlm launch tpu --tpu my-v4-32 --zone us-central2-b -- train configs/experiments/regmix-1b.yaml
  mixlm launch slurm --nodes 2 --gpus-per-node 8 --workdir /shared/mixlm --out job.sbatch \\
      -- train configs/experiments/regmix-1b.yaml          # writes the script; --submit runs sbatch
  mixlm launch slurm-sweep --shards 16 --workdir /shared/mixlm -- sweep configs/experiments/regmix-proxy.yaml \\
      --mixtures mixtures/ --out sweep/                    # then `mixlm sweep ...` once records the runs
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_subparsers(dest="where", metavar="WHERE", required=True)

    local = where.add_parser("local", help="N jax.distributed processes on this machine")
    local.add_argument("-n", "--num-processes", type=int, required=True)
    local.add_argument("--cpu-devices", type=int, default=None,
                       help="fake CPU devices per process (XLA_FLAGS); default: leave XLA_FLAGS as it is")
    local.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    local.add_argument("--log-dir", type=Path, default=None, help="also write LOG_DIR/process_<i>.log")
    local.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")

    tpu = where.add_parser("tpu", help="every worker of a Cloud TPU VM slice, over gcloud ssh")
    tpu.add_argument("--tpu", required=True, help="TPU VM name")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", default=None)
    tpu.add_argument("--workdir", default="~/mixlm", help="the repo's folder on the workers")
    tpu.add_argument("--setup", action="store_true", help="first run `make install` + jax[tpu] on every worker")
    tpu.add_argument("--log", default=None,
                     help="run detached (nohup), each worker logging to WORKDIR/LOG.<hostname>")
    tpu.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")

    slurm = where.add_parser("slurm", help="an sbatch script: one task per GPU, srun ... --distributed")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--workdir", required=True, help="the repo's folder on the shared file system")
    slurm.add_argument("--job-name", default="mixlm")
    slurm.add_argument("--time", default="24:00:00", help="time limit (HH:MM:SS)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=8)
    slurm.add_argument("--no-requeue", action="store_true")
    slurm.add_argument("--out", type=Path, default=None, help="write the script here (default: print it)")
    slurm.add_argument("--submit", action="store_true", help="sbatch the script written to --out")

    array = where.add_parser("slurm-sweep", help="a proxy sweep as a SLURM job array: task I runs --shard I/K")
    array.add_argument("--shards", type=int, required=True, help="array tasks (K)")
    array.add_argument("--workdir", required=True, help="the repo's folder on the shared file system")
    array.add_argument("--gpus-per-task", type=int, default=1, help="0 for CPU-only tasks")
    array.add_argument("--parallel", type=int, default=1, help="proxy runs at once within a task")
    array.add_argument("--job-name", default="mixlm-sweep")
    array.add_argument("--time", default="04:00:00")
    array.add_argument("--partition", default=None)
    array.add_argument("--account", default=None)
    array.add_argument("--cpus-per-task", type=int, default=8)
    array.add_argument("--out", type=Path, default=None, help="write the script here (default: print it)")
    array.add_argument("--submit", action="store_true", help="sbatch the script written to --out")

    for p in (tpu, slurm, array):
        p.add_argument("--mixlm", default=".venv/bin/mixlm", help="the mixlm command there, from --workdir")
    for p in (local, tpu, slurm, array):
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- train CONFIG [section.key=value ...]")


def _need(tool: str) -> None:
    from mixlm.config import ConfigError

    if shutil.which(tool) is None:
        raise ConfigError(f"{tool} is not on PATH here; install it, or use --dry-run to print the commands")


def run(args) -> int:
    from mixlm import launch

    if args.where == "local":
        if args.dry_run:
            for cmd in launch.local_commands(args.command, args.num_processes, args.port or 12345):
                print(shlex.join(cmd))
            return 0
        return launch.launch_local(args.command, args.num_processes, port=args.port,
                                   cpu_devices=args.cpu_devices, log_dir=args.log_dir)
    if args.where == "tpu":
        commands = launch.tpu_commands(args.command, tpu=args.tpu, zone=args.zone, project=args.project,
                                       workdir=args.workdir, setup=args.setup, log=args.log,
                                       executable=args.mixlm)
        if args.dry_run:
            for cmd in commands:
                print(shlex.join(cmd))
            return 0
        _need("gcloud")
        for cmd in commands:
            print("+ " + shlex.join(cmd), flush=True)
            code = subprocess.call(cmd)
            if code:
                return code
        return 0
    if args.where == "slurm-sweep":
        script = launch.sweep_array_script(
            args.command, shards=args.shards, workdir=args.workdir, gpus_per_task=args.gpus_per_task,
            parallel=args.parallel, job_name=args.job_name, time_limit=args.time, partition=args.partition,
            account=args.account, cpus_per_task=args.cpus_per_task, executable=args.mixlm,
        )
    else:
        script = launch.slurm_script(
            args.command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, workdir=args.workdir,
            job_name=args.job_name, time_limit=args.time, partition=args.partition, account=args.account,
            cpus_per_task=args.cpus_per_task, requeue=not args.no_requeue, executable=args.mixlm,
        )
    if args.out is None:
        if args.submit:
            print("mixlm launch slurm: --submit needs --out (the script file to submit)", file=sys.stderr)
            return 2
        print(script, end="")
        return 0
    if args.out.exists():
        print(f"mixlm launch slurm: {args.out} exists; choose another --out (it is not overwritten)",
              file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(script)
    print(f"wrote {args.out}")
    if args.submit:
        _need("sbatch")
        return subprocess.call(["sbatch", str(args.out)])
    return 0
