"""Checkpoint I/O on this host: how long a save blocks the train loop (async vs sync), the total save
time until the step has committed, the restore time, and what the content checksums cost (crc32 of every
file at save, checkpoint.verify; checked again before a restore), for a ~100M-param llama with AdamW moments
(fp32 params + two fp32 moments ≈ 1.2 GB), through mixlm.checkpoint.RunCheckpoints as train() uses it.
Also: the value sums each save records in its meta item (mixlm.checkpoint.VALUE_SUMS), and the checksum
choice: crc32 against adler32, md5, sha256 and blake2b over the same step's files, held in memory, one thread.

Prints a Markdown table and writes it to benchmarks/results/checkpoint_io.md.

    .venv/bin/python benchmarks/checkpoint_io.py [--repeats 3] [--dir /tmp/mixlm-ckpt-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
# d 768, 10 layers, 12 heads, SwiGLU 2048, vocab 16384, untied: 96.5M params
MODEL = ["model.family=llama", "model.num_layers=10", "model.d_model=768", "model.num_heads=12",
         "model.mlp_dim=2048", "model.vocab_size=16384", "model.max_seq_len=512"]


from machine import describe_machine as machine  # benchmarks/machine.py


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# Candidate whole-file checksums: zlib.crc32 is what checkpoint.verify records (mixlm.checkpoint.file_crc32).
HASHES = {
    "crc32 (zlib; checkpoint.verify)": zlib.crc32,
    "adler32 (zlib)": zlib.adler32,
    "md5": lambda data: hashlib.md5(data).digest(),
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "blake2b": lambda data: hashlib.blake2b(data).digest(),
}


def hash_throughput(files: list[Path], repeats: int) -> dict[str, list[float]]:
    """{hash: [seconds to hash every file's bytes, per repeat]}: the files are read into memory first (so the
    disk is not timed), hashed in one thread, in 4 MiB chunks as file_crc32 reads them; one untimed warm-up."""
    chunks = []
    for path in files:
        data = path.read_bytes()
        chunks += [memoryview(data)[i:i + (1 << 22)] for i in range(0, len(data), 1 << 22)]
    out: dict[str, list[float]] = {}
    for name, fn in HASHES.items():
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for chunk in chunks:
                fn(chunk)
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = times
        print(f"{name}: {statistics.median(times):.3f}s", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where to write checkpoints (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_io.md"))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from etils import epath

    from mixlm.checkpoint import (
        RunCheckpoints,
        checkpoint_dir,
        file_problem,
        run_metadata,
        value_sums,
        write_file_list,
    )
    from mixlm.config import CheckpointConfig, load_config
    from mixlm.sharding import make_mesh
    from mixlm.train import build_setup

    cfg = load_config(None, MODEL)
    setup = build_setup(cfg, make_mesh(cfg.mesh))
    state = setup.init_state(jax.random.key(0))

    def with_moments(state):  # a trained state: Adam moments are not the (highly compressible) zeros of init
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.opt_state))))
        opt_state = jax.tree.map(
            lambda x: jnp.abs(jax.random.normal(next(keys), x.shape, x.dtype)) * 1e-3
            if jnp.issubdtype(x.dtype, jnp.floating) else x, state.opt_state)
        return state.replace(opt_state=opt_state)

    state = jax.jit(with_moments, out_shardings=setup.state_shardings, donate_argnums=(0,))(state)
    jax.block_until_ready(state)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    mb = n_bytes / 1e6
    root = Path(args.dir or tempfile.mkdtemp(prefix="mixlm-ckpt-bench-"))
    print(f"state: {n_params / 1e6:.1f}M params, {mb:,.0f} MB with AdamW moments; writing under {root}", flush=True)

    sums_s: list[float] = []  # the value sums save() records in the meta item (one reduction over the state)
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        value_sums(state)
        if i:
            sums_s.append(time.perf_counter() - t0)
    rows = []
    restore_s: list[float] = []
    hash_s: list[float] = []  # crc32 of every file of the step, at save (checkpoint.verify)
    verify_s: list[float] = []  # the same check before a restore
    disk = 0
    for async_save in (True, False):
        run_dir = root / ("async" if async_save else "sync")
        shutil.rmtree(run_dir, ignore_errors=True)
        ckpts = RunCheckpoints(checkpoint_dir(run_dir), CheckpointConfig(keep_last=1, async_save=async_save),
                               log=lambda _: None)
        blocked, total = [], []
        for i in range(args.repeats + 1):  # the first save pays Orbax's one-time setup: not timed
            meta = run_metadata(cfg, i + 1, tokens_seen={"bench": 0}, mesh=setup.mesh)
            t0 = time.perf_counter()
            ckpts.save(i + 1, state, data_state={"step": i + 1}, meta=meta)
            t1 = time.perf_counter()
            ckpts.wait()
            t2 = time.perf_counter()
            if i:
                blocked.append(t1 - t0)
                total.append(t2 - t0)
            print(f"{'async' if async_save else 'sync'} save {i + 1}: blocked {t1 - t0:.2f}s, committed after "
                  f"{t2 - t0:.2f}s", flush=True)
        ckpts.close()
        disk = disk_bytes(Path(checkpoint_dir(run_dir)) / str(args.repeats + 1))
        rows.append((async_save, blocked, total))
        if async_save:
            for i in range(args.repeats + 1):
                reader = RunCheckpoints(checkpoint_dir(run_dir), CheckpointConfig(), log=lambda _: None)
                t0 = time.perf_counter()
                restored = reader.restore_latest(setup.abstract_state, cfg)
                jax.block_until_ready(restored.state)
                if i:
                    restore_s.append(time.perf_counter() - t0)
                reader.close()
                print(f"restore {i + 1}: {time.perf_counter() - t0:.2f}s", flush=True)
                del restored
            # The checksum cost alone, on the committed step: the file list with and without crc32s (what
            # wait() adds before the next save), and its check with and without them (before a restore).
            step_dir = epath.Path(checkpoint_dir(run_dir)) / str(args.repeats + 1)
            for i in range(args.repeats + 1):
                times = []
                for work, kwargs in ((write_file_list, {"checksums": False}), (write_file_list, {"checksums": True}),
                                     (file_problem, {"verify": False}), (file_problem, {"verify": True})):
                    t0 = time.perf_counter()
                    assert not work(step_dir, **kwargs)  # None / '' (no problem)
                    times.append(time.perf_counter() - t0)
                if i:
                    hash_s.append(times[1] - times[0])
                    verify_s.append(times[3] - times[2])
                print(f"checksums {i + 1}: at save +{times[1] - times[0]:.2f}s, at restore +{times[3] - times[2]:.2f}s",
                      flush=True)
            hashes = hash_throughput([p for p in Path(str(step_dir)).rglob("*") if p.is_file()], args.repeats)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)

    from orbax.checkpoint import __version__ as ocp_version

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} s ({min(xs):.2f}–{max(xs):.2f})"

    restore = statistics.median(restore_s)
    lines = [
        "# Checkpoint I/O",
        "",
        (f"Machine: {machine()}. State: llama d 768 x 10 layers, vocab 16384 ({n_params / 1e6:.1f}M params), "
         f"fp32 params + AdamW moments = {mb:,.0f} MB ({disk / 1e6:,.0f} MB on disk), one CPU device, "
         f"orbax-checkpoint {ocp_version}, local disk. Median of {args.repeats} runs (range in parentheses) after "
         "one untimed warm-up save; other jobs shared the 2 cores, so expect ±50%."),
        "",
        "| operation | train loop blocked | until committed / restored | MB/s |",
        "|---|---|---|---|",
    ]
    for async_save, blocked, total in rows:
        lines.append(f"| {'async' if async_save else 'sync'} save | {spread(blocked)} | {spread(total)} | "
                     f"{mb / statistics.median(total):,.0f} |")
    lines.append(f"| restore (validate incl. checksums + read onto the mesh) | at start-up only | {spread(restore_s)} | "
                 f"{mb / restore:,.0f} |")
    lines.append(f"| checksums at save (crc32 of every file; part of the saves above) | the next save's wait | "
                 f"{spread(hash_s)} | {disk / 1e6 / statistics.median(hash_s):,.0f} |")
    lines.append(f"| checksum check before a restore (part of the restore above) | at start-up only | {spread(verify_s)} | "
                 f"{disk / 1e6 / statistics.median(verify_s):,.0f} |")
    lines.append(f"| value sums at save (VALUE_SUMS; part of the saves above) | all of it | {spread(sums_s)} | "
                 f"{mb / statistics.median(sums_s):,.0f} |")
    lines += [
        "",
        ("\"Blocked\" is the time `RunCheckpoints.save` holds the train loop (async: until the arrays are "
         "copied off the devices; sync: until committed). \"Committed\" adds the background write, the commit "
         "rename and the file list (sizes and crc32 checksums, checkpoint.verify=true). MB/s = state size / "
         "committed (or restore) time; for the checksum rows, bytes on disk / the time the checksums add (the "
         "file list or its check with them minus without). With several processes each checksums its own "
         "OCDBT folder, so the save-side cost is per process, not per checkpoint. The host has far more RAM "
         "than the state, so writes and reads mostly hit the OS page cache: these are upper bounds for a cold "
         "disk or a network file system."),
        "",
        "## Which checksum",
        "",
        (f"The same step's {disk / 1e6:,.0f} MB of files, read into memory first, hashed in 4 MiB chunks in one "
         f"thread (median of {args.repeats} after a warm-up; Python {sys.version.split()[0]}, "
         f"zlib {zlib.ZLIB_RUNTIME_VERSION}):"),
        "",
        "| checksum | time | MB/s |",
        "|---|---|---|",
        *(f"| {name} | {spread(times)} | {disk / 1e6 / statistics.median(times):,.0f} |" for name, times in hashes.items()),
        "",
        ("checkpoint.verify needs to catch torn and overwritten bytes, not tampering: any of these does; the "
         "fastest one is used. The save-side and restore-side rows above run it on 4 threads (zlib releases the GIL)."),
        "",
        f"Command: `.venv/bin/python {' '.join(sys.argv)}`",
        "",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
