"""RegMix on the demo corpus, end to end on CPU: sample mixtures → a sweep of tiny proxies → fit on all but
the last 16, score on those → optimise for each target → train the optimised, natural (token-share) and
uniform mixtures at the proxy size and at a larger size, and compare their validation losses.

    nice -n 10 .venv/bin/python benchmarks/demo_sweep.py           # A: ~26 min on 2 CPU cores
    nice -n 10 .venv/bin/python benchmarks/demo_sweep.py --proxy-steps 450 --proxies 64 --held-out 12 \
        --out runs/demo_sweep_budget --report benchmarks/results/demo_sweep_budget.md   # B: proxies on the
                                                                  # larger run's token budget, ~35 min
    .venv/bin/python benchmarks/demo_sweep.py --proxies 24 --held-out 4 --seeds 1 \
        --out runs/demo_sweep_quick --report runs/demo_sweep_quick/report.md      # a quick look

Work goes to runs/demo_sweep/ (git-ignored): the prepared corpus, mixtures.csv, sweep/ (one folder per
proxy and results.csv), opt_<target>.yaml and final/ (the comparison runs). Rerunning resumes: finished
proxies and finished comparison runs are read back, not retrained. Prints Markdown and writes it to
benchmarks/results/demo_sweep.md, with the figures beside it.

How well the cheap proxies' ranking carries to the larger budget (Spearman, top-k overlap, repetition):
benchmarks/proxy_fidelity.py runs `mixlm mix fidelity` over the same mixtures at two budgets.

Three targets, searched for separately from the same sweep:
  office, homework
          the validation loss of an eval-only domain (`eval.domains`) that no run trains on: fresh documents
          of the training kinds in unequal parts (office: records 1/2, sums 3/10, prose 1/5; homework: sums
          1/2, prose 1/2; no code): pick the training mixture for a target known only by a validation set
          (RegMix's Pile-CC target is itself a training domain; these are not).
  mean    the unweighted mean of the four training domains' validation losses. The token-weighted total
          (`val_loss`) would reward whatever domain holds most validation tokens (records), and one
          domain's own loss is optimised trivially by training on it alone.
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
# Evaluated by every run, trained on by none (mixlm.data.demo_corpus.TARGET_GENERATORS).
TARGET_DOMAINS = ("office", "homework")
REGRESSORS = ("lightgbm", "loglinear", "linear")


def proxy_config(prepared: Path, vocab: int, steps: int, eval_batches: int) -> dict:
    """The proxy: a 2-layer, d-64 llama at seq 64, batch 16 (~1k tokens a step), no checkpoints."""
    return {
        "model": {"family": "llama", "num_layers": 2, "d_model": 64, "num_heads": 4, "num_kv_heads": 4,
                  "mlp_dim": 172, "vocab_size": vocab, "max_seq_len": 64, "vocab_multiple": 8,
                  "compute_dtype": "float32"},
        # first_fit: rows never cross documents, so a target that mixes kinds of document is scored on each
        # document alone (concat rows would score the jump from one kind to the next, a seed-dependent guess).
        "data": {"source": "prepared", "prepared_dir": str(prepared), "seq_len": 64, "packing": "first_fit",
                 "mixture": {"arithmetic": 1.0}},
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.1, "clip_norm": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 10, "min_lr": 3.0e-4},
        "train": {"steps": steps, "global_batch_size": 16, "seed": 0},
        "eval": {"batches": eval_batches, "domains": list(TARGET_DOMAINS)},  # x 16 x 64 held-out tokens per domain, the same for every run
        "logging": {"every": 50, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }


# The larger size: 2x the layers and width (~8x the non-embedding parameters), 3x the steps.
LARGE = {"model.num_layers": 4, "model.d_model": 128, "model.mlp_dim": 352}


def prepare(out: Path) -> dict:
    from mixlm.data.demo_corpus import prepare_demo_data

    data = out / "data"
    if (data / "tokenizer").is_dir() and len(list((data / "prepared").glob("*/manifest.json"))) == 4 + len(TARGET_DOMAINS):
        return {"tokenizer": data / "tokenizer", "prepared": data / "prepared"}
    return prepare_demo_data(data, docs_per_domain=2000, vocab_size=1024, seed=0, target_domains=TARGET_DOMAINS)


def train_or_read(base: Path, run_dir: Path, weights: dict[str, float], overrides: list[str], steps: int) -> dict:
    """The final per-domain validation losses of one run, training it unless it already finished."""
    import json

    from mixlm.proxies import PROXY_CONFIG, plan_proxy, run_proxies
    from mixlm.run_config import load_run_config

    written = run_dir / PROXY_CONFIG
    if written.is_file():
        before = yaml.safe_load(written.read_text())["data"]["mixture"]
        if set(before) != set(weights) or any(abs(before[d] - weights[d]) > 1e-9 for d in weights):
            raise SystemExit(f"{run_dir} was trained on another mixture ({before}, now {weights}): a new fit "
                             "or sampler setting changed it; use another --out or delete that run folder")
    cfg = load_run_config(str(base), [*overrides, f"data.mixture={json.dumps(weights)}",  # zeros stay: eval them too
                                      f"train.output_dir={run_dir}", f"train.steps={steps}"])
    run = plan_proxy(0, weights, cfg)
    outcome = run_proxies([run], parallel=0, log=lambda _: None)
    if outcome.failed:
        raise SystemExit(f"{run_dir}: {outcome.failed[0]}")
    return {k: v for k, v in run.result()["eval"].items() if k.startswith("val_loss")}


def run_seconds(run_dir: Path) -> float:
    """Wall time of a finished run: config.yaml is written before its first step (so compilation is
    included) and metrics.jsonl last touched by the final eval."""
    return (run_dir / "metrics.jsonl").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_sweep")
    parser.add_argument("--proxies", type=int, default=96)
    parser.add_argument("--held-out", type=int, default=16, help="the last N proxies are kept out of the fit")
    parser.add_argument("--proxy-steps", type=int, default=150)
    parser.add_argument("--large-steps", type=int, default=450)
    parser.add_argument("--seeds", type=int, default=4, help="seeds (init + data order) of each large run")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100_000, help="simulated mixtures for optimize")
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--min-strength", type=float, default=1.0,
                        help="Dirichlet strength range of sample and optimize (RegMix's: 0.1-5)")
    parser.add_argument("--max-strength", type=float, default=50.0)
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 16 x 64 per domain")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
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

    from mixlm.data.tokenizer import load_tokenizer_spec
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
    from mixlm.mixing.stats import pearson, spearman
    from mixlm.sweep import plan_sweep, run_sweep

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out)
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    base = out / "proxy.yaml"
    base.write_text(yaml.safe_dump(proxy_config(data["prepared"].resolve(), vocab, args.proxy_steps,
                                                   args.eval_batches),
                                   sort_keys=False))
    from mixlm.data.demo_corpus import GENERATORS

    prior = load_prior(data["prepared"], domains=sorted(GENERATORS))  # the target domain is never mixed in
    domains = list(prior.domains)
    proxy_tokens = args.proxy_steps * 16 * 64
    large_tokens = args.large_steps * 16 * 64

    # 1. sample: RegMix's sampler around the token prior, bounded for the proxy's token budget
    strengths = {"min_strength": args.min_strength, "max_strength": args.max_strength}
    strengths_are_regmix = (args.min_strength, args.max_strength) == (0.1, 5.0)
    mixtures = sample_mixtures(prior, args.proxies, seed=0, token_budget=proxy_tokens, **strengths)
    table = mixtures_table(mixtures, domains)
    if (out / "mixtures.csv").is_file():
        old = read_csv(out / "mixtures.csv")
        if old.columns != table.columns or not np.array_equal(old.values_NxC, table.values_NxC):
            raise SystemExit(f"{out / 'mixtures.csv'} holds other mixtures (other --proxies?): finished runs "
                             "are matched by index, so use another --out or delete that folder")
    write_csv(out / "mixtures.csv", table)

    # 2. sweep: in this process, one proxy after another (resumes: finished runs are skipped)
    runs = plan_sweep(str(base), table, out / "sweep")
    before = sum(r.result() is not None for r in runs)
    run_sweep(runs, out / "sweep", domains, parallel=0)
    trained = len(runs) - before
    sweep_secs = [run_seconds(r.run_dir) for r in runs]
    results = read_csv(out / "sweep" / "results.csv")

    if args.sweep_only:
        print(f"sweep done: {len(runs)} proxies in {out / 'sweep' / 'results.csv'}")
        return

    # 3. per target: fit on the first N - held_out proxies, score on the held-out ones, optimise
    # target -> the domains whose validation losses it averages
    target_domains = {"mean": domains, **{t: [t] for t in TARGET_DOMAINS}}
    targets = {t: [loss_column(d) for d in ds] for t, ds in target_domains.items()}
    held = table.index_N[-args.held_out:]
    fit_rows = table.rows(table.index_N[:-args.held_out])
    held_weights = table.rows(held).select(domains)
    fits, held_scores, fit_secs, candidates = {}, {}, {}, {}
    for t, columns in targets.items():
        t0 = time.perf_counter()
        result = fit(fit_rows, results, columns, regressors=REGRESSORS, folds=args.folds)
        fit_secs[t] = time.perf_counter() - t0
        actual_H = results.rows(held).select(columns).mean(axis=1)
        preds = {k: result.predict(held_weights, k) for k in result.regressors}
        held_scores[t] = (actual_H, preds)
        # fit() has chosen the regressor with the best per-fold Spearman on the fitted proxies (never the
        # held-out), skipping any whose score is undefined in most folds (mixlm.mixing.fitting.choose_model).
        fits[t] = result
        # 4. optimise for the larger run's token budget
        candidates[f"opt_{t}"] = optimize(result, prior, n_samples=args.samples, top_k=args.top_k,
                                          token_budget=large_tokens, **strengths)
        write_mixture_yaml(out / f"opt_{t}.yaml", candidates[f"opt_{t}"],
                           comment=f"demo_sweep: optimize({result.primary}) for target {t}")
    candidates["natural"] = {d: float(s) for d, s in zip(domains, prior.shares_D)}
    candidates["uniform"] = {d: 1.0 / len(domains) for d in domains}
    predicted = {(t, n): float(fits[t].predict(np.array([[m[d] for d in domains]]))[0])
                 for t in targets for n, m in candidates.items()}

    # 5. every mixture at the proxy size and at the larger size, every domain (and the target) evaluated
    # The larger model twice: with the proxies' tokens (only the model grows) and with 3x the tokens.
    large = [f"{k}={v}" for k, v in LARGE.items()]
    sizes = {"proxy": ([], args.proxy_steps, list(range(args.seeds))),
             "large-1x": (large, args.proxy_steps, list(range(args.seeds))),
             "large": (large, args.large_steps, list(range(args.seeds)))}
    if args.proxy_steps == args.large_steps:  # proxies already at the large run's token budget
        del sizes["large-1x"]
    final: dict[tuple[str, str], list[dict]] = {}

    def target_of(losses: dict, t: str) -> float:
        return float(np.mean([losses[f"val_loss/{d}"] for d in target_domains[t]]))

    for size, (overrides, steps, seeds) in sizes.items():
        for name, weights in candidates.items():
            for seed in seeds:
                run_dir = out / "final" / f"{size}_{name}_s{seed}"
                losses = train_or_read(base, run_dir, weights,
                                       [*overrides, f"train.seed={seed}", f"data.seed={seed}"], steps)
                final.setdefault((size, name), []).append(losses)
                print(f"{size} {name} seed {seed}: " + ", ".join(f"{t} {target_of(losses, t):.4f}" for t in targets),
                      flush=True)

    # 6. figures
    figure = {k: args.report.with_name(f"{args.report.stem}_{k}.png")
              for k in (*(f"scatter_{t}" for t in targets), "mixtures", "loss_vs_weight")}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    for t in targets:
        actual_H, preds = held_scores[t]
        plot_predictions(actual_H, preds, figure[f"scatter_{t}"], title=f"{len(held)} held-out proxies: target {t}")
    plot_mixture(candidates, figure["mixtures"], title="the mixtures compared at every size")
    plot_loss_vs_weight(results.select(domains), domains,
                        {d: results.select([loss_column(d)])[:, 0] for d in domains},
                        figure["loss_vs_weight"])

    # 7. the report
    all_domains = [*domains, *TARGET_DOMAINS]
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    lines = [
        "# RegMix on the demo corpus: proxy sweep, fit, optimise, train larger",
        "",
        f"Machine: {MACHINE}. Date: {datetime.date.today().isoformat()}. Command: `{command}`",
        f"(from the repo root; work in `{rel}`; rerunning reads finished runs back).",
        "",
        "Data: the demo corpus (mixlm/data/demo_corpus.py), 2,000 documents per domain, a 1,024-token BPE trained "
        "on the four training domains; train tokens per domain: "
        + ", ".join(f"{d} {int(t):,}" for d, t in zip(domains, prior.tokens_D)) + ".",
        "",
        (f"Proxies: llama 2 layers, d 64, 4 heads, SwiGLU 172, seq 64, batch 16, {args.proxy_steps} steps "
         f"({proxy_tokens:,} tokens), AdamW lr 3e-3 cosine to 3e-4, seed 0 for every sweep proxy. Larger runs: "
         f"4 layers, d 128, SwiGLU 352 (8x the non-embedding parameters), trained "
         + (f"twice: `large-1x` for the proxies' {args.proxy_steps} steps and `large` for "
            if "large-1x" in sizes else "for ")
         + f"{args.large_steps} steps ({large_tokens:,} tokens); "
         f"{args.seeds} seed(s) of every mixture at every size (init and data order). Every run is scored on the same held-out set: "
         f"{args.eval_batches} batches x 16 x 64 tokens of each domain's validation split."),
        "",
        "**Targets** (lower is better), each searched for separately with the same sweep:",
        "",
        ("- `office` and `homework`: the validation loss of a domain **no run trains on** (`eval.domains`), made of "
         "fresh documents of the training kinds in unequal parts (`mixlm/data/demo_corpus.py`): office = records "
         "sheets 1/2, pages of sums 3/10, prose 1/5 (by documents; records are ~70% of its tokens); homework = "
         "sums 1/2, prose 1/2. No code in either. This is choosing the training mixture for a target known only "
         "by a validation set. (RegMix's target, Pile-CC, is one of its training domains; these are none of "
         "them, so no corner of the simplex is trivially best.)"),
        ("- `mean`: the unweighted mean of the four training domains' validation losses, a model meant to serve "
         "every domain equally. The demo domains barely transfer to each other, so this target is nearly "
         "separable and its optimum sits close to the uniform mixture."),
        "",
        f"## Sweep: {len(runs)} proxies",
        "",
        (f"{len(runs)} mixtures from `sample_mixtures` (prior = token share^0.5 over the training domains, Dirichlet "
         f"strengths {args.min_strength:g}–{args.max_strength:g}"
         f"{' as RegMix' if strengths_are_regmix else ' (RegMix: 0.1–5, which puts most of 4 domains in corners)'}"
         ", max usage 15 x tokens / the proxy's budget; `optimize` draws from the same), trained in one process "
         "with `run_sweep(parallel=0)` and a persistent compilation cache. Seconds per proxy (compile included; "
         f"from each run folder's config.yaml → metrics.jsonl times): median {np.median(sweep_secs):.1f}, "
         f"max {max(sweep_secs):.1f}, {sum(sweep_secs):.0f} s in all; {trained} trained by this invocation "
         "(the rest read back)."),
        "",
        f"## Fit on {len(fit_rows)}, score on the {len(held)} held out (proxies {held[0]}–{held[-1]})",
        "",
        (f"| target | regressor | Spearman ({args.folds}-fold on the {len(fit_rows)}) | Pearson ({args.folds}-fold) | "
         f"Spearman (held-out {len(held)}) | Pearson (held-out {len(held)}) |"),
        "|---|---|---|---|---|---|",
    ]
    for t, result in fits.items():
        actual_H, preds = held_scores[t]
        for kind, score in result.cv.items():
            lines.append(
                f"| {t} | {kind}{' (used)' if kind == result.primary else ''} | {score.spearman:.3f} ± "
                f"{score.spearman_std:.3f} | {score.pearson:.3f} ± {score.pearson_std:.3f} | "
                f"{spearman(actual_H, preds[kind]):.3f} | {pearson(actual_H, preds[kind]):.3f} |")
    lines += [
        "",
        ("Fit time (all regressors, CV and final): " + ", ".join(f"{t} {s:.1f} s" for t, s in fit_secs.items())
         + ". LightGBM uses RegMix's settings (gbdt, lr 1e-2, up to 1000 rounds, early stopping on 10% of the "
         "training rows), except that below 200 runs mixlm scales min_data_in_leaf down from 20 (else one split "
         "per tree: a constant model). `optimize` uses, per target, the regressor with the best k-fold Spearman "
         f"on the {len(fit_rows)} (chosen without looking at the held-out {len(held)})."),
        "",
        f"## Mixtures ({args.samples:,} simulated mixtures, mean of the top {args.top_k})",
        "",
        "| mixture | " + " | ".join(domains) + " | " + " | ".join(f"predicted {t} ({fits[t].primary})" for t in targets) + " |",
        "|---|" + "---|" * (len(domains) + len(targets)),
    ]
    for name, m in candidates.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[d]:.3f}" for d in domains) + " | "
                     + " | ".join(f"{predicted[(t, name)]:.4f}" for t in targets) + " |")
    lines += [
        "",
        "## Validation loss per domain (lower is better; mean over the seeds, ± the standard deviation over seeds)",
        "",
        "| size | mixture | " + " | ".join(all_domains) + " | mean (of the 4 training domains) |",
        "|---|---|" + "---|" * (len(all_domains) + 1),
    ]
    winners, paired = {}, {}
    for size, (_, _, seeds) in sizes.items():
        for t in targets:
            winners[(size, t)] = min(candidates, key=lambda n: np.mean([target_of(r, t) for r in final[(size, n)]]))
        for name in candidates:
            rows = final[(size, name)]
            cells = []
            for d in all_domains:
                v = [r[f"val_loss/{d}"] for r in rows]
                star = "**" if d in TARGET_DOMAINS and winners[(size, d)] == name else ""
                cells.append(f"{star}{np.mean(v):.4f}{f' ± {np.std(v):.4f}' if d in TARGET_DOMAINS and len(v) > 1 else ''}{star}")
            v = [target_of(r, "mean") for r in rows]
            star = "**" if winners[(size, "mean")] == name else ""
            cells.append(f"{star}{np.mean(v):.4f}{f' ± {np.std(v):.4f}' if len(v) > 1 else ''}{star}")
            lines.append(f"| {size} | {name} | " + " | ".join(cells) + " |")
        # Seed s of every mixture shares its init and data-order seed: compare them pairwise.
        for t in targets:
            opt_S = np.array([target_of(r, t) for r in final[(size, f"opt_{t}")]])
            for name in candidates:
                if name != f"opt_{t}":
                    paired[(t, size, name)] = np.array([target_of(r, t) for r in final[(size, name)]]) - opt_S
    lines += [
        "",
        ("Seed s sets the init and the data order, the same for every mixture. Seconds per run (median): "
         + ", ".join(f"{size} {np.median([run_seconds(out / 'final' / f'{size}_{n}_s{k}') for n in candidates for k in seeds]):.0f}"
                     for size, (_, _, seeds) in sizes.items()) + "."),
        "",
        "Paired by seed, target(other) − target(optimised for that target) (positive: the optimised mixture is better):",
        "",
        "| target | size | vs | mean diff | std over seeds | optimised better in |",
        "|---|---|---|---|---|---|",
    ]
    for (t, size, name), diff_S in paired.items():
        lines.append(f"| {t} | {size} | {name} | {diff_S.mean():+.4f} | "
                     f"{diff_S.std(ddof=1) if len(diff_S) > 1 else 0:.4f} | {int((diff_S > 0).sum())} of {len(diff_S)} seeds |")

    def verdict(diff_S: np.ndarray) -> str:
        if len(diff_S) < 2:
            return f"{'better' if diff_S.mean() > 0 else 'worse'} by {abs(diff_S.mean()):.4f} (one seed: no noise estimate)"
        noise = 2 * diff_S.std(ddof=1) / np.sqrt(len(diff_S))
        if abs(diff_S.mean()) <= noise:
            return f"a tie within seed noise ({diff_S.mean():+.4f}, 2 standard errors {noise:.4f})"
        return f"{'better' if diff_S.mean() > 0 else 'worse'} by {abs(diff_S.mean()):.4f} (2 s.e. {noise:.4f})"

    lines += [""]
    for t in targets:
        lines.append(f"**Outcome, target {t}**: opt_{t} against " + "; ".join(
            f"{name} at {size} size: {verdict(diff_S)}" for (tt, size, name), diff_S in paired.items()
            if tt == t and name in ("natural", "uniform")) + ".")
        lines.append("")
    total_train_s = sum(sweep_secs) + sum(run_seconds(p) for p in (out / "final").iterdir()
                                          if (p / "metrics.jsonl").is_file())
    for t, columns in targets.items():
        sweep_t = results.select(columns).mean(axis=1)
        measured = np.mean([target_of(r, t) for r in final[("proxy", f"opt_{t}")]])
        lines.append(
            f"Calibration, {t}: the {fits[t].primary} fit predicts {predicted[(t, f'opt_{t}')]:.4f} for opt_{t}; its "
            f"proxy-size runs measured {measured:.4f}; the sweep's proxies ranged {sweep_t.min():.4f}–{sweep_t.max():.4f}.")
    lines += [
        "",
        ("Figures: " + ", ".join(f"`{figure['scatter_' + t].name}`" for t in targets) + " (held-out proxies, "
         f"predicted vs actual), `{figure['mixtures'].name}` (the mixtures), `{figure['loss_vs_weight'].name}` "
         "(each domain's loss against its weight over the proxies)."),
        "",
        (f"Training time summed over every run (sweep and comparison): {total_train_s / 60:.1f} min; this "
         f"invocation took {time.perf_counter() - started:.0f} s (finished runs are read back, not retrained)."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.report.write_text(text)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
