"""Test helpers for tests that start jax.distributed processes themselves: a free coordinator port, a launcher
of N localhost processes, and the start of such a worker process."""

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

# Subprocesses only (compilation is most of their time; several share 2 cores): less LLVM optimisation and no
# spinning Eigen threads. Same math up to float rounding, which the tests' loss tolerances allow.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; the caller's coordinator binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(logs: Path, argv_of: Callable[[int, str], list[str]], processes: int,
           exit_code: int = 0) -> Callable[[], list[str]]:
    """Starts `processes` jax.distributed processes on localhost (8 // processes fake devices each, FAST_COMPILE),
    process i running argv_of(i, port) with its output in logs/p<i>.log; returns a function that waits for them
    (300 s), checks that every one exited with `exit_code` (-9: killed by SIGKILL; else fails with their logs'
    tails) and returns their logs."""
    from conftest import xla_flags

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8 // processes) + FAST_COMPILE,
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    port, procs = str(free_port()), []
    logs.mkdir(parents=True, exist_ok=True)
    for i in range(processes):
        with open(logs / f"p{i}.log", "w") as log:  # the child keeps its own copy of the file
            procs.append(subprocess.Popen(argv_of(i, port), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root))

    def wait() -> list[str]:
        try:
            for p in procs:
                p.wait(timeout=300)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        texts = [(logs / f"p{i}.log").read_text() for i in range(processes)]
        assert [p.returncode for p in procs] == [exit_code] * processes, "\n".join(t[-3000:] for t in texts)
        return texts

    return wait


def start_worker(process_id: int, num_processes: int, port: str) -> None:
    """In a worker process started by `launch`: the precision tests/conftest.py sets in-process, then
    jax.distributed on the localhost coordinator."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
