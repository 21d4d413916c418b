"""RegMix-style mixture search: sample mixtures around a token prior, fit a regression from mixture
weights to proxy losses, and optimise the mixture through it.

    prior = load_prior("data/prepared")                    # or a YAML {domain: tokens or share}
    mixtures = sample_mixtures(prior, 512, seed=0)         # [{domain: weight}], RegMix's sampler
    ... train one proxy per mixture (mixlm sweep), collect losses in RegMix's CSV layout ...
    result = fit(read_csv("mixtures.csv"), read_csv("results.csv"), "metric/pile_cc_val_loss")
    save_model(result, "runs/regmix_fit")
    best = optimize(result, prior)                         # {domain: weight}
    write_mixture_yaml("configs/mixtures/regmix.yaml", best)
    proposal = propose(result, prior, constraints=Constraints(max_kl=0.5, min_weight={"code": 0.05}))
    print([c.line() for c in proposal.checks])             # which constraints bind

Regressors: `mixlm.mixing.regressors` (lightgbm, linear, loglinear, dml, gp, bimix, perdomain, stacked);
mixture reuse over changed domain sets: `reuse_runs`; proxy fidelity across sweeps: `mixlm.mixing.fidelity`.

lightgbm, scipy and matplotlib are imported only by the functions that need them.
"""

from mixlm.mixing.fitting import (
    DEFAULT_REGRESSORS,
    REGRESSORS,
    CVScore,
    FitResult,
    cv_table,
    fit,
    join_runs,
    load_model,
    parse_target,
    save_model,
)
from mixlm.mixing.optimize import Constraints, optimize, propose
from mixlm.mixing.plots import plot_loss_vs_weight, plot_mixture, plot_predictions
from mixlm.mixing.prior import DomainPrior, load_prior, prior_from_mapping
from mixlm.mixing.regressors import make_regressor
from mixlm.mixing.reuse import reuse_runs
from mixlm.mixing.sample import dirichlet_draws, quantize, sample_mixtures, strength_grid
from mixlm.mixing.tables import (
    Table,
    domain_loss_columns,
    loss_column,
    mixtures_table,
    read_csv,
    read_mixture_yaml,
    write_csv,
    write_mixture_yaml,
)

__all__ = [
    "DEFAULT_REGRESSORS",
    "REGRESSORS",
    "CVScore",
    "Constraints",
    "DomainPrior",
    "FitResult",
    "Table",
    "cv_table",
    "dirichlet_draws",
    "domain_loss_columns",
    "fit",
    "join_runs",
    "load_model",
    "load_prior",
    "loss_column",
    "make_regressor",
    "mixtures_table",
    "optimize",
    "parse_target",
    "plot_loss_vs_weight",
    "plot_mixture",
    "plot_predictions",
    "prior_from_mapping",
    "propose",
    "quantize",
    "read_csv",
    "read_mixture_yaml",
    "reuse_runs",
    "sample_mixtures",
    "save_model",
    "strength_grid",
    "write_csv",
    "write_mixture_yaml",
]
