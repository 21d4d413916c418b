"""The mixture-search panel (issue 15): every regressor recovers a known synthetic law and its optimum; the
constrained proposer keeps every constraint (hand cases); proxy fidelity on sweeps with a hand-computed
Spearman; mixture reuse keeps and drops the right runs; every kind round-trips through save/load.
All data is synthetic (no ../shared)."""

import numpy as np
import pytest
import yaml
from corpus import write_manifest

from mixlm.cli import main
from mixlm.errors import ConfigError
from mixlm.mixing import (
    Table,
    fit,
    load_model,
    mixtures_table,
    read_csv,
    sample_mixtures,
    save_model,
    write_csv,
)
from mixlm.mixing.fidelity import agreement, fidelity, load_sweep
from mixlm.mixing.fitting import FitResult
from mixlm.mixing.optimize import Constraints, kl_to_prior, propose
from mixlm.mixing.regressors import REGRESSORS, fit_regressor, make_regressor
from mixlm.mixing.reuse import reuse_runs
from mixlm.mixing.stats import spearman

DOMAINS = ("web", "code", "books", "wiki")
TOKENS = {"web": 4e9, "code": 3e9, "books": 2e9, "wiki": 1e9}
SHARES = np.array([0.4, 0.3, 0.2, 0.1])


def loglinear_law(w_NxD):
    return 4.0 - (np.array([0.30, 0.10, 0.25, 0.15]) * np.log(w_NxD + 1e-2)).sum(axis=1)


def domain_losses(w_NxD):
    """Per-domain losses [N, 4]: each falls with its own weight, a little with the others'."""
    own_D = np.array([0.5, 0.3, 0.4, 0.2])
    return 3.0 + np.array([1.0, 0.5, 0.8, 0.6]) - own_D * np.log(w_NxD + 1e-2) - 0.05 * w_NxD.sum(axis=1, keepdims=True)


LAWS = {
    "linear": lambda w: 3.0 + w @ np.array([0.5, -0.2, 0.3, 0.1]),
    "loglinear": loglinear_law,
    "dml": lambda w: 2.0 + 0.5 * np.exp(w @ np.array([-2.0, 0.5, -1.0, 1.0])),  # Data Mixing Laws' form
    "bimix": lambda w: 1.5 + 0.8 * (0.01 + w @ np.array([0.6, 0.3, 0.1, 0.0])) ** -0.4,  # own share + transfer
    "gp": loglinear_law,
    "lightgbm": loglinear_law,
    "perdomain": lambda w: domain_losses(w).mean(axis=1),
    "stacked:linear+loglinear+dml": loglinear_law,
}
TRAIN_RUNS = {"lightgbm": 400, "gp": 100}  # boosted trees need more runs than the smooth models to rank within 0.01


def mixtures(n, seed):
    return np.array([[m[d] for d in DOMAINS] for m in sample_mixtures(TOKENS, n, seed=seed, minimum=1e-3)])


@pytest.fixture(scope="module")
def held_out():
    return mixtures(200, seed=99)


class _Law:
    """The true law as a regressor: the optimum `optimize` finds with it is the law's own."""

    has_std = False

    def __init__(self, law):
        self.law = law

    def predict(self, w_MxD):
        return self.law(w_MxD)


def _model(regressors, domains=DOMAINS):
    return FitResult(tuple(domains), ("metric/t",), regressors, {}, np.zeros(0, np.int64), np.zeros(0),
                     primary=next(iter(regressors)))


@pytest.mark.parametrize("kind", list(LAWS))
def test_each_regressor_recovers_its_law_and_optimum(kind, held_out):
    law = LAWS[kind]
    x_NxD = mixtures(TRAIN_RUNS.get(kind, 150), seed=1)
    parts = domain_losses(x_NxD) if kind == "perdomain" else None
    model = fit_regressor(make_regressor(kind, seed=0), x_NxD, law(x_NxD), parts)
    assert spearman(law(held_out), model.predict(held_out)) > 0.99
    both = _model({"true": _Law(law), kind: model})
    settings = {"n_samples": 20_000, "top_k": 64, "seed": 3}
    truth = propose(both, TOKENS, regressor="true", **settings).weights
    found = propose(both, TOKENS, regressor=kind, **settings).weights
    np.testing.assert_allclose([found[d] for d in DOMAINS], [truth[d] for d in DOMAINS], atol=0.05)


def test_gp_and_perdomain_gp_give_a_predictive_std(held_out):
    x_NxD = mixtures(80, seed=1)
    gp = make_regressor("gp").fit(x_NxD, loglinear_law(x_NxD))
    std_M = gp.predict_std(held_out)
    assert std_M.shape == (200,) and np.all(std_M > 0)
    far = np.array([[0.97, 0.01, 0.01, 0.01]])  # a corner: fewer training runs nearby, wider interval
    assert gp.predict_std(far)[0] > np.median(std_M)
    model = _model({"gp": gp})
    proposal = propose(model, TOKENS, n_samples=5000, top_k=32)
    assert proposal.predicted_std is not None and proposal.predicted_std > 0
    x_NxD = x_NxD[:30]
    per = fit_regressor(make_regressor("perdomain:gp"), x_NxD, domain_losses(x_NxD).mean(1), domain_losses(x_NxD))
    assert per.has_std and np.all(per.predict_std(held_out[:5]) > 0)


def test_stacked_puts_its_weight_on_the_right_base():
    x_NxD = mixtures(150, seed=1)
    stacked = make_regressor("stacked:linear+loglinear").fit(x_NxD, loglinear_law(x_NxD))
    assert stacked.blend.get("loglinear", 0) > 0.9 and stacked.blend.get("linear", 0) < 0.1


def test_unknown_regressors_are_refused_with_the_choices():
    for bad, match in (("forest", "choose from lightgbm"), ("perdomain:stacked", "single model"),
                       ("stacked:gp+stacked", "cannot stack"), ("perdomain:nope", "unknown regressor")):
        with pytest.raises(ConfigError, match=match):
            make_regressor(bad)


def test_every_kind_round_trips_through_save_and_load(tmp_path):
    x_NxD = mixtures(40, seed=4)
    parts_NxT = domain_losses(x_NxD)
    kinds = tuple(k for k in REGRESSORS if k != "stacked") + ("perdomain:lightgbm", "stacked:dml+lightgbm")
    fitted = {k: fit_regressor(make_regressor(k), x_NxD, parts_NxT.mean(1), parts_NxT) for k in kinds}
    result = _model(fitted)
    save_model(result, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    probe = x_NxD[:7] * 0.9 + 0.1 / len(DOMAINS)
    for kind in kinds:
        np.testing.assert_allclose(loaded.predict(probe, kind), result.predict(probe, kind), rtol=1e-9, err_msg=kind)
    np.testing.assert_allclose(loaded.predict_std(probe, "gp"), result.predict_std(probe, "gp"), rtol=1e-7)
    assert loaded.predict_std(probe, "lightgbm") is None and loaded.primary == result.primary
    assert len(list((tmp_path / "m").glob("*.txt"))) == 1 + 4 + 1  # lightgbm, perdomain:lightgbm, the stack's


def test_fit_scores_and_chooses_among_the_panel():
    table = mixtures_table(sample_mixtures(TOKENS, 60, seed=4, minimum=1e-3), DOMAINS)
    columns = tuple(f"metric/{d}_val_loss" for d in DOMAINS)
    results = Table(table.index_N, columns, domain_losses(table.values_NxC))
    result = fit(table, results, list(columns), regressors=("linear", "perdomain", "dml"), folds=3, repeats=1)
    assert result.primary == "perdomain" and result.cv["perdomain"].spearman > 0.99  # the law is per domain


# --- the constrained proposer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corner_model():
    """Loss falls with the web share (optimum: all web), so every bound below has something to bind."""
    return _model({"true": _Law(lambda w: 3.0 - w[:, 0] + 0.1 * w[:, 1])})


SETTINGS = {"n_samples": 20_000, "top_k": 32, "seed": 0}


def test_kl_and_l1_bounds_hold_and_are_reported_as_binding(corner_model):
    free = propose(corner_model, TOKENS, **SETTINGS)
    assert free.weights["web"] > 0.8 and not free.binding
    for bound, name in ((Constraints(max_kl=0.1), "KL to prior"), (Constraints(max_l1=0.3), "L1 to prior")):
        proposal = propose(corner_model, TOKENS, constraints=bound, **SETTINGS)
        w_D = np.array([proposal.weights[d] for d in DOMAINS])
        kl = float(np.sum(np.where(w_D > 0, w_D * np.log(np.where(w_D > 0, w_D, 1) / SHARES), 0)))  # by hand
        if bound.max_kl is not None:
            assert kl <= 0.1 + 1e-9 and kl == pytest.approx(kl_to_prior(w_D[None], SHARES)[0])
        else:
            assert np.abs(w_D - SHARES).sum() <= 0.3 + 1e-9
        assert proposal.binding == [name] and w_D[0] > SHARES[0]  # still leans to web, as far as allowed
        assert sum(proposal.weights.values()) == pytest.approx(1.0)


def test_epoch_limits_and_weight_bounds_hold(corner_model):
    budget, epochs = 8e9, 1.0  # each domain read at most once: w_web <= 4e9 / 8e9 = 0.5, wiki <= 0.125
    proposal = propose(corner_model, TOKENS, max_usage=epochs, token_budget=budget, **SETTINGS)
    for d in DOMAINS:
        assert proposal.weights[d] * budget / TOKENS[d] <= epochs + 1e-9
    assert proposal.weights["web"] > 0.4 and "max weight / epochs" in proposal.binding
    bounded = Constraints(min_weight={"wiki": 0.2}, max_weight=0.5)
    proposal = propose(corner_model, TOKENS, constraints=bounded, **SETTINGS)
    assert proposal.weights["wiki"] >= 0.2 - 1e-12 and max(proposal.weights.values()) <= 0.5 + 1e-12
    assert set(proposal.binding) == {"max weight / epochs", "min weight"}


def test_small_weights_are_written_as_exact_zeros(corner_model, tmp_path):
    from mixlm.mixing import read_mixture_yaml, write_mixture_yaml

    proposal = propose(corner_model, TOKENS, constraints=Constraints(zero_below=0.05, max_weight=0.9), **SETTINGS)
    weights = proposal.weights
    assert all(w == 0 or w >= 0.05 for w in weights.values()) and sum(weights.values()) == pytest.approx(1.0)
    assert proposal.zeroed and all(weights[d] == 0 for d in proposal.zeroed)
    assert max(weights.values()) <= 0.9 + 1e-12  # renormalising after the zeroing kept the bound
    write_mixture_yaml(tmp_path / "m.yaml", weights)
    text = (tmp_path / "m.yaml").read_text()
    assert "e-" not in text and set(read_mixture_yaml(tmp_path / "m.yaml")) == {d for d, w in weights.items() if w}


def test_impossible_constraints_are_one_line_errors(corner_model, tmp_path, capsys):
    for bound, match in (
        (Constraints(min_weight=0.3), "min weights sum to 1.2 > 1"),
        (Constraints(max_weight=0.2), "sum to 0.8 < 1"),
        (Constraints(min_weight={"web": 0.6}, max_weight={"web": 0.5}), "web \\(min 0.6 > max 0.5\\)"),
        (Constraints(min_weight={"web": 1e-3}, zero_below=1e-2), "below the zeroing threshold"),
        (Constraints(max_kl=1e-6, min_weight={"wiki": 0.5}), "met the constraints"),
    ):
        with pytest.raises(ConfigError, match=match):
            propose(corner_model, TOKENS, constraints=bound, **SETTINGS)
    # the CLI: exit 2 and one line naming the flag's problem (a GP fitted here, saved as `mix fit` would)
    x_NxD = mixtures(30, seed=2)
    save_model(_model({"gp": make_regressor("gp").fit(x_NxD, loglinear_law(x_NxD))}), tmp_path / "m")
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(TOKENS))
    base = ["mix", "optimize", "--model", str(tmp_path / "m"), "--prior", str(tmp_path / "prior.yaml"),
            "--samples", "4000", "--top-k", "16", "--out", str(tmp_path / "best.yaml")]
    capsys.readouterr()
    assert main([*base, "--min-weight", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "min weights sum to 1.2 > 1" in err and len(err.splitlines()) == 1
    assert main([*base, "--min-weight", "web=lots"]) == 2
    assert main([*base, "--max-kl", "0.2", "--regressor", "gp", "--max-epochs", "2", "--token-budget", "1e10"]) == 0
    out = capsys.readouterr().out
    assert "constraint: KL to prior <= 0.2" in out and "(gp std)" in out
    assert "KL to prior" in (tmp_path / "best.yaml").read_text()  # the comment records the constraints


# --- proxy fidelity --------------------------------------------------------------------------------------


def _sweep_folder(path, losses, weights_NxD, steps, tokens):
    """A sweep folder as `mixlm sweep` writes it: results.csv, runs/0001/config.yaml, prepared manifests."""

    index_N = np.arange(1, len(losses) + 1)
    values = np.concatenate([weights_NxD, np.asarray(losses, float)[:, None]], axis=1)
    write_csv(path / "results.csv", Table(index_N, ("a", "b", "metric/val_loss"), values))
    for d, t in tokens.items():
        write_manifest(path / "prepared" / d, t)
    (path / "runs" / "0001").mkdir(parents=True)
    config = {"train": {"steps": steps, "global_batch_size": 10}, "data": {"seq_len": 10,
              "prepared_dir": str(path / "prepared")}}
    (path / "runs" / "0001" / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def test_fidelity_of_two_sweeps_with_a_hand_computed_spearman(tmp_path, capsys):
    w_NxD = np.array([[0.1, 0.9], [0.3, 0.7], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])
    tokens = {"a": 10_000, "b": 100_000}
    # ranks: A 1 2 3 4 5, B 2 1 4 3 5 -> sum d^2 = 4, Spearman = 1 - 6 * 4 / (5 * 24) = 0.8
    small = _sweep_folder(tmp_path / "small", [1, 2, 3, 4, 5, 9], w_NxD, steps=10, tokens=tokens)
    w_big = w_NxD.copy()
    w_big[5] = [0.25, 0.75]  # run 6 trained another mixture: left out, counted
    big = _sweep_folder(tmp_path / "big", [2, 1, 4, 3, 5, 0], w_big, steps=100, tokens=tokens)
    a, b = load_sweep(small), load_sweep(big)
    assert (a.budget_tokens, b.budget_tokens, a.tokens) == (1000, 10_000, tokens)
    pair = agreement(a, b, "metric/val_loss", top_k=3)
    assert pair.spearman == pytest.approx(0.8) and (pair.runs, pair.mismatched) == (5, 1)
    assert pair.overlap == pytest.approx(2 / 3) and pair.best_of_a_in_b == 2  # A's best is B's second
    report = fidelity([a, b], "metric/val_loss", top_k=2, target_budget=10_000)
    assert report.pairs[0].overlap == 1.0
    # a at weight 0.9: 0.09 epochs in the small sweep, 0.9 in the target run; b at 0.9: 0.09 both -> no warning
    assert not [w for w in report.warnings if "epochs" in w]
    report = fidelity([a, b], "metric/val_loss", target_budget=50_000)  # a: 4.5 epochs at the target's budget
    warned = [w for w in report.warnings if "epochs" in w]
    assert len(warned) == 2 and all(": a is read up to" in w for w in warned)  # both sweeps differ from 50k
    assert main(["mix", "fidelity", str(small), str(big), "--top-k", "3", "--large", str(big / "results.csv")]) == 0
    out = capsys.readouterr().out
    assert "| 0.800 | 2/3 | 2 of 5 |" in out and "Against the larger runs" in out
    assert main(["mix", "fidelity", str(small)]) == 2
    assert main(["mix", "fidelity", str(small), str(tmp_path / "nope")]) == 2


# --- mixture reuse ----------------------------------------------------------------------------------------


def test_reuse_keeps_runs_whose_domains_all_still_exist(tmp_path, capsys):
    old = Table(np.array([1, 2, 3]), ("a", "b", "c"), np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0, 0, 1.0]]))
    new = Table(np.array([4, 5]), ("a", "b", "d"), np.array([[0.2, 0.4, 0.4], [0.6, 0.2, 0.2]]))
    table, reused = reuse_runs([old, new], ["a", "b", "d"])
    assert reused.kept == (1, 4, 5) and reused.dropped == (2, 3) and reused.removed == ("c",)
    assert table.columns == ("a", "b", "d") and reused.untrained == ()
    np.testing.assert_allclose(table.values_NxC, [[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.6, 0.2, 0.2]])
    assert reused.note().startswith("reused 3 of 5 runs; dropped 2 that train on removed domains ['c']")
    _, only_old = reuse_runs(old, ["a", "b", "e"])  # 'e' added, no run has it yet
    assert only_old.kept == (1,) and only_old.added == ("e",) and only_old.untrained == ("e",)
    with pytest.raises(ConfigError, match="no run is left"):
        reuse_runs(old, ["d"])
    with pytest.raises(ConfigError, match="run id 1 is in table 1 and table 2"):
        reuse_runs([old, old], None)

    # the CLI: two sweeps' mixtures, today's domains
    rng = np.random.default_rng(0)
    w_old = rng.dirichlet(np.ones(3), 24)
    w_old[:4, 2] = 0.0
    w_old[:4] /= w_old[:4].sum(1, keepdims=True)
    w_new = rng.dirichlet(np.ones(3), 20)
    write_csv(tmp_path / "old.csv", Table(np.arange(1, 25), ("a", "b", "c"), w_old))
    write_csv(tmp_path / "new.csv", Table(np.arange(25, 45), ("a", "b", "d"), w_new))
    kept_a = np.concatenate([w_old[:4, 0], w_new[:, 0]])
    losses = Table(np.concatenate([np.arange(1, 5), np.arange(25, 45)]), ("metric/t",),
                   (3 - np.log(kept_a + 0.01))[:, None])
    write_csv(tmp_path / "res.csv", losses)
    assert main(["mix", "fit", "--mixtures", str(tmp_path / "old.csv"), str(tmp_path / "new.csv"), "--results",
                 str(tmp_path / "res.csv"), "--target", "metric/t", "--domains", "a,b,d", "--regressors",
                 "loglinear", "--folds", "3", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "runs: reused 24 of 44 runs; dropped 20 that train on removed domains ['c']" in out
    assert load_model(tmp_path / "m").domains == ("a", "b", "d")
    assert len(read_csv(tmp_path / "m" / "cv_predictions.csv")) == 24


# --- the default panel --------------------------------------------------------------------------------


def test_default_panel_scores_the_gp_and_a_stack():
    table = mixtures_table(sample_mixtures(TOKENS, 16, seed=4, minimum=1e-3), DOMAINS)
    columns = tuple(f"metric/{d}_val_loss" for d in DOMAINS)
    results = Table(table.index_N, columns, domain_losses(table.values_NxC))
    one = fit(table, results, columns[0], folds=2, repeats=1)  # no regressors named: the default panel
    assert "gp" in one.cv and any(k.startswith("stacked") and "gp" in k for k in one.cv), sorted(one.cv)
    assert {"lightgbm", "linear", "loglinear"} <= set(one.cv) and "perdomain:lightgbm" not in one.cv
    several = fit(table, results, list(columns), folds=2, repeats=1)  # a mean of columns: per-domain LightGBM too
    assert set(several.cv) == set(one.cv) | {"perdomain:lightgbm"}


def test_mix_fit_help_states_the_default_panels_cost_as_its_results_file_holds_it(capsys):
    import re
    from pathlib import Path

    from mixlm.commands.mix import DEFAULT_PANEL_COST

    results = (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "regmix_fit_default.md").read_text()
    totals = dict(re.findall(r"^## Target `(\w+)`.*: (\d+) s in all$", results, re.MULTILINE))
    assert totals and all(f"{seconds} s" in DEFAULT_PANEL_COST for seconds in totals.values()), DEFAULT_PANEL_COST
    with pytest.raises(SystemExit):
        main(["mix", "fit", "-h"])
    assert "regmix_fit_default.md" in " ".join(capsys.readouterr().out.split())
