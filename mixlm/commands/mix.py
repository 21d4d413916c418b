"""`mixlm mix prior|sample|fit|predict|optimize|fidelity`: RegMix-style mixture search.

  mixlm mix prior    --prior PRIOR --out YAML [--domains D,D]   the natural mixture (token shares) as a YAML
  mixlm mix sample   --prior PRIOR -n N --out DIR          N mixture YAMLs + DIR/mixtures.csv
  mixlm mix fit      --mixtures CSV [CSV ...] --results CSV [CSV ...] --target COL[,COL] --out DIR
                     [--regressors all|K,K] [--domains D,D]   (--domains: reuse runs of other domain sets)
  mixlm mix predict  --model DIR --mixtures CSV | YAML [YAML ...] --out CSV
  mixlm mix optimize --model DIR --prior PRIOR --out YAML [--max-kl X] [--max-l1 X] [--max-epochs E
                     --token-budget T] [--min-weight W|D=W,..] [--max-weight W|D=W,..] [--zero-below W]
  mixlm mix fidelity SWEEP SWEEP [...] [--large RESULTS.csv] [--target COL] [--top-k K]

PRIOR is a prepared-data directory (`<dir>/<domain>/manifest.json`) or a YAML {domain: tokens or share}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# What the default `mix fit` panel cost, as benchmarks/results/regmix_fit_default.md holds it (quote no other).
DEFAULT_PANEL_COST = (
    "on RegMix's 512 runs, 5 folds, it took 619 s wall / 154 s CPU for one loss column and 623 s / 164 s for the "
    "mean of 13 on a shared 2-core CPU at load 9-13, of which lightgbm,linear,loglinear took 4-5 s "
    "(benchmarks/results/regmix_fit_default.md)"
)


def _add_prior_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prior",
        required=True,
        help="prepared-data dir (<dir>/<domain>/manifest.json) or YAML {domain: tokens or share}",
    )
    parser.add_argument(
        "--domains",
        default=None,
        help="comma-separated training domains to mix (default: all of the prior's; leave out eval-only ones)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="Dirichlet base ∝ share**temperature (1: token shares, 0: uniform)",
    )
    parser.add_argument("--min-strength", type=float, default=0.1)
    parser.add_argument("--max-strength", type=float, default=5.0)
    parser.add_argument("--num-strengths", type=int, default=15, help="log-spaced concentration strengths")
    parser.add_argument(
        "--max-usage",
        "--max-epochs",
        dest="max_usage",
        type=float,
        default=15.0,
        help="epochs a domain may be repeated: weight <= max_epochs * tokens / token_budget",
    )
    parser.add_argument(
        "--token-budget",
        type=float,
        default=None,
        help="tokens of the run the mixture is for (default: all tokens of the prior)",
    )


def _domains(args: argparse.Namespace) -> list[str] | None:
    return None if not args.domains else [d.strip() for d in args.domains.split(",") if d.strip()]


def _prior_settings(args: argparse.Namespace) -> dict:
    names = ("temperature", "min_strength", "max_strength", "num_strengths", "max_usage", "token_budget")
    return {name: getattr(args, name) for name in names}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mixlm.mixing.regressors import DEFAULT_FOR_SEVERAL_COLUMNS, DEFAULT_REGRESSORS

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    prior = actions.add_parser("prior", help="write the natural mixture (each domain's token share) as a YAML")
    prior.add_argument(
        "--prior",
        required=True,
        help="prepared-data dir (<dir>/<domain>/manifest.json) or YAML {domain: tokens or share}",
    )
    prior.add_argument(
        "--domains",
        default=None,
        help="comma-separated domains to keep, shares renormalised over them (default: all of the prior's; "
        "leave out eval-only ones)",
    )
    prior.add_argument("--out", type=Path, required=True, help="mixture YAML for `mixlm train` (data.mixture)")

    sample = actions.add_parser("sample", help="sample N random mixtures around a token prior")
    _add_prior_arguments(sample)
    sample.add_argument("-n", "--num", type=int, required=True, help="number of mixtures")
    sample.add_argument("--out", type=Path, required=True, help="directory for the YAMLs and mixtures.csv")
    sample.add_argument(
        "--minimum", type=float, default=2e-4, help="weights below it are dropped; rounding step"
    )
    sample.add_argument("--oversample", type=int, default=100, help="draw N x this, de-duplicate, keep N")

    fit = actions.add_parser("fit", help="fit a regression from mixture weights to a loss")
    fit.add_argument(
        "--mixtures", type=Path, nargs="+", required=True,
        help="CSV(s): index + one column per domain weight; several are pooled (a column one lacks weighs 0)",
    )
    fit.add_argument(
        "--results", type=Path, nargs="+", required=True, help="CSV(s): index + loss columns (metric/..._val_loss)"
    )
    fit.add_argument(
        "--runs", type=Path, nargs="+", default=[],
        help="training run folders added as new runs: each one's mixture (mixture_average.yaml of an online "
        "mixing run, else its fixed data.mixture) and its final validation losses",
    )
    fit.add_argument(
        "--domains", default=None,
        help="today's training domains (comma-separated); runs on a removed domain are dropped, the rest reused",
    )
    fit.add_argument("--target", required=True, help="loss column, or several separated by commas (averaged)")
    fit.add_argument("--out", type=Path, required=True, help="directory for the model, scores and plots")
    fit.add_argument(
        "--regressors",
        default=None,
        help=f"comma-separated, or 'all': lightgbm, linear, loglinear, dml, gp, bimix, perdomain[:BASE], "
        f"stacked[:A+B+...] (default: {','.join(DEFAULT_REGRESSORS)}, plus {','.join(DEFAULT_FOR_SEVERAL_COLUMNS)} "
        f"for a target of several columns; {DEFAULT_PANEL_COST})",
    )
    fit.add_argument("--folds", type=int, default=5)
    fit.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="shuffles of the k-fold split (default: 3 below 200 runs, else 1); scores report mean ± SE",
    )
    fit.add_argument("--seed", type=int, default=0)

    predict = actions.add_parser("predict", help="predict the target for new mixtures")
    predict.add_argument("--model", type=Path, required=True, help="directory written by `mix fit`")
    predict.add_argument(
        "--mixtures",
        type=Path,
        nargs="+",
        required=True,
        help="a CSV (index + one column per domain weight) or mixture YAMLs (.yaml/.yml), read as `mixlm train "
        "data.mixture=` reads them (one row each, numbered from 1 in the order given)",
    )
    predict.add_argument("--out", type=Path, required=True, help="CSV: index, predicted")
    predict.add_argument(
        "--regressor", default=None, help="default: the model's chosen regressor (see model.json)"
    )

    optimize = actions.add_parser("optimize", help="simulate mixtures, average the top-k predicted")
    optimize.add_argument("--model", type=Path, required=True, help="directory written by `mix fit`")
    _add_prior_arguments(optimize)
    optimize.add_argument("--samples", type=int, default=100_000)
    optimize.add_argument("--top-k", type=int, default=128)
    optimize.add_argument(
        "--regressor", default=None, help="default: the model's chosen regressor (see model.json)"
    )
    optimize.add_argument(
        "--out", type=Path, required=True, help="mixture YAML for `mixlm train` (data.mixture)"
    )
    optimize.add_argument("--max-kl", type=float, default=None, help="KL(mixture || prior token shares) <= X nats")
    optimize.add_argument("--max-l1", type=float, default=None, help="sum |mixture - prior token shares| <= X")
    optimize.add_argument("--min-weight", default="0", help="W for every domain, or D=W,D=W")
    optimize.add_argument("--max-weight", default="1", help="W for every domain, or D=W,D=W")
    optimize.add_argument(
        "--zero-below", type=float, default=1e-4, help="weights below this are written as exactly 0"
    )

    fidelity = actions.add_parser(
        "fidelity", help="rank agreement of sweeps at different proxy sizes or budgets over the same mixtures"
    )
    fidelity.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (results.csv inside) or CSVs")
    fidelity.add_argument("--large", type=Path, default=None, help="results of larger runs (folder or CSV)")
    fidelity.add_argument("--target", default="metric/val_loss", help="loss column(s), comma-separated: mean")
    fidelity.add_argument("--top-k", type=int, default=5)
    fidelity.add_argument(
        "--target-budget", type=float, default=None, help="tokens of the target run (default: the larger runs')"
    )
    fidelity.add_argument(
        "--budgets", default=None, help="tokens per run of each sweep, comma-separated (default: from config.yaml)"
    )
    fidelity.add_argument(
        "--prior", default=None, help="tokens per domain: prepared dir or YAML (default: the runs' prepared_dir)"
    )


def run(args: argparse.Namespace) -> int:
    actions = {
        "prior": _prior, "sample": _sample, "fit": _fit, "predict": _predict, "optimize": _optimize,
        "fidelity": _fidelity,
    }
    return actions[args.action](args)


def _bounds(text: str, flag: str) -> float | dict[str, float]:
    """'0.05' -> 0.05; 'a=0.1,b=0.2' -> {'a': 0.1, 'b': 0.2}."""
    from mixlm.errors import ConfigError

    try:
        if "=" not in text:
            return float(text)
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        return {d.strip(): float(w) for d, w in pairs}
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected a weight (0.05) or domain=weight pairs (code=0.1,web=0.3)") from None


def _prior(args: argparse.Namespace) -> int:
    from mixlm.mixing import load_prior, write_mixture_yaml
    from mixlm.mixing.tables import clean_weights

    prior = load_prior(args.prior, _domains(args))
    shares = dict(zip(prior.domains, prior.shares_D.tolist()))
    written = clean_weights(shares)
    dropped = [d for d in prior.domains if written[d] == 0]
    counted = "token counts" if prior.tokens_D is not None else "shares"
    write_mixture_yaml(
        args.out,
        shares,
        comment=f"mixlm mix prior: the natural mixture, each domain's share of the {counted} in {args.prior}",
    )
    for d in sorted(prior.domains, key=lambda d: -shares[d]):
        tokens = "" if prior.tokens_D is None else f"  {int(prior.tokens_D[prior.domains.index(d)]):>15,} tokens"
        print(f"  {d:40s} {shares[d]:.4f}{tokens}")
    if dropped:
        print(f"written as 0 (a share below 1e-6 of the total): {', '.join(dropped)}")
    print(f"wrote {args.out} ({len(prior.domains) - len(dropped)} domains)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from mixlm.mixing import load_prior, mixtures_table, sample_mixtures, write_csv, write_mixture_yaml

    prior = load_prior(args.prior, _domains(args))
    mixtures = sample_mixtures(
        prior, args.num, args.seed, minimum=args.minimum, oversample=args.oversample, **_prior_settings(args)
    )
    table = mixtures_table(mixtures, prior.domains)
    for i, weights in zip(table.index_N, mixtures):
        write_mixture_yaml(
            args.out / f"mixture_{i:04d}.yaml",
            weights,
            comment=f"mixlm mix sample: run {i} of {args.num}, seed {args.seed}",
        )
    write_csv(args.out / "mixtures.csv", table)
    print(
        f"wrote {len(mixtures)} mixture{'' if len(mixtures) == 1 else 's'} of {len(prior.domains)} domains to "
        f"{args.out}/mixture_*.yaml "
        f"and {args.out / 'mixtures.csv'}"
    )
    return 0


def _fit(args: argparse.Namespace) -> int:
    from mixlm.mixing import (
        cv_table,
        domain_loss_columns,
        fit,
        join_runs,
        plot_loss_vs_weight,
        read_csv,
        save_model,
    )
    from mixlm.mixing.plots import plot_fit
    from mixlm.mixing.regressors import REGRESSORS
    from mixlm.mixing.reuse import pool_tables, reuse_runs

    pooled = [read_csv(p) for p in args.mixtures]
    results = pool_tables([read_csv(p) for p in args.results])
    if args.runs:
        first = int(max(max(t.index_N.max(initial=0) for t in pooled), results.index_N.max(initial=0))) + 1
        run_mixtures, run_results = _runs_as_tables(args.runs, first)
        pooled, results = [*pooled, run_mixtures], pool_tables([results, run_results])
    domains = _domains(args)
    mixtures, reused = reuse_runs(pooled, domains)
    if domains is not None or len(pooled) > 1:
        print(f"runs: {reused.note()}")
    if args.regressors is None:
        regressors = None  # fit's default panel for the target
    else:
        text = args.regressors.strip()
        regressors = list(REGRESSORS) if text == "all" else [r.strip() for r in text.split(",") if r.strip()]

    def progress(kind: str, seconds: float) -> None:
        print(f"fitted {kind}: cross-validation and the final fit in {seconds:.1f} s", file=sys.stderr, flush=True)

    result = fit(
        mixtures,
        results,
        args.target,
        regressors=regressors,
        folds=args.folds,
        seed=args.seed,
        repeats=args.repeats,
        progress=progress,
    )
    if reused.untrained:
        result.warnings.append(reused.note())
    save_model(result, args.out)
    plot_fit(result, args.out / "scatter.png")
    per_domain = domain_loss_columns(result.domains, results.columns)
    if per_domain:
        # Each domain's own loss against its weight, over the runs that have every such loss.
        index_N, weights_NxD, _ = join_runs(mixtures, results, list(per_domain.values()))
        losses = results.rows(index_N)
        plot_loss_vs_weight(
            weights_NxD,
            result.domains,
            {d: losses.select([c])[:, 0] for d, c in per_domain.items()},
            args.out / "loss_vs_weight.png",
            target=(result.target_label, losses.select(list(result.target)).mean(axis=1)),
        )
    print(f"target {result.target_label} over {len(result.actual_N)} runs, {len(result.domains)} domains\n")
    print(cv_table(result))
    print(f"\nchosen: {result.choice}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"\nwrote {args.out}/model.json, scatter.png" + (", loss_vs_weight.png" if per_domain else ""))
    return 0


def _runs_as_tables(run_dirs: list[Path], first_index: int):
    """(mixtures, results) Tables of training run folders, one row each from `first_index` on: the weights the
    run trained on (its mixture_average.yaml when online mixing wrote one, else config.yaml's fixed data.mixture)
    and its final validation losses (the columns a sweep's results.csv has)."""
    import numpy as np

    from mixlm.config import read_yaml_file
    from mixlm.data.mixture import parse_mixture
    from mixlm.errors import ConfigError
    from mixlm.mixing import Table, loss_column
    from mixlm.run_dir import RunDir

    weights, losses = [], []
    for run in run_dirs:
        config = read_yaml_file(run / "config.yaml") if (run / "config.yaml").is_file() else None
        if not isinstance(config, dict):
            raise ConfigError(f"--runs {run}: no config.yaml (is it a training run's output folder?)")
        averaged = run / "mixture_average.yaml"
        raw = read_yaml_file(averaged) if averaged.is_file() else (config.get("data") or {}).get("mixture")
        mixture = parse_mixture(raw or {}, where=f"--runs {averaged if averaged.is_file() else run / 'config.yaml'}")
        if len(mixture.stages) > 1:
            raise ConfigError(f"--runs {run}: a staged mixture and no mixture_average.yaml; the fit takes one mixture")
        final = RunDir(run).final_eval(int((config.get("train") or {}).get("steps", 0)))
        if final is None:
            raise ConfigError(f"--runs {run}: no final validation losses in metrics.jsonl (did the run finish, "
                              "with eval.batches >= 1?)")
        weights.append(mixture.stages[0].weights)
        losses.append({loss_column(k.split("/", 1)[1]) if "/" in k else f"metric/{k}": v for k, v in final.items()})
    index_N = np.arange(first_index, first_index + len(run_dirs), dtype=np.int64)
    domains = tuple(dict.fromkeys(d for w in weights for d in w))
    columns = tuple(dict.fromkeys(c for row in losses for c in row))
    mixtures = Table(index_N, domains, np.array([[w.get(d, 0.0) for d in domains] for w in weights]))
    results = Table(index_N, columns, np.array([[row.get(c, np.nan) for c in columns] for row in losses]))
    return mixtures, results


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _mixture_yaml_weights(path: Path, domains: tuple[str, ...]):
    """[D] weights in `domains` order from a mixture YAML read as `mixlm train data.mixture=PATH` reads it
    (normalised; a domain outside `domains` is refused, naming the closest)."""
    import json

    import numpy as np

    from mixlm.config import load_config
    from mixlm.data.mixture import parse_mixture
    from mixlm.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"--mixtures {path}: no such file (a CSV, or a mixture YAML)")
    # The path as a quoted YAML string: train's own reader then loads the file, whatever its name.
    raw = load_config(None, [f"data.mixture={json.dumps(str(path))}"]).data.mixture
    mixture = parse_mixture(raw, known_domains=domains, where=str(path))
    if len(mixture.stages) > 1:
        raise ConfigError(
            f"{path}: a staged mixture ({len(mixture.stages)} stages); the fit predicts one fixed mixture: "
            "give one stage's weights as {domain: weight}"
        )
    weights = mixture.stages[0].weights
    return np.array([weights.get(d, 0.0) for d in domains])


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from mixlm.errors import ConfigError
    from mixlm.mixing import Table, load_model, read_csv, write_csv

    model = load_model(args.model)
    paths = list(args.mixtures)
    if not all(_is_yaml(p) for p in paths):
        if len(paths) > 1:
            raise ConfigError("--mixtures: give one CSV, or one or more mixture YAMLs (.yaml/.yml), not both or "
                              "several CSVs")
        mixtures = read_csv(paths[0])
        index_N = mixtures.index_N
        weights_NxD = mixtures.select(model.domains, source=str(paths[0]))
    else:
        index_N = np.arange(1, len(paths) + 1, dtype=np.int64)
        weights_NxD = np.stack([_mixture_yaml_weights(p, model.domains) for p in paths])
    predicted_N = model.predict(weights_NxD, args.regressor)
    write_csv(args.out, Table(index_N, ("predicted",), predicted_N[:, None]))
    if _is_yaml(paths[0]):
        for i, path, value in zip(index_N, paths, predicted_N):
            print(f"  {int(i):>4d}  {value:.4f}  {path}")
    print(f"wrote {len(predicted_N)} predictions of {model.target_label} to {args.out}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from mixlm.mixing import load_model, load_prior, plot_mixture, write_mixture_yaml
    from mixlm.mixing.optimize import Constraints, propose

    model = load_model(args.model)
    prior = load_prior(args.prior, _domains(args) or model.domains).reorder(model.domains)
    constraints = Constraints(
        min_weight=_bounds(args.min_weight, "--min-weight"),
        max_weight=_bounds(args.max_weight, "--max-weight"),
        max_kl=args.max_kl,
        max_l1=args.max_l1,
        zero_below=args.zero_below,
    )
    proposal = propose(
        model,
        prior,
        constraints=constraints,
        n_samples=args.samples,
        top_k=args.top_k,
        seed=args.seed,
        regressor=args.regressor,
        **_prior_settings(args),
    )
    weights = proposal.weights
    kind = args.regressor or model.primary
    interval = "" if proposal.predicted_std is None else f" ± {proposal.predicted_std:.4f} ({kind} std)"
    predicted = f"predicted {model.target_label} = {proposal.predicted:.4f}{interval}"
    checks = [check.line() for check in proposal.checks]
    write_mixture_yaml(
        args.out,
        weights,
        comment="\n".join([
            (
                f"mixlm mix optimize: mean of the top {args.top_k} of {proposal.accepted} simulated mixtures "
                f"that met the constraints (of {proposal.drawn}) by {kind}"
            ),
            predicted,
            *checks,
        ]),
    )
    png = args.out.with_suffix(".png")
    plot_mixture(
        {"optimized": weights, "prior (token share)": dict(zip(prior.domains, prior.shares_D))},
        png,
        title=f"optimized for {model.target_label}",
    )
    for d, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        print(f"  {d:40s} {w:.4f}")
    print(f"{predicted}\n{proposal.accepted} of {proposal.drawn} simulated mixtures met the constraints")
    for line in checks:
        print(f"constraint: {line}")
    if proposal.zeroed:
        print(f"written as 0 (below {args.zero_below:g}): {', '.join(proposal.zeroed)}")
    print(f"wrote {args.out} and {png}")
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from mixlm.errors import ConfigError
    from mixlm.mixing import load_prior
    from mixlm.mixing.fidelity import fidelity, format_report, load_sweep

    budgets: list[float | None] = [None] * len(args.sweeps)
    if args.budgets:
        try:
            budgets = [float(b) for b in args.budgets.split(",")]
        except ValueError:
            raise ConfigError(f"--budgets {args.budgets!r}: expected tokens per sweep, e.g. 153600,460800") from None
        if len(budgets) != len(args.sweeps):
            raise ConfigError(f"--budgets has {len(budgets)} values for {len(args.sweeps)} sweeps: give one each")
    tokens = None
    if args.prior:
        prior = load_prior(args.prior)
        if prior.tokens_D is None:
            raise ConfigError(f"--prior {args.prior}: gives shares, not token counts; give counts or a prepared dir")
        tokens = dict(zip(prior.domains, prior.tokens_D.tolist()))
    sweeps = [load_sweep(p, budget_tokens=b, tokens=tokens) for p, b in zip(args.sweeps, budgets)]
    large = load_sweep(args.large, tokens=tokens) if args.large else None
    report = fidelity(sweeps, args.target, large=large, top_k=args.top_k, target_budget=args.target_budget)
    print(format_report(report), end="")
    return 0
