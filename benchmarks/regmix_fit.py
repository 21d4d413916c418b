"""The regressor panel on RegMix's own proxy runs: repeated k-fold Spearman and Pearson (mean ± standard
error over the folds) for every regressor, for the Pile-CC loss and for the mean of the 13 domain losses;
then the mixture the chosen fit optimises to, against RegMix's published one, and the same under a KL bound.

    nice -n 10 .venv/bin/python benchmarks/regmix_fit.py        # ../shared/data/regmix, 5-fold x 2
    nice -n 10 .venv/bin/python benchmarks/regmix_fit.py --default-panel   # what `mix fit` costs by default

Prints Markdown and writes it to benchmarks/results/regmix_fit.md (--default-panel: regmix_fit_default.md,
one `fit` call exactly as `mixlm mix fit` makes it with no --regressors, timed per regressor and in all). Data: 512 1M-parameter proxies
(sail-sg/regmix data/train_*_1m.csv). RegMix reported Spearman ≈ 0.99 on its own held-out runs,
which are not in ../shared; here every score is on folds held out from these 512. Nothing is tuned on the
held-out folds: each regressor's settings are fixed in mixlm/mixing/regressors.py, and the stacked model
learns its blend from an inner split of each training fold.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixlm.mixing import fit, load_prior, read_csv, read_mixture_yaml
from mixlm.mixing.fitting import choose_model, cv_table
from mixlm.mixing.optimize import Constraints, propose
from mixlm.mixing.regressors import default_regressors

PUBLISHED = ("regmix", "human", "doremi", "pile_cc_only")
PILE_CC = "metric/the_pile_pile_cc_val_loss"
# Per target: the panel. perdomain:* only differ from their base for the mean of several columns.
PANELS = {
    "pile_cc": ("lightgbm", "linear", "loglinear", "dml", "bimix", "gp", "stacked",
                "stacked:gp+lightgbm+loglinear+bimix"),
    "mean": ("lightgbm", "linear", "loglinear", "dml", "bimix", "gp", "perdomain", "perdomain:lightgbm",
             "perdomain:dml", "stacked"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "regmix")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2,
                        help="shuffles of the k-fold split (--default-panel: fit's default instead)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="pile_cc,mean")
    parser.add_argument("--optimize-seeds", type=int, default=3, help="optimize repeats, to show its spread")
    parser.add_argument("--regressors", default=None, help="comma-separated: this panel for every target")
    parser.add_argument("--max-kl", type=float, default=0.5, help="the KL bound of the constrained example")
    parser.add_argument("--default-panel", action="store_true",
                        help="time `mix fit`'s default panel with its default folds and repeats instead")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/regmix_fit.md (--default-panel: regmix_fit_default.md)")
    args = parser.parse_args()
    if args.out is None:
        name = "regmix_fit_default.md" if args.default_panel else "regmix_fit.md"
        args.out = ROOT / "benchmarks" / "results" / name
    command = "nice -n 10 .venv/bin/python benchmarks/regmix_fit.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    warnings.filterwarnings("ignore", module="sklearn")
    if args.default_panel:
        time_default_panel(args, command)
        return
    started = time.perf_counter()

    mixtures = read_csv(args.data / "train_mixture_1m.csv")
    results = read_csv(args.data / "train_pile_loss_1m.csv")
    columns = {"pile_cc": PILE_CC, "mean": list(results.columns)}
    fits, seconds = {}, {}
    for name in args.targets.split(","):
        seconds[name] = {}
        fits[name] = None
        panel = args.regressors.split(",") if args.regressors else PANELS[name]
        for kind in panel:  # one regressor at a time, to time each
            t0 = time.perf_counter()
            one = fit(mixtures, results, columns[name], regressors=(kind,), folds=args.folds, seed=args.seed,
                      repeats=args.repeats)
            seconds[name][kind] = time.perf_counter() - t0
            print(f"{name} {kind}: Spearman {one.cv[kind].spearman:.4f} ± {one.cv[kind].spearman_se:.4f} "
                  f"({seconds[name][kind]:.0f} s)", flush=True)
            if fits[name] is None:
                fits[name] = one
            else:
                merged = fits[name]
                merged.regressors[kind], merged.cv[kind], merged.oof_N[kind] = one.regressors[kind], one.cv[kind], \
                    one.oof_N[kind]
        fits[name].primary, fits[name].choice = choose_model(fits[name])

    cpus = os.cpu_count()
    lines = [
        "# The regressor panel on RegMix's 512 1M-parameter proxy runs",
        "",
        (f"Machine: {cpus}-core x86-64 CPU shared with other jobs, no GPU (Python {platform.python_version()}). "
         f"Command: `{command.rstrip()}` (from the repo root; data: ../shared/data/regmix)."),
        "",
        (f"{len(mixtures)} runs, 17 domain weights as features, {args.folds}-fold cross-validation repeated "
         f"{args.repeats} times (split seed {args.seed}; the same splits for every regressor): each score is on runs "
         f"held out from the fit. Per-fold mean ± standard error over the {args.folds * args.repeats} folds (the SE "
         "treats folds as independent, which overlapping training sets are not: a lower bound); 'pooled' ranks all "
         "out-of-fold predictions together (mean over repeats). Targets: `pile_cc` = RegMix's "
         f"`{PILE_CC}`; `mean` = the unweighted mean of the 13 `metric/the_pile_*_val_loss` columns. "
         "Regressors: mixlm/mixing/regressors.py (module docstring); nothing was tuned on these folds."),
        "",
    ]
    for name, result in fits.items():
        lightgbm = result.cv["lightgbm"].spearman
        lines += [
            f"## Target `{name}`",
            "",
            "| regressor | Spearman per-fold ± SE | Pearson per-fold ± SE | Spearman pooled | vs lightgbm | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for kind, score in sorted(result.cv.items(), key=lambda kv: -kv[1].spearman):
            chosen = " (chosen)" if kind == result.primary else ""
            lines.append(
                f"| {kind}{chosen} | {score.spearman:.4f} ± {score.spearman_se:.4f} | {score.pearson:.4f} ± "
                f"{score.pearson_se:.4f} | {score.pooled_spearman:.4f} | {score.spearman - lightgbm:+.4f} | "
                f"{seconds[name][kind]:.0f} |"
            )
        lines += ["", f"Chosen: {result.choice}."]
        for kind, model in result.regressors.items():
            if kind.startswith("stacked"):
                lines.append(f"Blend of `{kind}` fitted on all runs: " + ", ".join(
                    f"{k} {w:.3f}" for k, w in model.blend.items()) + f" (+ intercept {model.intercept:.3f}).")
        lines.append("")
    lines += [
        ("'seconds': cross-validation plus the final fit of that regressor on this shared host. RegMix reported "
         "≈ 0.99 (LightGBM) on a separate set of held-out proxy runs, with early stopping on that same set; here "
         "early stopping uses a 10% split of the training folds only."),
    ]

    if "pile_cc" in fits:
        result = fits["pile_cc"]
        kind = result.primary
        prior = load_prior(args.data / "pile_token_prior.yaml").reorder(result.domains)
        t0 = time.perf_counter()
        runs = [propose(result, prior, seed=s) for s in range(args.optimize_seeds)]
        optimize_s = (time.perf_counter() - t0) / len(runs)
        bounded = propose(result, prior, seed=0, constraints=Constraints(max_kl=args.max_kl, zero_below=1e-4))
        published = {
            n: read_mixture_yaml(args.data / f"mixture_1b_{n}.yaml")
            for n in PUBLISHED
            if (args.data / f"mixture_1b_{n}.yaml").is_file()
        }
        shares = dict(zip(prior.domains, prior.shares_D))
        spread = {d: float(np.std([r.weights[d] for r in runs])) for d in result.domains}
        lines += [
            "",
            "## Optimised mixture for `pile_cc`",
            "",
            (f"`propose` with RegMix's defaults (prior = token shares ** 0.5, strengths 0.1–5, 100,000 simulated "
             f"mixtures, mean of the 128 lowest by the chosen {kind}, max usage 15 × share), {len(runs)} seeds "
             f"({optimize_s:.1f} s each); ± is the std over the seeds. `KL <= {args.max_kl:g}`: the same with "
             f"KL(mixture || token shares) <= {args.max_kl:g} nats and weights below 1e-4 written as 0. 'regmix' is "
             "the mixture RegMix trained its 1B model on (mixture_1b_regmix.yaml)."),
            "",
            f"| domain | prior share | ours (seed 0) | ± over seeds | KL <= {args.max_kl:g} | regmix | human |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in sorted(result.domains, key=lambda d: -runs[0].weights[d]):
            row = [f"{shares[d]:.4f}", f"{runs[0].weights[d]:.4f}", f"{spread[d]:.4f}", f"{bounded.weights[d]:.4f}",
                   *(f"{published[n].get(d, 0.0):.4f}" if n in published else "–" for n in ("regmix", "human"))]
            lines.append(f"| {d.removeprefix('train_the_pile_')} | " + " | ".join(row) + " |")
        lines += ["", (f"Constraints of the KL-bounded proposal ({bounded.accepted} of {bounded.drawn} simulated "
                       "mixtures met them):"), ""]
        lines += [f"- {c.line()}" for c in bounded.checks]
        compared = {"ours (seed 0)": runs[0].weights, f"ours, KL <= {args.max_kl:g}": bounded.weights, **published}
        regmix = published.get("regmix")
        lines += [
            "",
            (f"Predicted target by the chosen {kind} (a 1M-proxy loss, so a ranking, not a 1B loss; ± its "
             "predictive std where it has one) and L1 distance to RegMix's mixture:"),
            "",
            "| mixture | predicted loss | L1 to regmix |",
            "|---|---|---|",
        ]
        for name, m in compared.items():
            w_1xD = np.array([[m.get(d, 0.0) for d in result.domains]])
            std = result.predict_std(w_1xD)
            value = f"{float(result.predict(w_1xD)[0]):.4f}" + ("" if std is None else f" ± {float(std[0]):.4f}")
            l1 = sum(abs(m.get(d, 0.0) - regmix.get(d, 0.0)) for d in result.domains) if regmix else float("nan")
            lines.append(f"| {name} | {value} | {l1:.3f} |")

    lines += ["", f"Total time: {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


def time_default_panel(args: argparse.Namespace, command: str) -> None:
    """One `fit` per target with no regressors named (the default panel), default repeats, `args.folds` folds:
    the work `mixlm mix fit` does before it writes model.json and the plots."""
    from machine import describe_machine  # benchmarks/machine.py

    mixtures = read_csv(args.data / "train_mixture_1m.csv")
    results = read_csv(args.data / "train_pile_loss_1m.csv")
    columns = {"pile_cc": [PILE_CC], "mean": list(results.columns)}
    load_before = os.getloadavg()
    lines = [
        f"# `mix fit`'s default panel on RegMix's {len(mixtures)} proxy runs: what it costs",
        "",
        (f"Machine: {describe_machine()}. Date: {time.strftime('%Y-%m-%d %H:%M')}. Command: `{command.rstrip()}` "
         "(from the repo root; data: RegMix's train_mixture_1m.csv and train_pile_loss_1m.csv)."),
        (f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.1f}' for x in load_before)}, at end LOAD_AFTER: "
         "the host is shared with other jobs, so the seconds are an upper bound of what a quiet host takes."),
        "",
        (f"Each target is one `fit(mixtures, results, target, folds={args.folds})` call with no regressors named, "
         "as `mixlm mix fit` makes it without --regressors (repeats: fit's default for this many runs). 'wall s' "
         "is each regressor's k-fold cross-validation plus its final fit on all runs (fit's progress callback); "
         "'CPU s' the process's CPU time over the same span (less inflated by other jobs than wall time); "
         "'total' is the whole call. Writing model.json and the plots is not included."),
        "",
    ]
    totals = {}
    for name in args.targets.split(","):
        seconds: dict[str, tuple[float, float]] = {}  # kind -> (wall, CPU)
        cpu_marks = [time.process_time()]

        def progress(kind: str, wall: float, seconds=seconds, cpu_marks=cpu_marks) -> None:
            cpu_marks.append(time.process_time())
            seconds[kind] = (wall, cpu_marks[-1] - cpu_marks[-2])

        t0 = time.perf_counter()
        result = fit(mixtures, results, columns[name], folds=args.folds, seed=args.seed, progress=progress)
        totals[name] = time.perf_counter() - t0
        cpu_total = time.process_time() - cpu_marks[0]
        score = next(iter(result.cv.values()))
        print(f"{name}: {totals[name]:.0f} s, chose {result.primary}", flush=True)
        lines += [
            (f"## Target `{name}` ({len(columns[name])} loss column{'s' if len(columns[name]) > 1 else ''}): "
             f"{totals[name]:.0f} s in all"),
            "",
            f"Panel: {', '.join(default_regressors(len(columns[name])))}; {score.folds}-fold x {score.repeats}.",
            "",
            "| regressor | wall s | CPU s |",
            "|---|---:|---:|",
            *(f"| {kind} | {wall:.1f} | {cpu:.1f} |" for kind, (wall, cpu) in seconds.items()),
            f"| total | {totals[name]:.1f} | {cpu_total:.1f} |",
            "",
            cv_table(result),
            "",
            f"Chosen: {result.choice}.",
            "",
        ]
    load_after = os.getloadavg()
    text = "\n".join(lines).replace("LOAD_AFTER", ", ".join(f"{x:.1f}" for x in load_after)) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
