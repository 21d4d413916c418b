"""Each online mixing strategy's single update against a hand computation (numpy only, no training), the ADO
law fit, the state round trip through JSON, and the config section's one-line errors."""

import json
import math

import numpy as np
import pytest

from mixlm.config import load_config
from mixlm.errors import ConfigError
from mixlm.mixing.online import ADO, ODM, Aioli, DomainSignal, DoReMi, Static, strategy_from_config
from mixlm.mixing.online.ado import clip_min, fit_power_law

DOMAINS = ("a", "b", "c")


def signal(step=10, nll=(30.0, 20.0, 10.0), tokens=(10.0, 10.0, 10.0), excess=None, val_loss=None,
           tokens_seen=(100.0, 100.0, 100.0), weights=(1 / 3, 1 / 3, 1 / 3), steps=1):
    as_array = (lambda x: None if x is None else np.array(x, np.float64))
    return DomainSignal(step=step, domains=DOMAINS, nll=np.array(nll), tokens=np.array(tokens), steps=steps,
                        tokens_seen=np.array(tokens_seen), weights=np.array(weights), excess=as_array(excess),
                        val_loss=as_array(val_loss))


def roundtrip(state):
    return json.loads(json.dumps(state))  # what the checkpoint stores


def test_static_never_updates():
    s = Static()
    state, decision = s.start(DOMAINS, np.array([0.5, 0.3, 0.2]), np.ones(3) / 3)
    assert decision is None and not any(s.due(state, step) for step in range(100))


def test_doremi_one_update_by_hand():
    s = DoReMi(step_size=1.0, smoothing=0.1, reference="runs/ref")
    state, decision = s.start(DOMAINS, np.array([0.5, 0.3, 0.2]), np.ones(3) / 3)
    np.testing.assert_array_equal(decision.weights, [1 / 3, 1 / 3, 1 / 3])  # alpha_0 = uniform
    state = {"alpha": [0.5, 0.3, 0.2]}
    # Clipped excess summed over each domain's tokens: 8 / 10, 0 / 10 (clipped), 2 / 4.
    state, decision = s.update(roundtrip(state), signal(tokens=(10, 10, 4), excess=(8.0, 0.0, 2.0)))
    raw = [0.5 * math.exp(0.8), 0.3 * math.exp(0.0), 0.2 * math.exp(0.5)]
    want = [0.9 * r / sum(raw) + 0.1 / 3 for r in raw]
    np.testing.assert_allclose(decision.weights, want, rtol=1e-12)
    np.testing.assert_allclose(state["alpha"], want, rtol=1e-12)
    assert s.applies_as == "objective" and s.due(state, 1)


def test_doremi_needs_a_reference_and_sane_parameters():
    with pytest.raises(ConfigError, match="mixing.options.reference"):
        DoReMi()
    with pytest.raises(ConfigError, match="step_size"):
        DoReMi(step_size=0.0, reference="r")


def test_odm_one_update_by_hand():
    s = ODM(smoothing=0.9)
    state, decision = s.start(DOMAINS, np.array([0.5, 0.3, 0.2]), np.ones(3) / 3)
    assert decision is None and state["eps"] == pytest.approx(1 / 3)
    state = {"rewards": [1.0, 2.0, 0.5], "pi": [0.5, 0.3, 0.2], "eps": 0.25, "t": 9}
    state, decision = s.update(roundtrip(state), signal(nll=(30.0, 20.0, 0.0), tokens=(10, 10, 0)))
    # domain c gave no tokens this round: its estimate stays; a and b: 0.9 R + 0.1 * loss / pi
    rewards = [0.9 * 1.0 + 0.1 * 3.0 / 0.5, 0.9 * 2.0 + 0.1 * 2.0 / 0.3, 0.5]
    eps = min(1 / 3, math.sqrt(math.log(3) / (3 * 10)))
    soft = [math.exp(0.25 * r) for r in rewards]  # eps_{t-1} in the exponent
    want = [(1 - 3 * eps) * x / sum(soft) + eps for x in soft]
    np.testing.assert_allclose(state["rewards"], rewards, rtol=1e-12)
    np.testing.assert_allclose(decision.weights, want, rtol=1e-12)
    assert state["t"] == 10 and state["eps"] == pytest.approx(eps)


def test_odm_starts_uniform_while_eps_is_at_its_cap():
    s = ODM()
    state, _ = s.start(DOMAINS, np.ones(3) / 3, np.ones(3) / 3)
    state, decision = s.update(state, signal(nll=(50.0, 10.0, 10.0)))
    np.testing.assert_allclose(decision.weights, [1 / 3] * 3)  # t = 1: sqrt(ln 3 / 3) > 1/3, so eps = 1/3


def test_ado_fit_recovers_a_known_law():
    n = np.geomspace(1e4, 1e6, 40)
    a, e, alpha = fit_power_law(n, 1.5 + 40.0 * n ** -0.4)
    assert math.exp(e) == pytest.approx(1.5, rel=0.02) and alpha == pytest.approx(0.4, abs=0.02)
    assert math.exp(a) == pytest.approx(40.0, rel=0.2)
    a, e, alpha = fit_power_law(n, np.full(40, 3.0))  # flat: all of it irreducible, nothing left to learn
    assert math.exp(e) + math.exp(a) * n[-1] ** -alpha == pytest.approx(3.0, rel=1e-3)
    assert math.exp(a) * n[-1] ** -alpha < 0.1


def test_ado_one_update_by_hand(monkeypatch):
    fits = [(math.log(20.0), math.log(1.0), 0.3), (math.log(5.0), math.log(2.0), 0.02), (math.log(10.0), 0.0, 0.5)]
    given = iter(fits)  # the fit is tested above: here the update around it, per domain in order
    monkeypatch.setattr("mixlm.mixing.online.ado.fit_power_law", lambda n, loss: next(given))
    s = ADO(every=10, min_points=3, smoothing=0.9, credit_decay=0.9, credit_power=0.5, min_weight=0.05)
    state, decision = s.start(DOMAINS, np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5]))
    assert decision is None and state["prior"] == [0.2, 0.3, 0.5]
    state["n"], state["loss"] = [[100.0] * 3, [200.0] * 3], [[3.0, 3.0, 3.0], [2.5, 2.9, 2.0]]
    sig = signal(step=30, nll=(20.0, 28.0, 0.0), tokens=(10.0, 10.0, 0.0), tokens_seen=(150.0, 100.0, 50.0))
    state, decision = s.update(roundtrip(state), sig)
    n = 300.0  # x_axis total: every domain against the 300 tokens trained on
    h = 0.9 * np.array([0.5, 0.3, 0.2]) + 0.1 * np.array([0.5, 0.5, 0.0])
    slope = np.array([0.3 * 20.0 * n ** -0.3, 0.05 * 5.0 * n ** -0.02, 0.5 * 10.0 * n ** -0.5]) / n  # alpha >= 0.05
    rho = slope * np.array([0.2, 0.3, 0.5]) * np.sqrt(h)
    rho = rho / rho.sum()
    rho = clip_min(rho, 0.05)
    p = 0.9 * np.array([0.5, 0.3, 0.2]) + 0.1 * rho
    np.testing.assert_allclose(state["h"], h, rtol=1e-12)
    np.testing.assert_allclose(decision.weights, p / p.sum(), rtol=1e-10)
    weight = 10 / 31  # p_avg moves by every / (step + 1)
    np.testing.assert_allclose(state["p_avg"], (1 - weight) * np.array([0.5, 0.3, 0.2]) + weight * rho, rtol=1e-10)
    assert state["loss"][-1] == [2.0, 2.8, 2.0]  # c gave no tokens: its last loss carried over


def test_ado_waits_for_enough_points_and_the_warmup():
    s = ADO(every=5, warmup_steps=20)
    state, _ = s.start(DOMAINS, np.ones(3) / 3, np.ones(3) / 3)
    assert not s.due(state, 15) and s.due(state, 20)
    for step in (5, 10, 15):
        state, decision = s.update(state, signal(step=step))
        assert decision is None
    with pytest.raises(ConfigError, match="min_weight=0.4 x 3 domains"):
        ADO(min_weight=0.4).start(DOMAINS, np.ones(3) / 3, np.ones(3) / 3)


def test_clip_min_keeps_a_distribution():
    np.testing.assert_allclose(clip_min(np.array([0.98, 0.015, 0.005]), 0.05), [0.9, 0.05, 0.05], rtol=1e-12)
    # b is raised to the floor, a and c shrink to make room, which pushes c under the floor too.
    np.testing.assert_allclose(clip_min(np.array([0.7, 0.01, 0.29 * 0.2 / 0.9]), 0.1), [0.8, 0.1, 0.1], rtol=1e-12)


def test_aioli_weights_from_gains_by_hand():
    s = Aioli(step_size=0.5, one_hot_factor=0.75)
    gains = np.array([[0.3, 0.1], [0.0, 0.2]])  # G[i, j]: domain i's loss decrease per probe of j
    w = np.array([[0.75, 0.25], [0.25, 0.75]])
    inv = np.array([[0.75, -0.25], [-0.25, 0.75]]) / (0.75 * 0.75 - 0.25 * 0.25)
    a = gains @ inv.T  # A[i] = W^-1 G[i]
    np.testing.assert_allclose(a @ w.T, gains)
    a = (a - min(a.min(), 0)) / (a - min(a.min(), 0)).sum()
    raw = np.array([0.4, 0.6]) * np.exp(0.5 * a.sum(axis=0))
    np.testing.assert_allclose(s.weights_from_gains(np.array([0.4, 0.6]), gains), raw / raw.sum(), rtol=1e-12)


def test_aioli_probes_then_trains_on_the_learned_mixture():
    s = Aioli(every=40, sweeps=2, probe_steps=3, one_hot_factor=0.75, step_size=0.5, seed=1)
    k = 2
    state, _ = s.start(DOMAINS[:k], np.array([0.4, 0.6]), np.ones(k) / k)
    assert s.due(state, 0) and s.needs_validation(state, 0)
    losses = iter([np.array([5.0, 5.0]) - 0.1 * i * np.array([1.0, 2.0]) for i in range(20)])
    before, gains, step = next(losses), np.zeros((k, k)), 0
    state, decision = s.update(state, DomainSignal(0, DOMAINS[:k], np.zeros(k), np.zeros(k), 0, np.zeros(k),
                                                    np.ones(k) / k, val_loss=before))
    order = state["order"]
    assert sorted(order) == [0, 0, 1, 1] and decision.probe
    for i, j in enumerate(order):
        np.testing.assert_allclose(decision.weights, [0.75, 0.25] if j == 0 else [0.25, 0.75])
        step += 3
        assert s.due(state, step) and not s.due(state, step - 1)
        after = next(losses)
        gains[:, j] += before - after
        before = after
        state, decision = s.update(roundtrip(state), DomainSignal(step, DOMAINS[:k], np.zeros(k), np.zeros(k), 3,
                                                                   np.zeros(k), np.ones(k) / k, val_loss=after))
        assert decision.probe == (i < len(order) - 1)
    np.testing.assert_allclose(decision.weights, s.weights_from_gains(np.array([0.4, 0.6]), gains / 2), rtol=1e-12)
    assert state["next"] == 40 and not s.due(state, 39) and s.due(state, 40)


def test_aioli_refuses_a_round_shorter_than_its_probes():
    with pytest.raises(ConfigError, match="mixing.every=10: an Aioli round must be longer than its probes"):
        Aioli(every=10, sweeps=1, probe_steps=4).start(DOMAINS, np.ones(3) / 3, np.ones(3) / 3)


def test_the_mixing_section_builds_strategies_and_names_bad_keys():
    cfg = load_config(None, ["data.source=prepared", "mixing.kind=ado", "mixing.every=7",
                             "mixing.options={min_weight: 0.02, prior: uniform}"])
    assert strategy_from_config(cfg.mixing) == ADO(every=7, min_weight=0.02, prior="uniform")
    bad = [
        (["mixing.kind=dormi"], "mixing.kind='dormi' is not known; use one of static, doremi, ado, odm, aioli"),
        (["mixing.kind=ado", "mixing.options={min_wieght: 0.1}"], "did you mean min_weight"),
        (["mixing.kind=odm", "mixing.options={smoothing: high}"], "mixing.options.smoothing: expected float"),
        (["mixing.kind=odm", "mixing.apply=both"], "mixing.apply='both'"),
        (["mixing.kind=doremi"], "needs mixing.options.reference"),
        (["mixing.kind=aioli", "eval.batches=0"], "eval.batches >= 1"),
        (["mixing.kind=odm", "data.source=synthetic"], "needs data.source=prepared"),
        (["mixing.every=-1"], "mixing.every=-1 is out of range"),
    ]
    for overrides, message in bad:
        source = [] if any(o.startswith("data.source") for o in overrides) else ["data.source=prepared"]
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            load_config(None, [*source, *overrides])
        assert "\n" not in str(err.value)
