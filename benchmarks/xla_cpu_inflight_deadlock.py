"""Does XLA:CPU deadlock when a sharded train step is dispatched many times without a result being read?

With 8 fake CPU devices, jaxlib 0.10.2 keeps at most 32 computations in flight per device; a device's launch that
waits for a free slot holds one of the threads that the running step's collective needs, and the process stops
(all but one device in an all-gather, the last launch in Semaphore::Acquire). This script measures it: for each
case (steps dispatched per round, a read every k steps or none) it runs `--processes` processes at once (the load
is part of the recipe: a loaded host lets the dispatching thread run ahead), each doing `--rounds` rounds of the
test suite's tiny llama train step, and counts the processes that stopped (no round finished for `--stall` s).

    .venv/bin/python benchmarks/xla_cpu_inflight_deadlock.py            # about 10 min on 2 cores

Writes benchmarks/results/xla_cpu_inflight_deadlock.md (the machine, the command and the table).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "xla_cpu_inflight_deadlock.md"

# One process: ROUNDS rounds of STEPS train steps of a tiny llama on 8 fake devices, a result read every EVERY
# steps (0: only after the round); faulthandler ends it with exit code 3 when no round ends within STALL seconds.
CHILD = r"""
import faulthandler, os, sys, time
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=1800 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
from mixlm.config import ModelConfig, load_config
from mixlm.data.synthetic import SyntheticSource
from mixlm.sharding import make_mesh, to_global_batch
from mixlm.train import build_setup

rounds, steps, every, stall = (int(a) for a in sys.argv[1:5])
cfg = load_config(None, ["data.seq_len=16", "train.global_batch_size=8", "optimizer.lr=1e-2",
                         "schedule.kind=constant", "logging.progress=false", "logging.tensorboard=false"])
cfg = cfg.replace(model=ModelConfig(family="llama", num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                                    mlp_dim=64, vocab_size=200, max_seq_len=16, vocab_multiple=8))
mesh = make_mesh(cfg.mesh)
host = SyntheticSource(vocab_size=200, seq_len=16, batch_size=8, seed=1).next_batch()
faulthandler.dump_traceback_later(stall, exit=True)
for r in range(rounds):
    setup = build_setup(cfg, mesh)
    state = setup.init_state(jax.random.key(0))
    batch = to_global_batch(host, mesh)
    for i in range(1, steps + 1):
        state, m = setup.train_step(state, batch)
        if every and i % every == 0:
            float(m["loss"])
    float(m["loss"])
    faulthandler.dump_traceback_later(stall, exit=True)
    print("round", r, flush=True)
"""


def run_case(steps: int, every: int, processes: int, rounds: int, stall: int) -> tuple[int, int]:
    """(processes that stopped, rounds finished in all) for one case, its processes run at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(rounds), str(steps), str(every), str(stall)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(processes)]
    stopped = finished = 0
    for p in procs:
        out, _ = p.communicate()
        finished += out.count("round ")
        stopped += p.returncode != 0
    return stopped, finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="processes run at once per case")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per process")
    parser.add_argument("--stall", type=int, default=120, help="seconds without a finished round that count as stopped")
    parser.add_argument("--cases", default="200:0,30:0,200:16",
                        help="steps:every (every: read a result every so many steps; 0: only at the round's end)")
    args = parser.parse_args()
    rows, load = [], os.getloadavg()[0]
    for case in args.cases.split(","):
        steps, every = (int(x) for x in case.split(":"))
        start = time.perf_counter()
        stopped, finished = run_case(steps, every, args.processes, args.rounds, args.stall)
        rows.append((steps, every, stopped, finished, time.perf_counter() - start))
        print(f"steps {steps} read every {every or '-'}: {stopped} of {args.processes} processes stopped, "
              f"{finished} rounds finished ({rows[-1][-1]:.0f} s)", flush=True)
    import jax

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import describe_machine

    lines = [
        "# XLA:CPU: sharded steps dispatched without reading a result",
        "",
        "Written by `benchmarks/xla_cpu_inflight_deadlock.py` (see its docstring for what is measured).",
        "",
        f"- machine: {describe_machine()}; jax {jax.__version__}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        (f"- each case: {args.processes} processes at once, {args.rounds} rounds each; stopped = no round finished "
         f"for {args.stall} s; the host's load average was {load:.1f} at the start, "
         f"{os.getloadavg()[0]:.1f} at the end"),
        "",
        "| steps per round | a result read every | processes stopped | rounds finished | seconds |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {s} | {e or 'end of round'} | {st} of {args.processes} | {f} | {t:.0f} |" for s, e, st, f, t in rows),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
