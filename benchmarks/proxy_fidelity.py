"""Proxy fidelity on the demo corpus: the same mixtures swept at two token budgets (the second 3x the
first, the demo's `large` budget), then `mixlm mix fidelity` over the two sweeps: do the cheap proxies rank
the mixtures the way proxies on the target run's budget do, and does per-domain repetition differ?

    nice -n 10 .venv/bin/python benchmarks/proxy_fidelity.py        # ~6 min alone on 2 CPU cores

The proxy model is benchmarks/demo_sweep.py's (2 layers, d 64, seq 64, batch 16); the demo's finding
(demo_sweep_findings.md) was that 150-step proxies optimise to mixtures that lose at 450 steps. This is a
smaller version of that experiment, sized for CPU: fewer mixtures, shorter runs (sizes in the report).
Work goes to runs/proxy_fidelity/ (git-ignored; rerunning reads finished runs back). Writes
benchmarks/results/proxy_fidelity_demo.md with what `mix fidelity` printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_sweep import MACHINE, TARGET_DOMAINS, prepare, proxy_config, run_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "proxy_fidelity")
    parser.add_argument("--proxies", type=int, default=20)
    parser.add_argument("--short-steps", type=int, default=100, help="the cheap proxies' steps")
    parser.add_argument("--long-steps", type=int, default=300, help="proxies on the target run's budget")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 16 x 64 per domain")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "proxy_fidelity_demo.md")
    args = parser.parse_args()
    command = "nice -n 10 .venv/bin/python benchmarks/proxy_fidelity.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    started = time.perf_counter()

    import jax

    jax.config.update("jax_compilation_cache_dir", str(args.out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from mixlm.cli import main as mixlm_main
    from mixlm.data.demo_corpus import GENERATORS
    from mixlm.data.tokenizer import load_tokenizer_spec
    from mixlm.mixing import load_prior, mixtures_table, sample_mixtures, write_csv
    from mixlm.sweep import plan_sweep, run_sweep

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out)
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))
    domains = list(prior.domains)
    tokens_per_step = 16 * 64
    # Bounded for the long budget (the target run): both sweeps train the same mixtures.
    mixtures = sample_mixtures(prior, args.proxies, seed=0, token_budget=args.long_steps * tokens_per_step,
                               min_strength=1.0, max_strength=50.0)
    table = mixtures_table(mixtures, domains)
    write_csv(out / "mixtures.csv", table)
    sweeps, seconds = {}, {}
    for name, steps in (("short", args.short_steps), ("long", args.long_steps)):
        base = out / f"proxy_{name}.yaml"
        base.write_text(yaml.safe_dump(proxy_config(data["prepared"].resolve(), vocab, steps, args.eval_batches),
                                       sort_keys=False))
        t0 = time.perf_counter()
        runs = plan_sweep(str(base), table, out / f"sweep_{name}")
        run_sweep(runs, out / f"sweep_{name}", domains, parallel=0)
        seconds[name] = (time.perf_counter() - t0, sum(run_seconds(r.run_dir) for r in runs))
        sweeps[name] = out / f"sweep_{name}"
    if args.sweep_only:
        print(f"sweeps done in {time.perf_counter() - started:.0f} s")
        return

    targets = {"mean": ",".join(f"metric/{d}_val_loss" for d in domains),
               **{t: f"metric/{t}_val_loss" for t in TARGET_DOMAINS}}
    printed = {}
    os.chdir(ROOT)  # the sweeps are named relative to the repo root in the report
    for t, column in targets.items():
        shown = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in sweeps.values()]
        cli = ["mix", "fidelity", *shown, "--target", column,
               "--top-k", str(args.top_k), "--target-budget", str(args.long_steps * tokens_per_step)]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = mixlm_main(cli)
        printed[t] = (" ".join(["mixlm", *cli]), code, buffer.getvalue())
        print(buffer.getvalue())

    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    lines = [
        "# Proxy fidelity on the demo corpus: the same mixtures at two token budgets",
        "",
        (f"Machine: {MACHINE} (Python {platform.python_version()}). Date: {datetime.date.today().isoformat()}. "
         f"Command: `{command.rstrip()}` (from the repo root; work in `{rel}`; rerunning reads finished runs back)."),
        "",
        (f"Sizes: {args.proxies} mixtures from `sample_mixtures` (token share^0.5 prior over "
         f"{', '.join(domains)}, Dirichlet strengths 1–50, bounded for the long budget), each trained twice "
         f"with benchmarks/demo_sweep.py's proxy (llama 2 layers, d 64, seq 64, batch 16): `short` = "
         f"{args.short_steps} steps ({args.short_steps * tokens_per_step:,} tokens), `long` = {args.long_steps} "
         f"steps ({args.long_steps * tokens_per_step:,} tokens, the target run's budget). Every run is scored on "
         f"{args.eval_batches} batches x 16 x 64 held-out tokens per domain. Train tokens per domain: "
         + ", ".join(f"{d} {int(t):,}" for d, t in zip(prior.domains, prior.tokens_D)) + ". "
         "Training time summed over each sweep's runs (config.yaml to metrics.jsonl, compile included; on a "
         f"shared host): short {seconds['short'][1]:.0f} s, long {seconds['long'][1]:.0f} s; this invocation spent "
         f"{seconds['short'][0]:.0f} s / {seconds['long'][0]:.0f} s on them (finished runs are read back)."),
        "",
        ("This is a smaller version of demo_sweep.md (96 x 150 steps) / demo_sweep_budget.md (64 x 450 steps), "
         "whose finding was that 1/3-budget proxies optimise to mixtures that lose at 3x the tokens. "
         "Targets as there: `mean` of the four training domains' losses, and the eval-only domains "
         f"{', '.join(TARGET_DOMAINS)}."),
        "",
    ]
    for t, (cli, code, text) in printed.items():
        lines += [f"## Target `{t}`", "", f"`{cli}` (exit {code}) printed:", "", "```", text.rstrip(), "```", ""]
    lines.append(f"This invocation took {time.perf_counter() - started:.0f} s.")
    report = "\n".join(lines) + "\n"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
