"""RegMix on the demo corpus, end to end on CPU: sample mixtures → a sweep of tiny proxies → fit on 40,
score on the held-out 8 → optimise → train the optimised, natural (token-share) and uniform mixtures at
a larger size and compare their per-domain validation losses.

    .venv/bin/python benchmarks/demo_sweep.py                    # ~17 min on 2 shared CPU cores
    .venv/bin/python benchmarks/demo_sweep.py --proxies 16 --held-out 4 --seeds 1 \
        --out runs/demo_sweep_quick --report runs/demo_sweep_quick/report.md      # a quick look

Work goes to runs/demo_sweep/ (git-ignored): the prepared corpus, mixtures.csv, sweep/ (one folder per
proxy and results.csv), fit/, optimized.yaml and final/ (the larger runs). Rerunning resumes: finished
proxies and finished large runs are read back, not retrained. Prints Markdown and writes it to
benchmarks/results/demo_sweep.md, with demo_sweep_{scatter,mixtures,loss_vs_weight}.png beside it.

The target is the unweighted mean of the four domains' validation losses: a model meant to serve every
domain equally. The token-weighted total (`val_loss`) would instead reward whatever domain holds the
most validation tokens (records), and one domain's loss alone is optimised trivially by training on it.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MACHINE = "2-core x86-64 CPU (AVX-512), 24 GiB, no GPU"


def proxy_config(prepared: Path, vocab: int, steps: int) -> dict:
    """The proxy: a 2-layer, d-64 llama at seq 64, batch 16 (~1k tokens a step), no checkpoints."""
    return {
        "model": {"family": "llama", "num_layers": 2, "d_model": 64, "num_heads": 4, "num_kv_heads": 4,
                  "mlp_dim": 172, "vocab_size": vocab, "max_seq_len": 64, "vocab_multiple": 8,
                  "compute_dtype": "float32"},
        "data": {"source": "prepared", "prepared_dir": str(prepared), "seq_len": 64,
                 "mixture": {"arithmetic": 1.0}},
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.1, "clip_norm": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 10, "min_lr": 3.0e-4},
        "train": {"steps": steps, "global_batch_size": 16, "seed": 0},
        "eval": {"batches": 4},  # 4 x 16 x 64 held-out tokens per domain, the same set for every run
        "logging": {"every": 50, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }


# The larger size: 2x the layers and width (~8x the non-embedding parameters), 3x the steps.
LARGE = {"model.num_layers": 4, "model.d_model": 128, "model.mlp_dim": 352}


def prepare(out: Path) -> dict:
    from mixlm.data.demo_corpus import prepare_demo_data

    data = out / "data"
    if (data / "tokenizer").is_dir() and len(list((data / "prepared").glob("*/manifest.json"))) == 4:
        return {"tokenizer": data / "tokenizer", "prepared": data / "prepared"}
    return prepare_demo_data(data, docs_per_domain=2000, vocab_size=1024, seed=0)


def train_or_read(base: Path, run_dir: Path, weights: dict[str, float], overrides: list[str], steps: int) -> dict:
    """The final per-domain validation losses of one run, training it unless it already finished."""
    from mixlm.config import load_config
    from mixlm.mixing.sweep import final_losses
    from mixlm.train import train

    done = final_losses(run_dir, steps)
    if done is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "mixture.yaml").write_text(yaml.safe_dump(weights, sort_keys=False))  # zeros stay: eval them too
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cfg = load_config(str(base), [*overrides, f"data.mixture={run_dir / 'mixture.yaml'}",
                                  f"train.output_dir={run_dir}", f"train.steps={steps}"])
    return {k: v for k, v in train(cfg, log_fn=lambda _: None).eval.items() if k.startswith("val_loss")}


def run_seconds(run_dir: Path) -> float:
    """Wall time of a finished run: config.yaml is written before its first step (so compilation is
    included) and metrics.jsonl last touched by the final eval."""
    return (run_dir / "metrics.jsonl").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_sweep")
    parser.add_argument("--proxies", type=int, default=48)
    parser.add_argument("--held-out", type=int, default=8, help="the last N proxies are kept out of the fit")
    parser.add_argument("--proxy-steps", type=int, default=150)
    parser.add_argument("--large-steps", type=int, default=450)
    parser.add_argument("--seeds", type=int, default=4, help="seeds (init + data order) of each large run")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100_000, help="simulated mixtures for optimize")
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "demo_sweep.md")
    args = parser.parse_args()
    command = "nice -n 10 .venv/bin/python benchmarks/demo_sweep.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    command = command.rstrip()
    started = time.perf_counter()

    import jax

    # Every proxy has the same shapes: compile once, then read the executable back from disk.
    jax.config.update("jax_compilation_cache_dir", str(args.out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from mixlm.data.prepare import load_tokenizer_spec
    from mixlm.mixing import (
        fit,
        load_prior,
        loss_column,
        mixtures_table,
        optimize,
        plot_loss_vs_weight,
        plot_mixture,
        plot_predictions,
        read_csv,
        sample_mixtures,
        write_csv,
        write_mixture_yaml,
    )
    from mixlm.mixing.regression import pearson, spearman
    from mixlm.mixing.sweep import done_indices, plan_sweep, run_sweep

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out)
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = out / "proxy.yaml"
    base.write_text(yaml.safe_dump(proxy_config(data["prepared"].resolve(), vocab, args.proxy_steps),
                                   sort_keys=False))
    prior = load_prior(data["prepared"])
    domains = list(prior.domains)
    proxy_tokens = args.proxy_steps * 16 * 64
    large_tokens = args.large_steps * 16 * 64

    # 1. sample: RegMix's sampler around the token prior, bounded for the proxy's token budget
    mixtures = sample_mixtures(prior, args.proxies, seed=0, token_budget=proxy_tokens)
    table = mixtures_table(mixtures, domains)
    if (out / "mixtures.csv").is_file():
        old = read_csv(out / "mixtures.csv")
        if old.columns != table.columns or not np.array_equal(old.values_NxC, table.values_NxC):
            raise SystemExit(f"{out / 'mixtures.csv'} holds other mixtures (other --proxies?): finished runs "
                             "are matched by index, so use another --out or delete that folder")
    write_csv(out / "mixtures.csv", table)

    # 2. sweep: in this process, one proxy after another (resumes: finished runs are skipped)
    runs = plan_sweep(str(base), table, out / "sweep")
    before = len(done_indices(out / "sweep") & {r.index for r in runs})
    run_sweep(runs, out / "sweep", domains, steps=args.proxy_steps, parallel=0)
    trained = len(runs) - before
    sweep_secs = [run_seconds(r.run_dir) for r in runs]
    results = read_csv(out / "sweep" / "results.csv")

    # 3. fit on the first N - held_out proxies, score on the held-out ones
    target = [loss_column(d) for d in domains]
    held = table.index_N[-args.held_out:]
    fit_rows = table.rows(table.index_N[:-args.held_out])
    t0 = time.perf_counter()
    result = fit(fit_rows, results, target, regressors=("lightgbm", "loglinear", "linear"), folds=args.folds)
    fit_s = time.perf_counter() - t0
    actual_H = results.rows(held).select(target).mean(axis=1)
    held_weights = table.rows(held).select(domains)
    held_pred = {k: result.predict(held_weights, k) for k in result.regressors}
    # The optimiser uses the regressor with the best k-fold Spearman on the fitted proxies (never the held-out).
    best_kind = max(result.cv, key=lambda k: np.nan_to_num(result.cv[k].spearman, nan=-2.0))
    result.primary = best_kind

    # 4. optimise for the larger run's token budget
    optimized = optimize(result, prior, n_samples=args.samples, top_k=args.top_k, token_budget=large_tokens)
    write_mixture_yaml(out / "optimized.yaml", optimized,
                       comment=f"demo_sweep: optimize({best_kind}) for the mean domain validation loss")
    candidates = {
        "optimized": optimized,
        "natural": {d: float(s) for d, s in zip(domains, prior.shares_D)},
        "uniform": {d: 1.0 / len(domains) for d in domains},
    }
    predicted = {n: float(result.predict(np.array([[m[d] for d in domains]]))[0]) for n, m in candidates.items()}

    # 5. the three mixtures at the proxy size and at the larger size, every domain evaluated
    sizes = {"proxy": ([], args.proxy_steps, list(range(args.seeds))),
             "large": ([f"{k}={v}" for k, v in LARGE.items()], args.large_steps, list(range(args.seeds)))}
    final: dict[tuple[str, str], list[dict]] = {}
    for size, (overrides, steps, seeds) in sizes.items():
        for name, weights in candidates.items():
            for seed in seeds:
                run_dir = out / "final" / f"{size}_{name}_s{seed}"
                losses = train_or_read(base, run_dir, weights,
                                       [*overrides, f"train.seed={seed}", f"data.seed={seed}"], steps)
                final.setdefault((size, name), []).append(losses)
                print(f"{size} {name} seed {seed}: mean domain loss "
                      f"{np.mean([losses[f'val_loss/{d}'] for d in domains]):.4f}", flush=True)

    # 6. figures
    figure = {k: args.report.with_name(f"{args.report.stem}_{k}.png") for k in ("scatter", "mixtures", "loss_vs_weight")}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    plot_predictions(actual_H, held_pred, figure["scatter"],
                     title=f"{len(held)} held-out proxies: mean domain validation loss")
    plot_mixture(candidates, figure["mixtures"], title="mixtures trained at the larger size")
    plot_loss_vs_weight(results.select(domains), domains,
                        {d: results.select([loss_column(d)])[:, 0] for d in domains},
                        figure["loss_vs_weight"])

    # 7. the report
    def mean_losses(rows: list[dict]) -> tuple[dict[str, float], float, float]:
        per = {d: float(np.mean([r[f"val_loss/{d}"] for r in rows])) for d in domains}
        targets = [np.mean([r[f"val_loss/{d}"] for d in domains]) for r in rows]
        return per, float(np.mean(targets)), float(np.std(targets))

    lines = [
        "# RegMix on the demo corpus: proxy sweep, fit, optimise, train larger",
        "",
        f"Machine: {MACHINE}. Date: {datetime.date.today().isoformat()}. Command: `{command}`",
        f"(from the repo root; work in `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}`).",
        "",
        "Data: the demo corpus (mixlm/data/demo_corpus.py), 2,000 documents per domain, a 1,024-token BPE; "
        "train tokens per domain: " + ", ".join(f"{d} {int(t):,}" for d, t in zip(domains, prior.tokens_D)) + ".",
        "",
        (f"Proxies: llama 2 layers, d 64, 4 heads, SwiGLU 172, seq 64, batch 16, {args.proxy_steps} steps "
        f"({proxy_tokens:,} tokens), AdamW lr 3e-3 cosine to 3e-4, seed 0 for every sweep proxy. Larger runs: 4 layers, d 128, "
        f"SwiGLU 352, {args.large_steps} steps ({large_tokens:,} tokens, the same for every mixture), "
        f"{args.seeds} seed(s) each (init and data order). Every run is scored on the same held-out set: "
        "4 batches x 16 x 64 tokens of each domain's validation split."),
        "",
        ("**Target**: the unweighted mean of the four domains' validation losses, i.e. a model meant to serve "
        "every domain equally. (The token-weighted total would reward the domain with most validation tokens, "
        "records; one domain's own loss is optimised trivially by training only on it.)"),
        "",
        f"## Sweep: {len(runs)} proxies",
        "",
        (f"{len(runs)} mixtures from `sample_mixtures` (RegMix's defaults: prior = token share^0.5, strengths "
         "0.1–5, max usage 15 x tokens / the proxy's budget), trained in one process with "
         "`run_sweep(parallel=0)` and a persistent compilation cache. Seconds per proxy (compile included; "
         f"from each run folder's config.yaml → metrics.jsonl times): median {np.median(sweep_secs):.1f}, "
         f"max {max(sweep_secs):.1f}, {sum(sweep_secs):.0f} s in all; {trained} trained by this invocation "
         "(the rest read back). The 2 cores were shared with other jobs (load average 3–7), so these times "
         "are upper bounds."),
        "",
        f"## Fit on {len(fit_rows)}, score on the {len(held)} held out (proxies {held[0]}–{held[-1]})",
        "",
        (f"| regressor | Spearman ({args.folds}-fold on the {len(fit_rows)}) | Pearson ({args.folds}-fold) | "
        f"Spearman (held-out {len(held)}) | Pearson (held-out {len(held)}) |"),
        "|---|---|---|---|---|",
    ]
    for kind, score in result.cv.items():
        lines.append(
            f"| {kind}{' (used)' if kind == best_kind else ''} | {score.spearman:.3f} ± {score.spearman_std:.3f} | "
            f"{score.pearson:.3f} ± {score.pearson_std:.3f} | {spearman(actual_H, held_pred[kind]):.3f} | "
            f"{pearson(actual_H, held_pred[kind]):.3f} |")
    lines += [
        "",
        (f"Fit time (all regressors, CV and final): {fit_s:.1f} s. LightGBM uses RegMix's settings (gbdt, lr 1e-2, "
        f"up to 1000 rounds, early stopping on 10% of the training rows), except that below 200 runs mixlm scales "
        "min_data_in_leaf down from 20 (else one split per tree: a constant model). `optimize` uses the "
        f"regressor with the best k-fold Spearman on the {len(fit_rows)} (chosen without looking at the held-out "
        f"{len(held)})."),
        "",
        f"## Optimised mixture ({args.samples:,} simulated mixtures, mean of the top {args.top_k})",
        "",
        "| mixture | " + " | ".join(domains) + f" | predicted target ({best_kind}) |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    for name, m in candidates.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[d]:.3f}" for d in domains) + f" | {predicted[name]:.4f} |")
    lines += [
        "",
        "## Validation loss per domain (lower is better)",
        "",
        "| size | mixture | " + " | ".join(domains) + " | **target (mean)** |",
        "|---|---|" + "---|" * (len(domains) + 1),
    ]
    winners, paired = {}, {}
    for size, (_, _, seeds) in sizes.items():
        scores = {name: mean_losses(final[(size, name)]) for name in candidates}
        winners[size] = min(scores, key=lambda n: scores[n][1])
        for name, (per, target_mean, target_std) in scores.items():
            spread = f" ± {target_std:.4f}" if len(seeds) > 1 else ""
            best = "**" if name == winners[size] else ""
            lines.append(f"| {size} | {name} | " + " | ".join(f"{per[d]:.4f}" for d in domains)
                         + f" | {best}{target_mean:.4f}{spread}{best} |")
        # Seed s of every mixture shares its init and data-order seed: compare them pairwise.
        opt_S = np.array([np.mean([r[f"val_loss/{d}"] for d in domains]) for r in final[(size, "optimized")]])
        for name in ("natural", "uniform"):
            other_S = np.array([np.mean([r[f"val_loss/{d}"] for d in domains]) for r in final[(size, name)]])
            paired[(size, name)] = other_S - opt_S
    n_seeds = args.seeds
    lines += [
        "",
        f"{n_seeds} seed(s) per mixture and size (seed s sets the init and the data order, the same for every "
        "mixture); the target is the mean over the seeds"
        + (" ± its standard deviation over the seeds" if n_seeds > 1 else "")
        + ". Seconds per run (median): " + ", ".join(
            f"{size} {np.median([run_seconds(out / 'final' / f'{size}_{n}_s{k}') for n in candidates for k in seeds]):.0f}"
            for size, (_, _, seeds) in sizes.items()) + ". "
        f"Lowest mean target: proxy size **{winners['proxy']}**, larger size **{winners['large']}**.",
        "",
        "Paired by seed, target(other) − target(optimized) (positive: the optimised mixture is better):",
        "",
        "| size | vs | mean diff | std over seeds | optimized better in |",
        "|---|---|---|---|---|",
    ]
    for (size, name), diff_S in paired.items():
        lines.append(f"| {size} | {name} | {diff_S.mean():+.4f} | {diff_S.std(ddof=1) if len(diff_S) > 1 else 0:.4f} | "
                     f"{int((diff_S > 0).sum())} of {len(diff_S)} seeds |")
    def verdict(diff_S: np.ndarray) -> str:
        noise = 2 * diff_S.std(ddof=1) / np.sqrt(len(diff_S)) if len(diff_S) > 1 else 0.0
        if abs(diff_S.mean()) <= noise:
            return f"a tie within seed noise ({diff_S.mean():+.4f}, 2 standard errors {noise:.4f})"
        return f"{'better' if diff_S.mean() > 0 else 'worse'} by {abs(diff_S.mean()):.4f} (2 s.e. {noise:.4f})"

    lines += ["", "**Outcome** on the target, the optimised mixture against: " + "; ".join(
        f"{name} at {size} size: {verdict(diff_S)}" for (size, name), diff_S in paired.items()) + "."]
    measured = mean_losses(final[("proxy", "optimized")])[1]
    total_train_s = sum(sweep_secs) + sum(run_seconds(p) for p in (out / "final").iterdir()
                                          if (p / "metrics.jsonl").is_file())
    sweep_targets = results.select(target).mean(axis=1)
    lines += [
        "",
        (f"Calibration: the {best_kind} fit predicts {predicted['optimized']:.4f} for the optimised mixture; its "
        f"proxy-size runs measured {measured:.4f}. The best of the {len(runs)} sweep proxies scored "
        f"{sweep_targets.min():.4f} and the worst {sweep_targets.max():.4f}: "
        "the fit is dominated by corner mixtures (a domain near weight 0 costs a lot) and extrapolates in the "
        "flat middle of the simplex, where every mixture that gives each domain a fair share scores alike."),
        "",
        (f"Figures: `{figure['scatter'].name}` (held-out proxies, predicted vs actual target), "
        f"`{figure['mixtures'].name}` (the three mixtures), `{figure['loss_vs_weight'].name}` (each domain's "
        "loss against its weight over the proxies)."),
        "",
        (f"Training time summed over every run (sweep and comparison): {total_train_s / 60:.1f} min; this "
        f"invocation took {time.perf_counter() - started:.0f} s (finished runs are read back, not retrained)."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
