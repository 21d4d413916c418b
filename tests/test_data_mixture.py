"""Mixture weights: validation, normalisation, stages, and the stateless row schedule (no files)."""

import math

import numpy as np
import pytest

from mixlm.data.mixture import MixtureSchedule, parse_mixture
from mixlm.errors import ConfigError

DOMAINS = ["code", "prose", "records", "web"]


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"web": 1.0, "wbe": 1.0}, "data.mixture.wbe"),
        ({"web": -0.5, "code": 1.0}, "data.mixture.web"),
        ({"web": math.nan, "code": 1.0}, "data.mixture.web"),
        ({"web": 0.0, "code": 0}, "data.mixture"),
        ({"web": "lots"}, "data.mixture.web"),
        (
            {"weights": {"web": 1}, "stages": [{"step": 10, "weights": {"code": -1}}]},
            "data.mixture.stages[0].weights.code",
        ),
        (
            {"weights": {"web": 1}, "stages": [{"step": 0, "weights": {"code": 1}}]},
            "data.mixture.stages[0].step",
        ),
    ],
)
def test_invalid_mixture_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_mixture(raw, known_domains=DOMAINS)


def test_unknown_domain_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean web"):
        parse_mixture({"wbe": 1.0}, known_domains=DOMAINS)


def test_weights_are_normalised_and_stages_fill_missing_domains():
    m = parse_mixture({"weights": {"web": 3, "code": 1}, "stages": [{"step": 100, "weights": {"prose": 2}}]})
    assert m.domains == ("code", "prose", "web")
    assert m.stages[0].weights == {"code": 0.25, "prose": 0.0, "web": 0.75}
    assert m.weights_at(99) == m.stages[0].weights
    assert m.weights_at(100) == {"code": 0.0, "prose": 1.0, "web": 0.0}
    table = m.table()
    assert "step 100" in table and "0.7500" in table


def _shares(schedule, first_row, rows):
    domain, _ = schedule.assign(np.arange(first_row, first_row + rows))
    return np.bincount(domain, minlength=len(schedule.mixture.domains)) / rows


def test_schedule_shares_within_one_percent_and_after_a_stage_switch():
    m = parse_mixture(
        {
            "weights": {"code": 0.5, "prose": 0.3, "records": 0.15, "web": 0.05},
            "stages": [{"step": 50, "weights": {"code": 0.1, "prose": 0.2, "records": 0.3, "web": 0.4}}],
        }
    )
    s = MixtureSchedule(m, global_batch_size=40, seed=3)
    assert np.abs(_shares(s, 0, 2000) - [0.5, 0.3, 0.15, 0.05]).max() <= 0.01
    assert np.abs(_shares(s, 2000, 2000) - [0.1, 0.2, 0.3, 0.4]).max() <= 0.01
    # Any window, not just aligned ones, is close to the weights: slots are spread evenly.
    assert np.abs(_shares(s, 2345, 400) - [0.1, 0.2, 0.3, 0.4]).max() <= 0.01


def test_schedule_uses_each_element_exactly_once_across_stages_and_blocks():
    m = parse_mixture(
        {"weights": {"code": 0.7, "web": 0.3}, "stages": [{"step": 3, "weights": {"code": 0.2, "web": 0.8}}]}
    )
    s = MixtureSchedule(m, global_batch_size=10, seed=0, block_rows=16)  # tiny blocks: many block boundaries
    domain, element = s.assign(np.arange(200))
    for d in range(2):
        assert sorted(element[domain == d]) == list(range((domain == d).sum()))
    for step in range(21):  # the analytic count matches the assignment
        assert list(s.elements_before(step)) == [int((domain[: step * 10] == d).sum()) for d in range(2)]


def test_schedule_is_a_pure_function_of_the_row():
    m = parse_mixture({"code": 0.6, "web": 0.4})
    a = MixtureSchedule(m, global_batch_size=8, seed=1)
    rows = np.array([5, 77, 1234567, 3])
    d1, e1 = a.assign(rows)
    d2, e2 = MixtureSchedule(m, global_batch_size=8, seed=1).assign(rows[::-1])
    assert (d1 == d2[::-1]).all() and (e1 == e2[::-1]).all()


def test_tiny_weights_keep_a_slot_and_zero_weights_get_none():
    m = parse_mixture({"code": 1.0, "prose": 1e-9, "web": 0.0})
    s = MixtureSchedule(m, global_batch_size=8)
    assert s.counts[0][1] == 1 and s.counts[0][2] == 0 and s.counts[0].sum() == s.block_rows


def test_shipped_mixture_files_are_valid():
    import pathlib

    import yaml

    files = sorted((pathlib.Path(__file__).parents[1] / "configs" / "mixtures").glob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        m = parse_mixture(yaml.safe_load(path.read_text()), where=path.name)
        assert all(abs(sum(s.weights.values()) - 1) < 1e-9 for s in m.stages), path
    pile = parse_mixture(
        yaml.safe_load(files[[f.name for f in files].index("pile-17-regmix.yaml")].read_text())
    )
    assert (
        len(pile.domains) == 17 and max(pile.stages[0].weights, key=pile.stages[0].weights.get) == "pile_cc"
    )
