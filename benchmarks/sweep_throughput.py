"""Sweep throughput: proxies per hour for one proxy model and token budget, trained three ways in one run.

    process per proxy   mixlm sweep --parallel 1   (today: one `mixlm train` process per proxy; JAX's persistent
                                                    compilation cache shared by the sweep's processes)
    sequential          mixlm sweep --parallel 0   (one process, proxies one after another; the compiled step
                                                    is reused, mixlm.train.build_setup's cache)
    swarm of K          mixlm sweep --swarm K      (K proxies in one jitted step, mixlm.train with K members), K = 4, 8, 16, 32, 64

Each way is one `mixlm sweep` command in a fresh process on the demo corpus (mixlm.data.demo_corpus), timed from
start to exit (start-up, data set-up, compilation, training, validation, results.csv), on one CPU device (the
8 fake devices of the test environment are turned off for the children). The proxy is RegMix's 1M proxy
(configs/models/regmix-1m.yaml: 2 layers, d_model 256, 8 heads, MLP 512, 1,312,000 non-embedding params) with
the demo tokenizer's vocabulary (1024 instead of 50432) at seq 128 (instead of 2048), batch 8, fp32, so that a
proxy finishes in seconds on this CPU. Prints the table with ratios to process-per-proxy and writes
benchmarks/results/sweep_throughput_cpu.md (machine, command, load average). Never asserts a time.

The one-swarm rows (proxies = K, K >= 16) are fitted as wall = F + c*K (least squares): F is what a swarm pays
once (start-up, data set-up, compilation), c what each member adds (its training and validation). A swarm's rate
can approach but never pass (process-per-proxy seconds per proxy) / c, however large K: that ceiling is printed
beside the table, so a target above it shows as out of reach on this host rather than as a shortfall of K.

    python benchmarks/sweep_throughput.py                    # the three ways (~5-10 min on the 2-core host)
    python benchmarks/sweep_throughput.py --sweep48          # also a 48-proxy sweep, process-per-proxy vs swarm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine as machine

RESULTS = REPO / "benchmarks" / "results" / "sweep_throughput_cpu.md"


def proxy_config(prepared: Path, vocab: int, steps: int, batch: int, seq_len: int) -> dict:
    return {
        "model": {"family": "llama", "name": "regmix-1m-cpu", "num_layers": 2, "d_model": 256, "num_heads": 8,
                  "num_kv_heads": 8, "mlp_dim": 512, "vocab_size": vocab, "max_seq_len": seq_len,
                  "compute_dtype": "float32"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "optimizer": {"lr": 4e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.1, "clip_norm": 1.0},
        "schedule": {"kind": "constant", "warmup_steps": max(steps // 10, 1)},
        "data": {"source": "prepared", "prepared_dir": str(prepared), "seq_len": seq_len, "packing": "concat",
                 "mixture": {"arithmetic": 1.0}},
        "train": {"steps": steps, "global_batch_size": batch},
        "eval": {"batches": 2, "domains": ["office"]},
        "logging": {"every": steps, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }


def child_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)  # one CPU device: every way gets the whole host the same way
    return env


def timed_sweep(base: Path, mixtures: Path, out: Path, proxies: int, extra: list[str]) -> float:
    command = [sys.executable, "-m", "mixlm.cli", "sweep", str(base), "--mixtures", str(mixtures), "--out", str(out),
               "--limit", str(proxies), *extra]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "sweep.log", "w") as log:
        done = subprocess.run(command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed (exit {done.returncode}); see {out / 'sweep.log'}")
    rows = len((out / "results.csv").read_text().splitlines()) - 1
    if rows != proxies:
        raise SystemExit(f"{out / 'results.csv'} has {rows} rows, expected {proxies}")
    return wall


def training_rates(out: Path, rows: list[tuple[str, int, float]]) -> tuple[float | None, dict[int, float]]:
    """(mean tokens/s of the sequential way's single runs over their logged steps, {K: tokens/s of all members of
    the swarm way together}), read from what the runs logged (metrics.jsonl, the sweep logs)."""
    single = []
    for path in sorted((out / "way1" / "runs").glob("*/metrics.jsonl")):
        rates = [r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "tokens_per_s" in r]
        single += rates[-1:]
    swarms = {}
    for i, (name, _, _) in enumerate(rows):
        if name.startswith("swarm of "):
            found = re.findall(r"swarm step \d+: .*?([\d,]+) tokens/s", (out / f"way{i}" / "sweep.log").read_text())
            if found:
                swarms[int(name.split()[2])] = float(np.mean([float(x.replace(",", "")) for x in found]))
    return (float(np.mean(single)) if single else None), swarms


def cost_model(rows: list[tuple[str, int, float]], big: list[tuple[str, float]],
               rates: tuple[float | None, dict[int, float]]) -> list[str]:
    """Lines fitting wall = F + c*K over the one-swarm rows (K >= 16, proxies = K), and the ceiling it implies."""
    fit = [(proxies, wall) for name, proxies, wall in rows if name.startswith("swarm of ")
           and proxies == int(name.split()[2]) and proxies >= 16]
    if len(fit) < 2:
        return []
    k = np.array([p for p, _ in fit], dtype=float)
    wall = np.array([w for _, w in fit])
    c, fixed = np.polyfit(k, wall, 1)
    per_proxy = rows[0][2] / rows[0][1]
    lines = ["", (f"Swarm cost model, least squares over the one-swarm rows (K = {', '.join(str(int(x)) for x in k)}): "
                  f"wall = F + c*K with F = {fixed:.1f} s per swarm (start-up, data set-up, compilation) and "
                  f"c = {c:.2f} s per member (its training and validation steps, its data and logs; the largest "
                  f"residual is {np.max(np.abs(wall - (fixed + c * k))):.1f} s).")]
    lines.append(f"Process per proxy costs {per_proxy:.2f} s per proxy (its row above), so on this host a swarm's rate "
                 f"approaches at most {per_proxy:.2f} / {c:.2f} = **{per_proxy / c:.2f}x** process-per-proxy as K "
                 "grows.")
    if big and big[0][0] == "process per proxy":
        marginal = (big[0][1] - rows[0][2]) / (48 - rows[0][1])
        lines.append(f"In the 48-proxy sweep process per proxy cost {marginal:.2f} s for each proxy after the first "
                     f"{rows[0][1]} ((48-proxy wall - {rows[0][1]}-proxy wall) / {48 - rows[0][1]}): ceiling "
                     f"{marginal / c:.2f}x on that basis.")
    single, swarms = rates
    if single and swarms:
        together = ", ".join(f"K={kk}: {v:,.0f}" for kk, v in sorted(swarms.items()))
        lines.append(f"Training rates as logged: a single run of the sequential way {single:,.0f} tokens/s (its last "
                     f"logged window, mean over its runs); a swarm's members together {together} tokens/s "
                     f"({min(swarms.values()) / single:.2f}-{max(swarms.values()) / single:.2f}x the single run's).")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/mixlm-sweep-throughput", help="scratch folder (data, sweeps)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per proxy")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--process-proxies", type=int, default=4, help="proxies timed one process each")
    parser.add_argument("--sequential-proxies", type=int, default=8)
    parser.add_argument("--swarms", default="4,8,16,32,64", help="member counts K")
    parser.add_argument("--swarm-proxies", type=int, default=8, help="proxies per swarm way: max(K, this)")
    parser.add_argument("--sweep48", action="store_true",
                        help="also time a whole 48-proxy sweep process-per-proxy, as swarms of 16 and as one swarm "
                             "of 48 (~+6 min on a quiet 2-core host)")
    parser.add_argument("--no-save", action="store_true", help="print only; leave the results file alone")
    args = parser.parse_args()

    from mixlm.data.demo_corpus import GENERATORS, prepare_demo_data
    from mixlm.data.tokenizer import load_tokenizer_spec
    from mixlm.mixing import load_prior, mixtures_table, sample_mixtures, write_csv

    out = Path(args.out)
    load_before = os.getloadavg()
    data = prepare_demo_data(out / "data", docs_per_domain=1000, vocab_size=1024, target_domains=("office",))
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = out / "proxy.yaml"
    base.write_text(yaml.safe_dump(proxy_config(data["prepared"], vocab, args.steps, args.batch, args.seq_len)))
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    mixtures = out / "mixtures.csv"
    counts = [int(x) for x in args.swarms.split(",")]
    write_csv(mixtures, mixtures_table(sample_mixtures(prior, max(48, *counts, args.sequential_proxies,
                                                                  args.swarm_proxies), seed=0), prior.domains))
    tokens = args.steps * args.batch * args.seq_len

    ways = [("process per proxy (`--parallel 1`)", args.process_proxies, ["--parallel", "1"]),
            ("sequential, one process (`--parallel 0`)", args.sequential_proxies, ["--parallel", "0"])]
    ways += [(f"swarm of {k} (`--swarm {k}`)", max(k, args.swarm_proxies), ["--swarm", str(k)])
             for k in counts]
    rows = []
    for i, (name, proxies, extra) in enumerate(ways):
        sweep = out / f"way{i}"
        subprocess.run(["rm", "-rf", str(sweep)], check=True)
        wall = timed_sweep(base, mixtures, sweep, proxies, extra)
        rows.append((name, proxies, wall))
        print(f"{name}: {proxies} proxies in {wall:.1f} s", flush=True)
    big = []
    if args.sweep48:
        for name, extra in (("process per proxy", ["--parallel", "1"]), ("swarms of 16", ["--swarm", "16"]),
                            ("one swarm of 48", ["--swarm", "48"])):
            sweep = out / f"sweep48-{extra[1]}"
            subprocess.run(["rm", "-rf", str(sweep)], check=True)
            wall = timed_sweep(base, mixtures, sweep, 48, extra)
            big.append((name, wall))
            print(f"48-proxy sweep, {name}: {wall:.1f} s", flush=True)
    load_after = os.getloadavg()

    per_hour = {name: proxies / wall * 3600 for name, proxies, wall in rows}
    reference = per_hour[rows[0][0]]
    lines = [
        "# Sweep throughput: proxies per hour on CPU",
        "",
        (f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d %H:%M')}. Command: "
        f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`."),
        (f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.1f}' for x in load_before)}, at end "
        f"{', '.join(f'{x:.1f}' for x in load_after)} (the host is shared; every way ran under the same conditions "
        "one after another, so compare the ratios rather than the absolute rates)."),
        (f"Proxy: regmix-1m's shape (2 layers, d_model 256, 8 heads, MLP 512: 1,312,000 non-embedding params) with "
        f"vocab {vocab} (demo tokenizer), seq {args.seq_len}, batch {args.batch}, {args.steps} steps = {tokens:,} "
        "train tokens per proxy, fp32, AdamW, 2 validation batches on each of 5 domains (4 trained, 1 eval-only) at "
        "the end; demo corpus, 1,000 documents per domain; one CPU device."),
        ("Each way is one `mixlm sweep` command in a fresh process, timed from start to exit (start-up, data, "
        "compilation, training, validation, results.csv); mixtures sampled from the data's prior (seed 0)."),
        "",
        "| way | proxies | wall s | s / proxy | proxies / hour | x process per proxy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, proxies, wall in rows:
        lines.append(f"| {name} | {proxies} | {wall:.1f} | {wall / proxies:.1f} | {per_hour[name]:,.0f} | "
                     f"{per_hour[name] / reference:.2f} |")
    if big:
        lines += ["", "48-proxy demo-corpus sweep, whole wall-clock (same proxy and budget):", "",
                  "| way | wall s | x process per proxy |", "|---|---:|---:|"]
        for name, wall in big:
            lines.append(f"| {name} | {wall:.1f} | {big[0][1] / wall:.2f} |")
    lines += cost_model(rows, big, training_rates(out, rows))
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
