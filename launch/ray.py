"""Start a Ray cluster on many machines and run one mixlm data stage on it (`--engine ray`): a SLURM job (the
first node runs the Ray head and the stage's driver, every node a Ray worker), a Cloud TPU VM pod's hosts
(worker 0 the head), or any hosts reachable by ssh (a GPU pod; the first is the head).

  python launch/ray.py slurm --nodes 8 --cpus-per-node 64 --workdir /shared/mixlm --out prep.sbatch --submit \\
      -- prepare --out /shared/prepared --tokenizer /shared/tok --domain web=/shared/raw/web/
  python launch/ray.py tpu --tpu my-v4-32 --zone us-central2-b --hosts 4 --workdir ~/mixlm \\
      -- select signals /shared/raw/web/*.jsonl.zst --out /shared/signals
  python launch/ray.py hosts --hosts gpu0,gpu1,gpu2 --workdir /shared/mixlm -- select dedup ... --method minhash

The command after -- is a data verb (prepare, tokenizer train, select ...); the launcher adds `--engine ray
--ray-address HEAD:PORT`. Every machine needs mixlm installed in --workdir (`make install`, then `pip install -e
'.[ray]'`) and the stage's inputs and outputs at the same paths (a shared file system or an object store).
`slurm` writes an sbatch script (printed without --out); `tpu` and `hosts` run `ray start` on every host over
ssh, the stage on the head, then `ray stop` on every host, even when the stage fails. --dry-run prints the
script or the commands and runs nothing. Every user string is shell-quoted (a leading ~/ of --workdir becomes
"$HOME"/...); #SBATCH values, TPU resource names and host names must be plain names.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

if not __package__:  # run by path (python launch/ray.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common
from launch.tpu import Slice
from mixlm.errors import ConfigError

DATA_VERBS = ("prepare", "tokenizer", "select")
DEFAULT_RAY = ".venv/bin/ray"  # the ray command on the cluster's machines, relative to --workdir
DEFAULT_PORT = 6379
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")  # never an ssh option (no leading -)
HEAD_PLACEHOLDER = "HEAD_IP"  # in --dry-run: the head's address, known only when the cluster exists


def check_data_command(argv: Sequence[str]) -> list[str]:
    """`argv` is a mixlm data command without the program name (prepare ..., tokenizer train ..., select ...);
    the engine flags are the launcher's."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] not in DATA_VERBS:
        raise ConfigError(f"launch ray runs a data stage ({', '.join(DATA_VERBS)}) on the cluster, got "
                          f"{shlex.join(argv) or 'nothing'}; e.g. `mixlm launch ray slurm ... -- prepare --out ...`")
    for flag in ("--engine", "--ray-address"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ConfigError(f"{flag} is set by the launcher; leave it out of the command")
    return argv


def _port(port: int) -> int:
    if not 1024 <= port <= 65535:
        raise ConfigError(f"--port {port}: choose a free TCP port in 1024..65535")
    return port


def _stage_line(executable: str, argv: Sequence[str], address: str) -> str:
    """The stage's command line, its words quoted, with the engine flags; `address` is shell text the launcher
    made (never user text)."""
    return f"{common.shell_command(executable, argv)} --engine ray --ray-address {address}"


# ---- SLURM --------------------------------------------------------------------------------------------------
def slurm_script(argv: Sequence[str], *, nodes: int, cpus_per_node: int, workdir: str, gpus_per_node: int = 0,
                 job_name: str = "mixlm-ray", time_limit: str = "24:00:00", partition: str | None = None,
                 account: str | None = None, output: str = "slurm-%j.out", port: int = DEFAULT_PORT,
                 executable: str = common.DEFAULT_EXECUTABLE, ray_executable: str = DEFAULT_RAY) -> str:
    """An sbatch script: `ray start --head` on the first node, `ray start --address` on the others (one srun step
    each, --block, alongside the job), a wait until every node has joined, then the stage on the first node."""
    argv = check_data_command(argv)
    if nodes < 1 or cpus_per_node < 1 or gpus_per_node < 0:
        raise ConfigError(f"nodes={nodes}, cpus_per_node={cpus_per_node} must be >= 1 and gpus_per_node="
                          f"{gpus_per_node} >= 0")
    ray = common.shell_command(ray_executable, [])
    resources = f"--num-cpus={cpus_per_node}" + (f" --num-gpus={gpus_per_node}" if gpus_per_node else "")
    lines = common.sbatch_header(job_name, time_limit, output, partition, account)
    lines += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={cpus_per_node}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    lines += [
        "",
        "set -euo pipefail",
        f"cd {common.shell_path('--workdir', workdir)}",
        'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        'head=${nodes[0]}',
        'head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk \'{print $1}\')',
        f"port={_port(port)}",
        "# Ray's processes on every node, as job steps that end with the job.",
        (f'srun --overlap --nodes=1 --ntasks=1 -w "$head" {ray} start --head --node-ip-address="$head_ip" '
        f'--port="$port" {resources} --block &'),
        "sleep 5",
        'for node in "${nodes[@]:1}"; do',
        (f'  srun --overlap --nodes=1 --ntasks=1 -w "$node" {ray} start --address="$head_ip:$port" {resources} '
        "--block &"),
        "done",
        "# Wait (10 minutes at most) until every node has joined the cluster.",
        "for _ in $(seq 120); do",
        f'  alive=$({ray} status --address="$head_ip:$port" 2>/dev/null | grep -c "node_" || true)',
        f'  [ "$alive" -ge {nodes} ] && break',
        "  sleep 5",
        "done",
        _stage_line(executable, argv, '"$head_ip:$port"'),
        "",
    ]
    return "\n".join(lines)


# ---- a pod's hosts over ssh -------------------------------------------------------------------------------
def pod_commands(argv: Sequence[str], ssh: Callable[[int, str], list[str]], hosts: int, head_address: str,
                 workdir: str, *, head_is_ip: bool = False, port: int = DEFAULT_PORT,
                 executable: str = common.DEFAULT_EXECUTABLE, ray_executable: str = DEFAULT_RAY
                 ) -> dict[str, list[list[str]]]:
    """The commands, in order: `head` (ray start --head on host 0), `workers` (ray start --address on each other
    host), `stage` (the data stage on host 0) and `stop` (ray stop on every host). `ssh(i, line)` is the argv
    that runs shell `line` on host i; `head_address` the head's address (a host name, or with `head_is_ip` the
    IP the head binds) as the other hosts reach it."""
    argv = check_data_command(argv)
    if hosts < 1:
        raise ConfigError(f"a Ray cluster needs at least 1 host, got {hosts}")
    cd = f"cd {common.shell_path('--workdir', workdir)}"
    ray = common.shell_command(ray_executable, [])
    address = shlex.quote(f"{head_address}:{_port(port)}")
    return {
        "head": [ssh(0, f"{cd} && {ray} start --head --port={port}"
                        + (f" --node-ip-address={shlex.quote(head_address)}" if head_is_ip else ""))],
        "workers": [ssh(i, f"{cd} && {ray} start --address={address}") for i in range(1, hosts)],
        "stage": [ssh(0, f"{cd} && {_stage_line(executable, argv, address)}")],
        "stop": [ssh(i, f"{cd} && {ray} stop") for i in range(hosts)],
    }


def _head_ip(text: str) -> str:
    """The head's internal IP as `gcloud ... describe` printed it; refused unless it is an IP address."""
    value = text.strip().split(";")[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"could not read worker 0's internal IP from gcloud ({text.strip()[:200]!r}); is the "
                          "TPU VM running?") from None


def run_pod(commands: dict[str, list[list[str]]], *, dry_run: bool, runner=subprocess.call) -> int:
    """Runs the head, workers and stage commands in order (stopping at the first failure), then `stop` on every
    host whatever happened; returns the stage's exit code (or the failed start's). --dry-run: prints them."""
    if dry_run:
        for step in ("head", "workers", "stage", "stop"):
            for cmd in commands[step]:
                print(shlex.join(cmd))
        return 0
    code = 0
    try:
        for step in ("head", "workers", "stage"):
            for cmd in commands[step]:
                code = runner(cmd)
                if code:
                    print(f"launch ray: {step} command failed with exit code {code}: {shlex.join(cmd)}",
                          file=sys.stderr)
                    return code
        return code
    finally:
        for cmd in commands["stop"]:
            runner(cmd)


# ---- the command line ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    # also before slurm|tpu|hosts, as the other launchers take it first (`mixlm launch ray --dry-run slurm ...`)
    parser.add_argument("--dry-run", dest="dry_run_first", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="where", required=True, metavar="slurm|tpu|hosts")
    slurm = sub.add_parser("slurm", help="an sbatch script: the Ray head and a worker per node, the stage on the head")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--cpus-per-node", type=int, required=True, help="CPUs each node gives Ray")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs each node gives Ray (model raters)")
    common.add_sbatch_arguments(slurm, job_name="mixlm-ray", time_limit="24:00:00")
    tpu = sub.add_parser("tpu", help="a Cloud TPU VM pod's hosts over gcloud ssh (worker 0 the head)")
    tpu.add_argument("--tpu", required=True)
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project")
    tpu.add_argument("--hosts", type=int, required=True, help="TPU VM hosts (workers) of the slice")
    tpu.add_argument("--workdir", required=True, help="the repo's folder on every host")
    hosts = sub.add_parser("hosts", help="hosts reachable by ssh, e.g. a GPU pod's (the first is the head)")
    hosts.add_argument("--hosts", required=True, help="comma-separated host names; the first runs the head")
    hosts.add_argument("--workdir", required=True, help="the repo's folder on every host")
    for p in (slurm, tpu, hosts):
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the Ray head's port")
        p.add_argument("--ray", default=DEFAULT_RAY, help="the ray command there, from --workdir")
        common.add_executable_argument(p)
        if p is not slurm:
            common.add_dry_run_argument(p, "print the commands, run none")
        common.add_command_argument(p, "-- prepare|tokenizer train|select ... (the launcher adds --engine ray)")


def run(args: argparse.Namespace) -> int:
    args.dry_run = args.dry_run or args.dry_run_first
    if args.where == "slurm":
        script = slurm_script(
            args.command, nodes=args.nodes, cpus_per_node=args.cpus_per_node, gpus_per_node=args.gpus_per_node,
            workdir=args.workdir, job_name=args.job_name, time_limit=args.time, partition=args.partition,
            account=args.account, port=args.port, executable=args.mixlm, ray_executable=args.ray)
        return common.emit_sbatch_script(script, args.out, submit=args.submit, dry_run=args.dry_run)
    if args.where == "tpu":
        tpu_slice = Slice(args.tpu, args.zone, args.project)
        ssh = lambda i, line: tpu_slice.ssh(line, worker=str(i))
        describe = tpu_slice.gcloud("tpu-vm", "describe", tpu_slice.tpu,
                                    "--format=value(networkEndpoints[0].ipAddress)")
        count = args.hosts
        if args.dry_run:
            print(f"# the head's address: {shlex.join(describe)}")
            head = HEAD_PLACEHOLDER
        else:
            common.need_tool("gcloud")
            head = _head_ip(subprocess.run(describe, capture_output=True, text=True, check=False).stdout)
    else:
        names = [h.strip() for h in args.hosts.split(",") if h.strip()]
        for name in names:
            if not HOST_NAME.fullmatch(name):
                raise ConfigError(f"--hosts: {name!r} is not a host name (letters, digits, . and -)")
        if not names:
            raise ConfigError("--hosts: give at least one host name")
        ssh = lambda i, line: ["ssh", names[i], line]
        count, head = len(names), names[0]
        if not args.dry_run:
            common.need_tool("ssh")
    commands = pod_commands(args.command, ssh, count, head, args.workdir, head_is_ip=args.where == "tpu",
                            port=args.port, executable=args.mixlm, ray_executable=args.ray)
    return run_pod(commands, dry_run=args.dry_run)


def main(argv: Sequence[str] | None = None, prog: str = "launch/ray.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
