"""RegMix's regression on RegMix's own proxy runs: k-fold Spearman and Pearson for a target loss, for
LightGBM and the linear baselines, then the mixture the fit optimises to, against RegMix's published one.

    .venv/bin/python benchmarks/regmix_fit.py            # ../shared/data/regmix, Pile-CC loss, 5 folds

Prints Markdown and writes it to benchmarks/results/regmix_fit.md. Data: 512 1M-parameter proxies
(sail-sg/regmix data/train_*_1m.csv). RegMix reported Spearman ≈ 0.99 on its own held-out runs,
which are not in ../shared; here every score is on folds held out from these 512.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixlm.mixing import fit, load_prior, optimize, read_csv, read_mixture_yaml
from mixlm.mixing.stats import spearman

PUBLISHED = ("regmix", "human", "doremi", "pile_cc_only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "regmix")
    parser.add_argument("--target", default="metric/the_pile_pile_cc_val_loss")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimize-seeds", type=int, default=5, help="optimize repeats, to show its spread")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "regmix_fit.md")
    args = parser.parse_args()

    mixtures = read_csv(args.data / "train_mixture_1m.csv")
    results = read_csv(args.data / "train_pile_loss_1m.csv")
    start = time.perf_counter()
    result = fit(mixtures, results, args.target, folds=args.folds, seed=args.seed)
    fit_s = time.perf_counter() - start

    lines = [
        "# RegMix regression on RegMix's 512 1M-parameter proxy runs",
        "",
        (
            f"Machine: 2-core x86-64 CPU, no GPU (Python {platform.python_version()}). "
            f"Reproduce: `.venv/bin/python benchmarks/regmix_fit.py` (data: ../shared/data/regmix)."
        ),
        "",
        (
            f"Target `{result.target_label}`, {len(result.actual_N)} runs, {len(result.domains)} domain weights as "
            f"features, {args.folds}-fold cross-validation (split seed {args.seed}); each score is on runs held out "
            "from the fit. Mean ± std over the folds; 'pooled' ranks all out-of-fold predictions together. "
            f"Fitting every regressor on all folds and once on all runs took {fit_s:.1f} s."
        ),
        "",
        f"| regressor | Spearman ({args.folds}-fold) | Pearson ({args.folds}-fold) | Spearman (pooled) |",
        "|---|---|---|---|",
    ]
    for kind, score in result.cv.items():
        pooled = spearman(result.actual_N, result.oof_N[kind])
        lines.append(
            f"| {kind} | {score.spearman:.4f} ± {score.spearman_std:.4f} | "
            f"{score.pearson:.4f} ± {score.pearson_std:.4f} | {pooled:.4f} |"
        )
    lines += [
        "",
        (
            "RegMix reported ≈ 0.99 (LightGBM) on a separate set of held-out proxy runs, with early stopping on "
            "that same set; here early stopping uses a 10% split of the training folds only."
        ),
    ]

    prior = load_prior(args.data / "pile_token_prior.yaml").reorder(result.domains)
    start = time.perf_counter()
    runs = [optimize(result, prior, seed=s) for s in range(args.optimize_seeds)]
    optimize_s = (time.perf_counter() - start) / len(runs)
    ours = {d: float(np.mean([r[d] for r in runs])) for d in result.domains}
    spread = {d: float(np.std([r[d] for r in runs])) for d in result.domains}
    published = {
        name: read_mixture_yaml(args.data / f"mixture_1b_{name}.yaml")
        for name in PUBLISHED
        if (args.data / f"mixture_1b_{name}.yaml").is_file()
    }
    lines += [
        "",
        "## Optimised mixture for the target",
        "",
        (
            f"`optimize` with RegMix's defaults (prior = token shares ** 0.5, strengths 0.1–5, 100,000 simulated "
            f"mixtures, mean of the 128 lowest by LightGBM, max usage 15 × share), {len(runs)} seeds "
            f"({optimize_s:.1f} s each); 'ours' is the seed 0 mixture, ± the std over the seeds. 'regmix' is the "
            "mixture RegMix trained its 1B model on (mixture_1b_regmix.yaml)."
        ),
        "",
        "| domain | prior share | ours (seed 0) | ± over seeds | regmix | human |",
        "|---|---|---|---|---|---|",
    ]
    for d in sorted(result.domains, key=lambda d: -runs[0][d]):
        row = [
            f"{dict(zip(prior.domains, prior.shares_D))[d]:.4f}",
            f"{runs[0][d]:.4f}",
            f"{spread[d]:.4f}",
            *(f"{published[n].get(d, 0.0):.4f}" if n in published else "–" for n in ("regmix", "human")),
        ]
        lines.append(f"| {d.removeprefix('train_the_pile_')} | " + " | ".join(row) + " |")

    compared = {"ours (seed 0)": runs[0], "ours (mean of seeds)": ours, **published}
    predicted = {
        name: float(result.predict(np.array([[m.get(d, 0.0) for d in result.domains]]))[0])
        for name, m in compared.items()
    }
    regmix = published.get("regmix")
    lines += [
        "",
        (
            "Predicted target (LightGBM fit above; a 1M-proxy loss, so a ranking, not a 1B loss) and L1 distance "
            "to RegMix's mixture:"
        ),
        "",
        "| mixture | predicted loss | L1 to regmix |",
        "|---|---|---|",
    ]
    for name, m in compared.items():
        l1 = sum(abs(m.get(d, 0.0) - regmix.get(d, 0.0)) for d in result.domains) if regmix else float("nan")
        lines.append(f"| {name} | {predicted[name]:.4f} | {l1:.3f} |")

    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
