"""Start `mixlm train` as N jax.distributed processes on this machine, coordinator on 127.0.0.1
(multi-host code tested on one machine; on CPU each process gets its own fake devices). Output lines are
prefixed [p<i>]; every process is polled, so one that fails (any of them, killed or exiting non-zero) is
noticed within a poll, named (`[p1] exited with -9; stopping the others`) and the others are stopped
(SIGTERM, then SIGKILL after a grace); SIGTERM / Ctrl-C is passed on, so every process saves a checkpoint
and exits.

  python launch/local.py -n 2 --cpu-devices 4 -- train configs/experiments/demo.yaml
  python launch/local.py --dry-run -n 2 -- train configs/experiments/demo.yaml   # print the commands
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run by path (python launch/local.py): import launch.* from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common
from mixlm.errors import ConfigError

# How long processes get to finish a checkpoint after SIGTERM before they are killed.
STOP_GRACE_S = 60.0
# How often every process is polled: a dead one is noticed within this.
POLL_S = 0.1


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_commands(argv: Sequence[str], num_processes: int, port: int) -> list[list[str]]:
    """One command per process: `python -m mixlm.cli train ... --coordinator 127.0.0.1:PORT ...`."""
    argv = common.check_command(argv)
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
    stop_grace_s: float = STOP_GRACE_S,
) -> int:
    """Runs the command as `num_processes` jax.distributed processes on this machine and waits; see
    `run_processes` for the exit code. log_dir: each process's output also goes to LOG_DIR/process_<i>.log."""
    commands = local_commands(argv, num_processes, port or free_port())
    return run_processes(commands, env=local_env(cpu_devices, env), log_dir=log_dir, out=out,
                         stop_grace_s=stop_grace_s)


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every live process, SIGKILL to those still alive `grace_s` later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for p in procs:
        if p.poll() is None:
            p.kill()


def run_processes(
    commands: Sequence[Sequence[str]],
    *,
    env: dict | None = None,
    log_dir: str | Path | None = None,
    out=None,
    stop_grace_s: float = STOP_GRACE_S,
    label: str = "p",
) -> int:
    """Starts one process per command (output prefixed [p<i>], and in LOG_DIR/process_<i>.log) and waits.
    `label`: the prefix's letter ([w<i>] for the workers of a TPU slice, launch/tpu.py).

    Each process is waited for by its own thread; the first one to end with a non-zero code is named on
    `out` and the others are stopped (SIGTERM, SIGKILL after `stop_grace_s`). Returns 0 when every process
    exits 0, else that first non-zero code (a process killed by signal N counts as 128+N, as in a shell).
    SIGTERM or SIGINT to the launcher is passed on to every process."""
    out = out or sys.stdout
    logs = []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        logs = [open(Path(log_dir) / f"process_{i}.log", "a") for i in range(len(commands))]  # noqa: SIM115
    procs, threads = [], []
    for i, cmd in enumerate(commands):
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t = threading.Thread(target=_forward, args=(proc.stdout, f"[{label}{i}] ", logs[i] if logs else None, out),
                             daemon=True)
        t.start()
        procs.append(proc)
        threads.append(t)

    def forward_signal(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    # A thread per process waits for it and queues (index, code) as it ends, so the launcher names the process
    # that died first: one dying can make its peers abort within milliseconds, before any poll tells them apart.
    ended: queue.Queue = queue.Queue()
    for i, proc in enumerate(procs):
        threading.Thread(target=lambda i=i, proc=proc: ended.put((i, proc.wait())), daemon=True).start()
    failed, done = 0, 0
    try:
        while done < len(procs):
            try:
                i, code = ended.get(timeout=POLL_S)  # a timeout, so SIGTERM/SIGINT handlers run meanwhile
            except queue.Empty:
                continue
            done += 1
            if code != 0:
                failed = code
                alive = done < len(procs)
                out.write(f"[{label}{i}] exited with {failed}" + ("; stopping the others\n" if alive else "\n"))
                out.flush()
                if alive:
                    _stop(procs, stop_grace_s)
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
        for f in logs:
            f.close()
    return 128 - failed if failed < 0 else failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="fake CPU devices per process (XLA_FLAGS); default: leave XLA_FLAGS as it is")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--log-dir", type=Path, default=None, help="also write LOG_DIR/process_<i>.log")
    common.add_dry_run_argument(parser, "print the commands, start nothing")
    common.add_command_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        for cmd in local_commands(args.command, args.num_processes, args.port or 12345):
            print(shlex.join(cmd))
        return 0
    return launch_local(args.command, args.num_processes, port=args.port, cpu_devices=args.cpu_devices,
                        log_dir=args.log_dir)


def main(argv: Sequence[str] | None = None, prog: str = "launch/local.py") -> int:
    return common.run_main(__doc__, add_arguments, run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
