"""Proxy fidelity: do sweeps at different proxy sizes or token budgets rank the same mixtures alike, and
like any larger runs? And do the proxies repeat each domain's data as often as the target run will?

    sweeps = [load_sweep("runs/sweep_150"), load_sweep("runs/sweep_450")]
    report = fidelity(sweeps, "metric/val_loss", large=load_sweep("runs/large/results.csv"), top_k=5)
    print(format_report(report))

A sweep is a results table in today's layout (`index`, one weight column per domain, `metric/<d>_val_loss`
...), read from a sweep folder (`<dir>/results.csv`) or a CSV file. Two sweeps are compared on the runs
they share: same index and the same weights (within 1e-6); rows whose weights differ are counted, not
compared. Per pair: Spearman of the target over the shared runs, and the top-k overlap (how many of the k
lowest-loss mixtures of one are among the k lowest of the other, / k).

Repetition: a run of B tokens reads domain d for w_d * B / tokens_d epochs. The sweep's budget B comes from
its runs' config.yaml (train.steps x global_batch_size x seq_len) and tokens_d from the prepared manifests
under data.prepared_dir, unless given. Proxies whose epochs differ from the target run's (target_budget,
else the larger runs' budget, else the largest sweep budget) where either repeats a domain (> 1 epoch) by
more than REPETITION_RATIO are warned about: scarce data repeated at another rate ranks mixtures wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixlm.config import read_yaml_file
from mixlm.errors import ConfigError
from mixlm.mixing.fitting import parse_target
from mixlm.mixing.stats import spearman
from mixlm.mixing.tables import Table, read_csv

SAME_WEIGHTS = 1e-6
REPETITION_RATIO = 1.25  # epochs (counted as at least 1) differing by more than this warn


@dataclass(frozen=True)
class Sweep:
    """name: how the report calls it (its path); table: its results; budget_tokens: tokens per run (None:
    unknown); tokens: {domain: available train tokens} (None: unknown)."""

    name: str
    table: Table
    budget_tokens: float | None = None
    tokens: Mapping[str, float] | None = None

    @property
    def domains(self) -> tuple[str, ...]:
        return self.table.weight_columns()


def _run_config(folder: Path) -> dict | None:
    for config in sorted(folder.glob("runs/*/config.yaml"))[:1]:
        return read_yaml_file(config)
    return None


def load_sweep(path: str | Path, *, budget_tokens: float | None = None,
               tokens: Mapping[str, float] | None = None) -> Sweep:
    """A Sweep from `<dir>/results.csv` (a `mixlm sweep` folder: the budget and domain tokens are read from
    its runs' config.yaml and prepared manifests) or from a CSV file. Given values win over read ones."""
    from mixlm.mixing.prior import load_prior

    path = Path(path)
    csv = path / "results.csv" if path.is_dir() else path
    if not csv.is_file():
        raise ConfigError(f"{path}: no results.csv (give a sweep folder written by `mixlm sweep`, or its CSV)")
    table = read_csv(csv)
    config = _run_config(csv.parent)
    if config is not None and budget_tokens is None:
        train, data = config.get("train", {}), config.get("data", {})
        try:
            budget_tokens = float(train["steps"]) * float(train["global_batch_size"]) * float(data["seq_len"])
        except (KeyError, TypeError, ValueError):
            budget_tokens = None
    if config is not None and tokens is None:
        prepared = config.get("data", {}).get("prepared_dir")
        if prepared and Path(prepared).is_dir():
            try:
                prior = load_prior(prepared)
                tokens = None if prior.tokens_D is None else dict(zip(prior.domains, prior.tokens_D.tolist()))
            except ConfigError:
                tokens = None
    return Sweep(str(path), table, budget_tokens, tokens)


@dataclass(frozen=True)
class Agreement:
    """One pair: runs shared (same index and weights), `mismatched` ids with other weights, Spearman of the
    target, top-k overlap, and where a's best mixture ranks in b (1 = also b's best)."""

    a: str
    b: str
    runs: int
    mismatched: int
    spearman: float
    top_k: int
    overlap: float
    best_of_a_in_b: int


@dataclass
class FidelityReport:
    target: tuple[str, ...]
    pairs: list[Agreement] = field(default_factory=list)
    vs_large: list[Agreement] = field(default_factory=list)
    repetition: list[dict] = field(default_factory=list)  # per sweep and domain: max epochs, proxy vs target
    target_budget: float | None = None
    warnings: list[str] = field(default_factory=list)


def _target_N(table: Table, target: tuple[str, ...]) -> np.ndarray:
    return table.select(target, source="results").mean(axis=1)


def agreement(a: Sweep, b: Sweep, target: Sequence[str], top_k: int = 5) -> Agreement:
    """Rank agreement of the target between two sweeps over their shared runs (see the module docstring)."""
    target = parse_target(target)
    domains = tuple(d for d in a.domains if d in b.domains)
    common = np.intersect1d(a.table.index_N, b.table.index_N)
    rows_a, rows_b = a.table.rows(common), b.table.rows(common)
    extra = [d for d in (*a.domains, *b.domains) if d not in domains]
    same_N = np.all(np.abs(rows_a.select(domains) - rows_b.select(domains)) <= SAME_WEIGHTS, axis=1)
    for d in extra:  # a domain only one of them has must weigh 0 in that one
        side = rows_a if d in a.domains else rows_b
        same_N &= side.select([d])[:, 0] <= SAME_WEIGHTS
    ya_N, yb_N = _target_N(rows_a, target)[same_N], _target_N(rows_b, target)[same_N]
    finite_N = np.isfinite(ya_N) & np.isfinite(yb_N)
    ya_N, yb_N = ya_N[finite_N], yb_N[finite_N]
    n = len(ya_N)
    if n < 3:
        raise ConfigError(
            f"{a.name} and {b.name} share {n} runs with the same index, weights and a finite target; need >= 3 "
            "(sweep the same mixtures.csv at both sizes)"
        )
    k = min(top_k, n)
    top_a, top_b = set(np.argsort(ya_N, kind="stable")[:k]), set(np.argsort(yb_N, kind="stable")[:k])
    rank_in_b = int(np.argsort(np.argsort(yb_N, kind="stable"))[int(np.argmin(ya_N))]) + 1
    return Agreement(a.name, b.name, n, int((~same_N).sum()), spearman(ya_N, yb_N), k,
                     len(top_a & top_b) / k, rank_in_b)


def repetition_rows(sweep: Sweep, target_budget: float) -> list[dict]:
    """Per domain of the sweep: the most epochs any of its mixtures reads it at the sweep's budget and at
    the target run's budget (same weights), and the largest weight."""
    rows = []
    for d in sweep.domains:
        available = (sweep.tokens or {}).get(d)
        if not available:
            continue
        top_weight = float(np.nanmax(sweep.table.select([d])[:, 0]))
        rows.append({
            "sweep": sweep.name,
            "domain": d,
            "max_weight": top_weight,
            "tokens": float(available),
            "proxy_epochs": top_weight * sweep.budget_tokens / available,
            "target_epochs": top_weight * target_budget / available,
        })
    return rows


def fidelity(
    sweeps: Sequence[Sweep],
    target: str | Sequence[str],
    *,
    large: Sweep | None = None,
    top_k: int = 5,
    target_budget: float | None = None,
) -> FidelityReport:
    """Pairwise rank agreement of the sweeps, each sweep against `large`, and the repetition check."""
    target = parse_target(target)
    if len(sweeps) < 2:
        raise ConfigError(f"mix fidelity compares sweeps: give two or more, got {len(sweeps)}")
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1")
    report = FidelityReport(target)
    for i, a in enumerate(sweeps):
        for b in sweeps[i + 1:]:
            report.pairs.append(agreement(a, b, target, top_k))
    if large is not None:
        report.vs_large = [agreement(s, large, target, top_k) for s in sweeps]
    budgets = [s.budget_tokens for s in sweeps if s.budget_tokens]
    reference = target_budget or (large.budget_tokens if large is not None else None)
    if reference is None and budgets:
        reference = max(budgets)
        report.warnings.append(
            f"no target budget given (--target-budget) and no larger runs with one: the largest sweep budget, "
            f"{reference:,.0f} tokens, is taken as the target run's"
        )
    report.target_budget = reference
    unknown = [s.name for s in sweeps if not s.budget_tokens or not s.tokens]
    if unknown:
        report.warnings.append(
            f"repetition not checked for {', '.join(unknown)}: token budget or per-domain tokens unknown (no runs/*/"
            "config.yaml with prepared manifests); give --budgets and --prior"
        )
    for sweep in sweeps:
        if sweep.budget_tokens and sweep.tokens and reference:
            report.repetition += repetition_rows(sweep, reference)
    for row in report.repetition:
        proxy, goal = max(row["proxy_epochs"], 1.0), max(row["target_epochs"], 1.0)
        if max(proxy, goal) / min(proxy, goal) > REPETITION_RATIO:
            report.warnings.append(
                f"{row['sweep']}: {row['domain']} is read up to {row['proxy_epochs']:.2f} epochs by the proxies but "
                f"{row['target_epochs']:.2f} at the target run's {reference:,.0f} tokens (weight up to "
                f"{row['max_weight']:.3f} of {row['tokens']:,.0f} tokens): proxies that repeat scarce data at another "
                "rate rank mixtures unreliably; train proxies on the target budget or bound --max-epochs"
            )
    for pair in report.pairs + report.vs_large:
        if math.isfinite(pair.spearman) and pair.spearman < 0.8:
            report.warnings.append(
                f"{pair.a} vs {pair.b}: Spearman {pair.spearman:.3f} over {pair.runs} runs: the smaller sweep's "
                "ranking does not carry over; do not trust a mixture optimised on it"
            )
    return report


def format_report(report: FidelityReport) -> str:
    """The report as Markdown tables plus its warnings."""
    label = report.target[0] if len(report.target) == 1 else f"mean({', '.join(report.target)})"
    lines = [f"target {label}", ""]

    def table(title: str, rows: list[Agreement]) -> None:
        lines.extend([title, "", "| sweep A | sweep B | shared runs | Spearman | top-k overlap | A's best ranks in B |",
                      "|---|---|---|---|---|---|"])
        for p in rows:
            value = f"{p.spearman:.3f}" if math.isfinite(p.spearman) else "undefined (constant losses)"
            skipped = f" ({p.mismatched} with other weights left out)" if p.mismatched else ""
            lines.append(f"| {p.a} | {p.b} | {p.runs}{skipped} | {value} | {p.overlap * p.top_k:.0f}/{p.top_k} "
                         f"| {p.best_of_a_in_b} of {p.runs} |")
        lines.append("")

    table("Rank agreement between sweeps:", report.pairs)
    if report.vs_large:
        table("Against the larger runs:", report.vs_large)
    if report.repetition:
        lines.extend([f"Repetition (epochs at the largest weight; target run {report.target_budget:,.0f} tokens):", "",
                      "| sweep | domain | max weight | tokens | epochs (proxy) | epochs (target run) |",
                      "|---|---|---|---|---|---|"])
        for row in report.repetition:
            lines.append(f"| {row['sweep']} | {row['domain']} | {row['max_weight']:.3f} | {row['tokens']:,.0f} | "
                         f"{row['proxy_epochs']:.2f} | {row['target_epochs']:.2f} |")
        lines.append("")
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines).rstrip() + "\n"
