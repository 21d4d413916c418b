"""RegMix machinery: the sampler's invariants, RegMix's CSV layout, a fit that recovers a known law,
and an optimizer that finds that law's optimum. All data is synthetic (no ../shared)."""

import json

import numpy as np
import pytest
import yaml
from corpus import write_manifest

from mixlm.cli import main
from mixlm.errors import ConfigError
from mixlm.mixing import (
    Table,
    domain_loss_columns,
    fit,
    join_runs,
    load_model,
    load_prior,
    loss_column,
    mixtures_table,
    optimize,
    quantize,
    read_csv,
    read_mixture_yaml,
    sample_mixtures,
    save_model,
    write_csv,
)
from mixlm.mixing.plots import plot_fit
from mixlm.mixing.sample import dirichlet_draws, strength_grid
from mixlm.mixing.stats import spearman

DOMAINS = ("web", "code", "books", "wiki", "math")
TOKENS = {"web": 4e9, "code": 3e9, "books": 2e9, "wiki": 1e9, "math": 1e9}
# The known law: loss = 4 - sum_d c_d log(w_d + eps). Its optimum on the simplex has w_d + eps ∝ c_d.
LAW_C = np.array([0.30, 0.10, 0.25, 0.05, 0.20])
LAW_EPS = 1e-2
LAW_OPTIMUM = LAW_C / LAW_C.sum() * (1 + len(LAW_C) * LAW_EPS) - LAW_EPS


def law(weights_NxD):
    return 4.0 - (LAW_C * np.log(weights_NxD + LAW_EPS)).sum(axis=1)


def as_array(mixtures, domains=DOMAINS):
    return np.array([[m[d] for d in domains] for m in mixtures])


# --- sampler ----------------------------------------------------------------------------------------


def test_sampler_sums_to_one_respects_bounds_and_minimum():
    budget, max_usage, minimum = 2e9, 1.0, 0.01
    mixtures = sample_mixtures(TOKENS, 200, seed=3, token_budget=budget, max_usage=max_usage, minimum=minimum)
    w_NxD = as_array(mixtures)
    bound_D = np.array([min(1.0, max_usage * TOKENS[d] / budget) for d in DOMAINS])  # wiki, math <= 0.5
    assert w_NxD.shape == (200, 5)
    np.testing.assert_allclose(w_NxD.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(w_NxD <= bound_D + 1e-12)
    assert np.all((w_NxD == 0) | (w_NxD >= minimum - 1e-12))
    np.testing.assert_allclose(w_NxD * 100, np.round(w_NxD * 100), atol=1e-9)  # rounded to the minimum
    assert (w_NxD == 0).any(), "small strengths should have dropped some domains"
    assert w_NxD[:, 3].max() > 0.3, "the bound should bind near its value, not far below"


def test_sampler_is_deterministic_for_a_seed_and_has_no_duplicates():
    a = sample_mixtures(TOKENS, 150, seed=7, minimum=0.01)
    b = sample_mixtures(TOKENS, 150, seed=7, minimum=0.01)
    c = sample_mixtures(TOKENS, 150, seed=8, minimum=0.01)
    assert a == b
    assert a != c
    assert len({tuple(as_array([m])[0]) for m in a}) == 150


def test_sampler_errors_are_actionable():
    with pytest.raises(ConfigError, match="raise max_usage"):
        sample_mixtures(TOKENS, 4, token_budget=1e11, max_usage=1.0)  # bounds sum to 0.11
    with pytest.raises(ConfigError, match="distinct mixtures"):
        sample_mixtures({"a": 1.0, "b": 1.0}, 50, minimum=0.1, oversample=2)  # 11 distinct exist at most
    with pytest.raises(ConfigError, match="token counts"):
        sample_mixtures({"a": 0.5, "b": 0.5}, 4, token_budget=1e9)  # shares cannot give a token bound


def test_dirichlet_draws_have_the_base_mean_even_for_tiny_concentrations():
    base_D = np.array([0.6, 0.3, 0.0999, 1e-4])
    w_MxD = dirichlet_draws(base_D, strength_grid(0.01, 0.01, 1), 200_000, np.random.default_rng(0))
    assert np.all(np.isfinite(w_MxD))
    np.testing.assert_allclose(w_MxD.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(w_MxD.mean(axis=0), base_D, atol=6e-3)


def test_quantize_drops_small_weights_and_rounds_to_exact_units():
    units = quantize(np.array([[0.5049, 0.3049, 0.1852, 0.005], [0.25, 0.25, 0.25, 0.25]]), minimum=0.01)
    assert units.sum(axis=1).tolist() == [100, 100]
    assert units[0, 3] == 0  # below the minimum: dropped, the rest renormalised
    assert units[1].tolist() == [25, 25, 25, 25]


def test_strength_grid_is_log_spaced():
    np.testing.assert_allclose(strength_grid(0.1, 10.0, 3), [0.1, 1.0, 10.0])


# --- prior ------------------------------------------------------------------------------------------


def test_prior_from_manifests_and_yaml(tmp_path):
    for domain, train, validation in [("web", 300, 0), ("code", 100, 5)]:
        write_manifest(tmp_path / "prepared" / domain, train, validation)
    prior = load_prior(tmp_path / "prepared")  # the train split's tokens
    assert prior.domains == ("code", "web")
    np.testing.assert_allclose(prior.tokens_D, [100, 300])
    np.testing.assert_allclose(prior.usage_bounds(2.0, token_budget=400), [0.5, 1.0])
    np.testing.assert_allclose(prior.tempered(0.0), [0.5, 0.5])
    np.testing.assert_allclose(prior.tempered(1.0), [0.25, 0.75])

    (tmp_path / "shares.yaml").write_text("train:\n  a: 0.2\n  b: 0.8\nvalid:\n  a: 1.0\n")  # RegMix form
    shares = load_prior(tmp_path / "shares.yaml")
    assert shares.tokens_D is None
    np.testing.assert_allclose(shares.usage_bounds(3.0), [0.6, 1.0])  # RegMix: max_usage x share
    (tmp_path / "counts.yaml").write_text("web: 3e9\ncode: 1e9\n")  # YAML reads 3e9 as a string
    np.testing.assert_allclose(load_prior(tmp_path / "counts.yaml").tokens_D, [3e9, 1e9])
    (tmp_path / "bad.yaml").write_text("web: lots\ncode: 1e9\n")
    with pytest.raises(ConfigError, match="web: 'lots' is not a number of tokens or a share"):
        load_prior(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="run `mixlm prepare`"):
        load_prior(tmp_path)
    with pytest.raises(ConfigError, match="missing from the prior"):
        prior.reorder(("code", "books"))
    # a subset (the training domains of a folder that also holds an eval-only target): shares renormalised
    write_manifest(tmp_path / "prepared" / "target", 600)
    sub = load_prior(tmp_path / "prepared", domains=["web", "code"])
    assert sub.domains == ("web", "code")
    np.testing.assert_allclose(sub.shares_D, [0.75, 0.25])
    np.testing.assert_allclose(sub.tokens_D, [300, 100])
    with pytest.raises(ConfigError, match=r"not in the prior: \['books'\]"):
        load_prior(tmp_path / "prepared", domains=["web", "books"])


# --- tables -----------------------------------------------------------------------------------------


def test_reads_regmix_csv_layout_and_joins_on_index(tmp_path):
    (tmp_path / "mix.csv").write_text("index,train_a,train_b\n1,0.25,0.75\n2,1.0,0.0\n3,0.5,0.5\n4,0.1,0.9\n")
    (tmp_path / "loss.csv").write_text(  # other order, run 2 missing, run 4 unfinished
        "index,metric/a_val_loss,metric/b_val_loss\n3,4.5,5.5\n1,4.0,6.0\n4,,\n"
    )
    mixtures, results = read_csv(tmp_path / "mix.csv"), read_csv(tmp_path / "loss.csv")
    assert mixtures.weight_columns() == ("train_a", "train_b")
    index_N, w_NxD, target_N = join_runs(mixtures, results, "metric/a_val_loss,metric/b_val_loss")
    assert index_N.tolist() == [1, 3]
    np.testing.assert_allclose(w_NxD, [[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(target_N, [5.0, 5.0])  # the mean of the two columns
    assert domain_loss_columns(mixtures.weight_columns(), results.columns) == {
        "train_a": "metric/a_val_loss",
        "train_b": "metric/b_val_loss",
    }
    with pytest.raises(ConfigError, match="close: \\['metric/a_val_loss'"):
        join_runs(mixtures, results, "metric/a_val_los")

    # A sweep table with weights and losses in one file: metric/ columns are not weights.
    sweep = Table(
        np.array([7, 8]), ("a", "b", loss_column("a")), np.array([[0.5, 0.5, 3.0], [0.2, 0.8, 3.5]])
    )
    write_csv(tmp_path / "sweep.csv", sweep)
    back = read_csv(tmp_path / "sweep.csv")
    assert back.columns == sweep.columns and back.index_N.tolist() == [7, 8]
    np.testing.assert_array_equal(back.values_NxC, sweep.values_NxC)
    assert back.weight_columns() == ("a", "b")


# --- fit + optimize on a known law ------------------------------------------------------------------


@pytest.fixture(scope="module")
def law_fit():
    mixtures = sample_mixtures(TOKENS, 400, seed=1, minimum=1e-3)
    table = mixtures_table(mixtures, DOMAINS)
    results = Table(table.index_N, ("metric/target",), law(table.values_NxC)[:, None])
    return fit(table, results, "metric/target", regressors=("lightgbm", "linear", "loglinear"), folds=5, seed=0)


def test_fit_recovers_a_known_law(law_fit):
    assert law_fit.domains == DOMAINS and law_fit.target == ("metric/target",)
    assert law_fit.cv["loglinear"].spearman > 0.99
    assert law_fit.cv["lightgbm"].spearman > 0.97
    held_out = as_array(sample_mixtures(TOKENS, 200, seed=99, minimum=1e-3))
    assert spearman(law(held_out), law_fit.predict(held_out, "loglinear")) > 0.99
    assert spearman(law(held_out), law_fit.predict(held_out, "lightgbm")) > 0.99
    # The linear baseline cannot bend, so it ranks this law worse: the scores tell them apart.
    assert law_fit.cv["linear"].spearman < law_fit.cv["loglinear"].spearman


def test_optimize_finds_the_laws_optimum(law_fit):
    exact = as_array([optimize(law_fit, TOKENS, regressor="loglinear", seed=0)])[0]
    np.testing.assert_allclose(exact, LAW_OPTIMUM, atol=0.02)
    boosted = as_array([optimize(law_fit, TOKENS, n_samples=30_000, seed=0, regressor="lightgbm")])[0]
    np.testing.assert_allclose(boosted, LAW_OPTIMUM, atol=0.05)
    assert law(boosted[None])[0] - law(LAW_OPTIMUM[None])[0] < 0.01


def test_optimize_honours_the_repetition_bound(law_fit):
    # An 11e9-token run may read each domain 1.5 times: math (optimum 0.22) is capped at 1.5/11 = 0.136.
    weights = optimize(law_fit, TOKENS, regressor="loglinear", max_usage=1.5, token_budget=11e9, seed=0)
    assert sum(weights.values()) == pytest.approx(1.0)
    for d in DOMAINS:
        assert weights[d] <= 1.5 * TOKENS[d] / 11e9 + 1e-12
    assert weights["math"] > 0.1
    with pytest.raises(ConfigError, match="raise max_usage"):
        optimize(law_fit, TOKENS, max_usage=1.0, token_budget=2e10)


def test_model_round_trips_through_a_directory(law_fit, tmp_path):
    save_model(law_fit, tmp_path / "model")
    plot_fit(law_fit, tmp_path / "model" / "scatter.png")
    loaded = load_model(tmp_path / "model")
    probe = as_array(sample_mixtures(TOKENS, 20, seed=5, minimum=1e-3))
    for kind in ("lightgbm", "linear", "loglinear"):
        np.testing.assert_allclose(loaded.predict(probe, kind), law_fit.predict(probe, kind), rtol=1e-12)
    # the chooser picks the best held-out Spearman: on this log-linear law, the log-linear fit
    assert loaded.cv == law_fit.cv and loaded.primary == law_fit.primary == "loglinear"
    assert loaded.choice == law_fit.choice and loaded.choice.startswith(
        "loglinear: highest per-fold Spearman"
    )
    assert (tmp_path / "model" / "scatter.png").stat().st_size > 0


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_sample_fit_predict_optimize(tmp_path, capsys):
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(TOKENS, sort_keys=False))
    assert (
        main(
            [
                "mix",
                "sample",
                "--prior",
                str(tmp_path / "prior.yaml"),
                "-n",
                "120",
                "--seed",
                "2",
                "--minimum",
                "0.001",
                "--out",
                str(tmp_path / "mixtures"),
            ]
        )
        == 0
    )
    first = read_mixture_yaml(tmp_path / "mixtures" / "mixture_0001.yaml")
    assert sum(first.values()) == pytest.approx(1.0) and all(w > 0 for w in first.values())
    table = read_csv(tmp_path / "mixtures" / "mixtures.csv")
    assert table.columns == DOMAINS and table.index_N.tolist() == list(range(1, 121))
    # Per-domain losses in RegMix's column names, as `mixlm sweep` would write them.
    losses_NxD = 5.0 - 0.3 * np.log(table.values_NxC + 1e-2)
    write_csv(
        tmp_path / "results.csv", Table(table.index_N, tuple(loss_column(d) for d in DOMAINS), losses_NxD)
    )

    assert (
        main(
            [
                "mix",
                "fit",
                "--mixtures",
                str(tmp_path / "mixtures" / "mixtures.csv"),
                "--results",
                str(tmp_path / "results.csv"),
                "--target",
                f"{loss_column('web')},{loss_column('code')}",
                "--regressors",
                "lightgbm,loglinear",
                "--folds",
                "3",
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| loglinear |" in out and "| lightgbm |" in out
    for name in ("model.json", "lightgbm.txt", "scatter.png", "loss_vs_weight.png", "cv_predictions.csv"):
        assert (tmp_path / "model" / name).is_file(), name

    assert (
        main(
            [
                "mix",
                "predict",
                "--model",
                str(tmp_path / "model"),
                "--mixtures",
                str(tmp_path / "mixtures" / "mixtures.csv"),
                "--out",
                str(tmp_path / "pred.csv"),
            ]
        )
        == 0
    )
    predicted = read_csv(tmp_path / "pred.csv")
    assert predicted.columns == ("predicted",) and len(predicted) == 120

    assert (
        main(
            [
                "mix",
                "optimize",
                "--model",
                str(tmp_path / "model"),
                "--prior",
                str(tmp_path / "prior.yaml"),
                "--samples",
                "5000",
                "--top-k",
                "16",
                "--regressor",
                "loglinear",
                "--out",
                str(tmp_path / "best.yaml"),
            ]
        )
        == 0
    )
    best = read_mixture_yaml(tmp_path / "best.yaml")
    assert set(best) <= set(DOMAINS) and sum(best.values()) == pytest.approx(1.0, abs=1e-8)
    assert best["web"] + best["code"] > 0.8  # the target is web + code loss
    assert (tmp_path / "best.png").is_file()

    assert (
        main(
            [
                "mix",
                "fit",
                "--mixtures",
                str(tmp_path / "mixtures" / "mixtures.csv"),
                "--results",
                str(tmp_path / "results.csv"),
                "--target",
                "nope",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_lightgbm_learns_from_a_small_sweep():
    """With 40 runs, LightGBM's default 20 rows per leaf allowed one split per tree and the model
    predicted a constant (NaN Spearman); leaves now scale down below 200 rows."""
    import numpy as np

    from mixlm.mixing import fit, mixtures_table, prior_from_mapping, sample_mixtures
    from mixlm.mixing.tables import Table

    prior = prior_from_mapping({"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1})
    table = mixtures_table(sample_mixtures(prior, 40, seed=1), prior.domains)
    y_N = 4 - (np.log(table.values_NxC + 0.01) * np.array([0.5, 0.3, 0.8, 0.2])).sum(1)
    result = fit(
        table,
        Table(table.index_N, ("metric/x_val_loss",), y_N[:, None]),
        "metric/x_val_loss",
        regressors=("lightgbm",),
        folds=5,
    )
    assert result.cv["lightgbm"].spearman > 0.5


def test_cli_sample_domains_leaves_an_eval_only_domain_out(tmp_path):
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump({**TOKENS, "target": 5e9}, sort_keys=False))
    args = ["mix", "sample", "--prior", str(tmp_path / "prior.yaml"), "-n", "10", "--out"]
    assert main([*args, str(tmp_path / "m"), "--domains", ",".join(DOMAINS)]) == 0
    assert read_csv(tmp_path / "m" / "mixtures.csv").columns == DOMAINS
    assert main([*args, str(tmp_path / "bad"), "--domains", "web,cod"]) == 2  # names the missing domain


# --- honest model choice ----------------------------------------------------------------------------


class _Constant:
    """A regressor that predicts the training mean (ties every held-out fold) on the calls listed in
    `tied_calls` (all when None), else a least-squares fit."""

    def __init__(self, calls, tied_calls=None):
        self.calls, self.tied_calls = calls, tied_calls

    def fit(self, x_NxD, y_N):
        self.calls.append(len(y_N))
        self.tied = self.tied_calls is None or len(self.calls) in self.tied_calls
        self.mean = float(y_N.mean())
        self.coef_D = np.linalg.lstsq(x_NxD, y_N, rcond=None)[0]
        return self

    def predict(self, x_MxD):
        return np.full(len(x_MxD), self.mean) if self.tied else x_MxD @ self.coef_D

    def save(self, directory):
        return {"eps": None, "coef": self.coef_D.tolist()}


def _small_sweep(n, seed=1):
    table = mixtures_table(sample_mixtures(TOKENS, n, seed=seed, minimum=1e-3), DOMAINS)
    return table, Table(table.index_N, ("metric/target",), law(table.values_NxC)[:, None])


def _force_lightgbm(monkeypatch, tied_calls=None):
    from mixlm.mixing import fitting as regression

    calls, original = [], regression.make_regressor
    monkeypatch.setattr(
        regression,
        "make_regressor",
        lambda kind, seed=0: _Constant(calls, tied_calls) if kind == "lightgbm" else original(kind, seed),
    )


def test_cv_with_tied_predictions_is_reported_not_nan_and_never_chosen(monkeypatch, tmp_path):
    from mixlm.mixing.fitting import cv_table

    _force_lightgbm(monkeypatch)  # every fold tied
    table, results = _small_sweep(60)
    result = fit(table, results, "metric/target", regressors=("lightgbm", "loglinear"), folds=5, repeats=3)
    tied = result.cv["lightgbm"]
    assert tied.defined_folds == 0 and tied.undefined == {"tied predictions": 15} and not tied.eligible
    assert result.primary == "loglinear"
    assert "not eligible: lightgbm (15 of 15 folds undefined: 15 tied predictions)" in result.choice
    printed = cv_table(result)
    assert "nan" not in printed.lower() and "| lightgbm | undefined |" in printed
    assert "0 of 15 (15 tied predictions)" in printed
    assert any("lightgbm: 15 of 15 folds undefined" in w for w in result.warnings)
    save_model(result, tmp_path / "fit")
    plot_fit(result, tmp_path / "fit" / "scatter.png")

    def no_nan(name):
        raise AssertionError(f"model.json holds {name}")

    meta = json.loads((tmp_path / "fit" / "model.json").read_text(), parse_constant=no_nan)
    assert meta["cv"]["lightgbm"]["spearman"] is None and meta["choice"]["model"] == "loglinear"
    del meta["regressors"]["lightgbm"]  # the stand-in wrote no booster
    (tmp_path / "fit" / "model.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "fit")
    assert np.isnan(loaded.cv["lightgbm"].spearman) and loaded.choice == result.choice


def test_cv_counts_some_tied_folds_and_excludes_a_model_tied_in_most(monkeypatch):
    table, results = _small_sweep(60)
    _force_lightgbm(monkeypatch, tied_calls={1})  # the first of 5 folds ties
    one = fit(table, results, "metric/target", regressors=("lightgbm",), folds=5, repeats=1).cv["lightgbm"]
    assert (one.defined_folds, one.undefined, one.eligible) == (4, {"tied predictions": 1}, True)
    assert np.isfinite(one.spearman) and one.undefined_note() == "1 of 5 folds undefined: 1 tied predictions"
    _force_lightgbm(monkeypatch, tied_calls={1, 2, 3})  # 3 of 5: more than half, never chosen
    result = fit(table, results, "metric/target", regressors=("lightgbm", "linear"), folds=5, repeats=1)
    assert np.isfinite(result.cv["lightgbm"].spearman) and not result.cv["lightgbm"].eligible
    assert result.primary == "linear"
    _force_lightgbm(monkeypatch, tied_calls={1, 2, 3})
    with pytest.raises(ConfigError, match="no regressor has a defined held-out Spearman"):
        fit(table, results, "metric/target", regressors=("lightgbm",), folds=5, repeats=1)


def test_lightgbm_on_six_runs_reports_its_folds_and_warns():
    table, results = _small_sweep(6)
    result = fit(table, results, "metric/target", regressors=("lightgbm", "loglinear"), folds=3)
    for score in result.cv.values():
        assert score.total_folds == 9 and score.scored_folds + sum(score.undefined.values()) == 9
    assert result.cv[result.primary].eligible
    assert any(w.startswith("only 6 runs for 5 domains") and "run 44 more" in w for w in result.warnings)


def test_repeated_kfold_gives_a_standard_error():
    table, results = _small_sweep(60)  # linear cannot fit the log law exactly: the folds differ
    result = fit(table, results, "metric/target", regressors=("linear",), folds=5)  # small: 3 repeats
    score = result.cv["linear"]
    assert (score.folds, score.repeats, score.scored_folds) == (5, 3, 15)
    assert 0 < score.spearman_se < score.spearman_std
    np.testing.assert_allclose(score.spearman_se, score.spearman_std * np.sqrt(15 / 14) / np.sqrt(15))
    assert np.isfinite(score.pooled_spearman) and score.pooled_spearman > 0.2
    once = fit(table, results, "metric/target", regressors=("linear",), folds=5, repeats=1).cv["linear"]
    assert once.repeats == 1 and once.total_folds == 5 and once.spearman != score.spearman


def test_cli_fit_prints_and_saves_the_choice_and_warns_of_few_runs(tmp_path, capsys):
    table, results = _small_sweep(12)
    write_csv(tmp_path / "mixtures.csv", table)
    write_csv(tmp_path / "results.csv", results)
    args = [
        "mix",
        "fit",
        "--mixtures",
        str(tmp_path / "mixtures.csv"),
        "--results",
        str(tmp_path / "results.csv"),
    ]
    assert (
        main(
            [
                *args,
                "--target",
                "metric/target",
                "--folds",
                "3",
                "--repeats",
                "2",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert f"chosen: {meta['choice']['reason']}" in out and meta["choice"]["model"] == meta["primary"]
    # no --regressors: the default panel, with the GP and a stack over it (they scored best on RegMix's runs)
    assert {"lightgbm", "linear", "loglinear", "gp", "stacked:gp+lightgbm+loglinear"} == set(meta["regressors"])
    assert "fitted gp: cross-validation and the final fit in" in err
    assert "per-fold mean ± SE" in out and "Spearman pooled" in out and "(3-fold x 2)" in out
    assert "warning: only 12 runs for 5 domains" in out and "run 38 more proxies (50 in all)" in out
    assert meta["warnings"][0].startswith("only 12 runs for 5 domains")


# --- the natural mixture, predictions for mixture YAMLs, weights that do not sum to 1 -------------------


def _prepared_manifests(root, tokens):
    for domain, count in tokens.items():
        write_manifest(root / domain, count, 7)
    return root


def test_cli_prior_writes_the_natural_mixture_train_reads(tmp_path, capsys):
    from mixlm.data.mixture import parse_mixture

    prepared = _prepared_manifests(tmp_path / "prepared", {"web": 300, "code": 100, "target": 600})
    assert main(["mix", "prior", "--prior", str(prepared), "--domains", "web,code", "--out",
                 str(tmp_path / "natural.yaml")]) == 0
    assert "wrote" in capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "natural.yaml").read_text())
    assert written == {"web": 0.75, "code": 0.25}  # 300 and 100 of 400 train tokens, exactly
    mixture = parse_mixture(written, known_domains=["code", "target", "web"])  # what `mixlm train` does with it
    assert mixture.stages[0].weights == {"code": 0.25, "web": 0.75}
    assert main(["mix", "prior", "--prior", str(prepared), "--out", str(tmp_path / "all.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "all.yaml").read_text()) == {"code": 0.1, "target": 0.6, "web": 0.3}
    assert main(["mix", "prior", "--prior", str(prepared), "--domains", "web,books", "--out",
                 str(tmp_path / "x.yaml")]) == 2
    assert "not in the prior: ['books']" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


@pytest.fixture(scope="module")
def loglinear_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loglinear")
    table, results = _small_sweep(40)
    save_model(fit(table, results, "metric/target", regressors=("loglinear",), folds=4, repeats=1), folder)
    return folder


def test_cli_predict_takes_mixture_yamls_as_train_reads_them(loglinear_model, tmp_path, capsys):
    import warnings

    from mixlm.data.mixture import MixtureWeightsWarning

    model = load_model(loglinear_model)
    natural = {d: TOKENS[d] / sum(TOKENS.values()) for d in DOMAINS}
    (tmp_path / "natural.yaml").write_text(yaml.safe_dump(natural))
    (tmp_path / "two.yaml").write_text("web: 0.5\ncode: 0.5\n")  # the other domains weigh 0
    (tmp_path / "over.yaml").write_text("web: 0.6\ncode: 0.6\n")  # sums to 1.2: normalised, and said so
    with pytest.warns(MixtureWeightsWarning) as caught:
        assert main(["mix", "predict", "--model", str(loglinear_model), "--mixtures", str(tmp_path / "natural.yaml"),
                     str(tmp_path / "two.yaml"), str(tmp_path / "over.yaml"), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(caught) == 1
    line = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno)
    assert line.count("\n") == 1 and "over.yaml: weights sum to 1.2, not 1; normalised" in line
    predicted = read_csv(tmp_path / "p.csv")
    assert predicted.index_N.tolist() == [1, 2, 3]
    half = [0.5 if d in ("web", "code") else 0.0 for d in DOMAINS]
    expected = model.predict(np.array([[natural[d] for d in DOMAINS], half, half]))
    np.testing.assert_allclose(predicted.values_NxC[:, 0], expected, rtol=1e-9)
    assert "two.yaml" in capsys.readouterr().out

    (tmp_path / "typo.yaml").write_text("web: 0.5\ncdoe: 0.5\n")
    assert main(["mix", "predict", "--model", str(loglinear_model), "--mixtures", str(tmp_path / "typo.yaml"),
                 "--out", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert "unknown domain 'cdoe'; did you mean code?" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.csv").exists()


def test_weights_not_summing_to_one_are_normalised_with_one_line():
    import warnings

    from mixlm.data.mixture import MixtureWeightsWarning, parse_mixture

    with pytest.warns(MixtureWeightsWarning, match=r"^data.mixture: weights sum to 1.2, not 1; normalised"):
        mixture = parse_mixture({"a": 0.6, "b": 0.6})
    assert mixture.stages[0].weights == {"a": 0.5, "b": 0.5}
    staged = {"weights": {"a": 1.0}, "stages": [{"step": 10, "weights": {"a": 3, "b": 1}}]}
    with pytest.warns(MixtureWeightsWarning, match=r"\(stage from step 10\): weights sum to 4, not 1"):
        parse_mixture(staged)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixtureWeightsWarning)
        parse_mixture({"a": 0.25, "b": 0.75})
        parse_mixture({"a": 0.333333333, "b": 0.666666666})  # written to 9 digits: 1 - 1e-9


def test_mix_help_names_every_action():
    import argparse

    from mixlm.cli import COMMANDS
    from mixlm.commands import mix

    parser = argparse.ArgumentParser()
    mix.add_arguments(parser)
    actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"prior", "fidelity"} <= set(actions)
    for name in actions:
        assert f" {name}" in COMMANDS["mix"][1], name
