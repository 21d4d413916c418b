"""Start `mixlm train` as several jax.distributed processes: on this machine, on every worker of a Cloud
TPU pod slice, or as a SLURM job on a GPU cluster.

    local  N processes here, coordinator on 127.0.0.1 (multi-host code tested on one machine; on CPU each
           process gets its own fake devices). Output lines are prefixed [p<i>]; if one process fails the
           others are stopped; SIGTERM / Ctrl-C is passed on, so every process saves a checkpoint and exits.
    tpu    `gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd DIR && .venv/bin/mixlm train ...
           --distributed"`: every worker runs the same command; jax detects the pod by itself.
    slurm  an sbatch script: one task per GPU (jax's SLURM detection gives each process the GPU of its
           SLURM_LOCALID, so one task per node would use one GPU of each node), `srun ... --distributed`,
           SIGTERM two minutes before the time limit so the run saves a checkpoint and can be requeued.

A proxy sweep fans out as a SLURM job array instead (`sweep_array_script`): task I of K trains
`mixlm sweep ... --shard I/K`; one plain `mixlm sweep` afterwards records every finished run.

Each returns or prints exact commands, so `--dry-run` shows what would run.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mixlm.config import ConfigError

# Verbs that take --coordinator/--num-processes/--process-id (or --distributed).
MULTI_PROCESS_VERBS = ("train",)
# The mixlm command on the cluster's machines, relative to the repo folder (`make install` creates it).
DEFAULT_EXECUTABLE = ".venv/bin/mixlm"
# How long processes get to finish a checkpoint after SIGTERM before they are killed.
STOP_GRACE_S = 60.0


def check_command(argv: Sequence[str]) -> list[str]:
    """`argv` is a mixlm command line without the program name: ['train', CONFIG, overrides...]."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] not in MULTI_PROCESS_VERBS:
        raise ConfigError(
            f"launch runs one of {', '.join(MULTI_PROCESS_VERBS)} on every process, got "
            f"{shlex.join(argv) or 'nothing'}; e.g. `mixlm launch local -n 2 -- train CONFIG`"
        )
    for flag in ("--coordinator", "--num-processes", "--process-id", "--distributed"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ConfigError(f"{flag} is set by the launcher; leave it out of the command")
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_commands(argv: Sequence[str], num_processes: int, port: int) -> list[list[str]]:
    """One command per process: `python -m mixlm.cli train ... --coordinator 127.0.0.1:PORT ...`."""
    argv = check_command(argv)
    if num_processes < 1:
        raise ConfigError(f"num_processes={num_processes} must be >= 1")
    return [
        [sys.executable, "-m", "mixlm.cli", *argv, "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", str(num_processes), "--process-id", str(i)]
        for i in range(num_processes)
    ]


def local_env(cpu_devices: int | None, base: dict | None = None) -> dict[str, str]:
    """The children's environment; cpu_devices sets the number of fake CPU devices per process."""
    env = dict(os.environ if base is None else base)
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _forward(stream, prefix: str, log_file, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
        if log_file is not None:
            log_file.write(line)
            log_file.flush()
    stream.close()


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    *,
    port: int = 0,
    cpu_devices: int | None = None,
    log_dir: str | Path | None = None,
    env: dict | None = None,
    out=None,
) -> int:
    """Runs the command as `num_processes` jax.distributed processes on this machine and waits.

    Returns 0 when every process exits 0, else the first non-zero exit code (after stopping the rest:
    SIGTERM, then SIGKILL after STOP_GRACE_S). log_dir: each process's output also goes to
    LOG_DIR/process_<i>.log. SIGTERM or SIGINT to the launcher is passed on to every process."""
    out = out or sys.stdout
    commands = local_commands(argv, num_processes, port or free_port())
    child_env = local_env(cpu_devices, env)
    logs = []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        logs = [open(Path(log_dir) / f"process_{i}.log", "a") for i in range(num_processes)]  # noqa: SIM115
    procs, threads = [], []
    for i, cmd in enumerate(commands):
        proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t = threading.Thread(target=_forward, args=(proc.stdout, f"[p{i}] ", logs[i] if logs else None, out),
                             daemon=True)
        t.start()
        procs.append(proc)
        threads.append(t)

    def stop(signum=signal.SIGTERM, frame=None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    failed = 0
    try:
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and not failed:
                failed = bad[0]
                out.write(f"launch: a process exited {failed}; stopping the others\n")
                stop()
                deadline = time.monotonic() + STOP_GRACE_S
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
        for f in logs:
            f.close()
    codes = [p.returncode for p in procs]
    return failed or next((c for c in codes if c != 0), 0)


def tpu_commands(
    argv: Sequence[str],
    *,
    tpu: str,
    zone: str,
    project: str | None = None,
    workdir: str = "~/mixlm",
    setup: bool = False,
    log: str | None = None,
    executable: str = DEFAULT_EXECUTABLE,
) -> list[list[str]]:
    """The gcloud commands that run `mixlm <argv> --distributed` on every worker of a TPU VM slice.

    setup: first install the repo already copied to `workdir` on every worker (`make install` and the
    jax[tpu] extra). log: run detached with nohup, each worker writing WORKDIR/<log>.<hostname> (the
    run survives the ssh session); default: in the foreground, output streamed back."""
    argv = check_command(argv)
    if not tpu or not zone:
        raise ConfigError("a TPU launch needs --tpu NAME and --zone ZONE")
    base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all"]
    if project:
        base.append(f"--project={project}")
    cd = f"cd {workdir}"
    commands = []
    if setup:
        commands.append([*base, "--command", f"{cd} && make install && .venv/bin/pip install -e '.[tpu]'"])
    run = shlex.join([*shlex.split(executable), *argv, "--distributed"])
    if log:
        run = f"nohup {run} > {shlex.quote(log)}.$(hostname) 2>&1 &"
    commands.append([*base, "--command", f"{cd} && {run}"])
    return commands


def _sbatch_header(job_name: str, time_limit: str, output: str, partition: str | None,
                   account: str | None) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={output}",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return lines


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
    executable: str = DEFAULT_EXECUTABLE,
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
    lines = _sbatch_header(job_name, time_limit, "slurm-%A_%a.out", partition, account)
    lines += [
        f"#SBATCH --array=0-{shards - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
    ]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    has_parallel = any(a == "--parallel" or a.startswith("--parallel=") for a in argv)
    run = shlex.join([*shlex.split(executable), *argv, *([] if has_parallel else ["--parallel", str(parallel)])])
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        f'{run} --shard "$SLURM_ARRAY_TASK_ID/{shards}"',
        f"# when every task has finished, record the runs once: {shlex.join([*shlex.split(executable), *argv])}",
        "",
    ]
    return "\n".join(lines)


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
    executable: str = DEFAULT_EXECUTABLE,
) -> str:
    """An sbatch script running `mixlm <argv> --distributed` as nodes x gpus_per_node tasks."""
    argv = check_command(argv)
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must both be >= 1")
    lines = _sbatch_header(job_name, time_limit, output, partition, account)
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
        f"cd {shlex.quote(workdir)}",
        "# jax.distributed finds the coordinator, process count and id in SLURM's environment.",
        "srun --kill-on-bad-exit=1 " + shlex.join([*shlex.split(executable), *argv, "--distributed"]),
        "",
    ]
    return "\n".join(lines)
