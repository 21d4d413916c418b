"""Mixture weights: validation, normalisation, stages, and the stateless row schedule (no files)."""

import math

import numpy as np
import pytest

from mixlm.data.mixture import MIN_WEIGHT, MixtureSchedule, parse_mixture, with_stage
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


@pytest.mark.parametrize("tiny", [1e-5, 1e-9])
def test_tiny_weights_get_their_exact_share_and_zero_weights_get_none(tiny):
    # Before: each block of 262144 rows gave a positive weight at least one slot and rounded the rest per block,
    # so 1e-9 got 3.8e-6 of the rows (3800x) and 1e-5 got 2 or 3 slots (-24% / +14%).
    m = parse_mixture({"code": 1.0 - tiny, "prose": tiny, "web": 0.0})
    s = MixtureSchedule(m, global_batch_size=64)
    steps = 10**12 // 64  # 10^12 rows: counted by arithmetic, nothing materialised beyond one block
    count = s.elements_before(steps)
    assert count.sum() == steps * 64 and count[2] == 0
    # Level 2 rounds each domain's share of the leftover slots to one of 262144: at most (domains - 1) / 2^36.
    assert count[1] == pytest.approx(tiny * steps * 64, abs=2 * MIN_WEIGHT * steps * 64 + 2)


def test_a_weight_below_the_schedule_resolution_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"data.mixture.prose: weight 1e-12 .* below .*1/2\^36") as err:
        parse_mixture({"code": 1.0, "prose": 1e-12})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="mixture update.prose"):
        with_stage(parse_mixture({"code": 1.0, "prose": 1.0}), 5, {"code": 1.0, "prose": 1e-13})


def test_tiny_weight_rows_are_each_element_once_and_spread_evenly():
    m = parse_mixture({"code": 0.6, "prose": 0.4 - 3e-4, "web": 3e-4})
    s = MixtureSchedule(m, global_batch_size=64, seed=2)
    domain, element = s.assign(np.arange(2_000_000))
    for d in range(3):  # every element of every domain exactly once, in order of first use
        assert (np.sort(element[domain == d]) == np.arange((domain == d).sum())).all()
    # Any window of W rows holds W * weight ± 2 rows of each domain: the tiny one's rows come evenly, not in bursts.
    seen = np.concatenate([[0], np.cumsum(domain == 2)])
    for width in (1000, 10_000, 300_000):
        in_window = seen[width:] - seen[:-width]
        assert np.abs(in_window - 3e-4 * width).max() <= 2, width


def test_shares_stay_within_one_percent_after_many_appended_stages():
    """Online mixing appends a stage every few steps (reusing the earlier stages' counts): each stage's rows
    follow its weights, every element is used once, and the counts agree with a schedule built from scratch."""
    rng = np.random.default_rng(0)
    mixture = parse_mixture({"code": 0.25, "prose": 0.25, "records": 0.25, "web": 0.25})
    schedule = MixtureSchedule(mixture, global_batch_size=256, seed=1)
    for step in range(10, 210, 10):
        weights = dict(zip(DOMAINS, rng.dirichlet(np.ones(4))))
        mixture = with_stage(mixture, step, weights)
        schedule = MixtureSchedule(mixture, global_batch_size=256, seed=1, reuse=schedule)
        rows = np.arange(step * 256, (step + 10) * 256)
        assert np.abs(_shares(schedule, int(rows[0]), len(rows)) - [weights[d] for d in DOMAINS]).max() <= 0.01
    domain, element = schedule.assign(np.arange(210 * 256))
    for d in range(4):
        assert (np.sort(element[domain == d]) == np.arange((domain == d).sum())).all()
    scratch = MixtureSchedule(mixture, global_batch_size=256, seed=1)
    assert all((scratch.elements_before(s) == schedule.elements_before(s)).all() for s in range(0, 221, 7))


def test_a_stage_read_from_its_start_sorts_only_what_it_reads():
    from mixlm.data.mixture import _StagePattern

    weights = np.array([0.5, 0.3, 0.2 - 1e-5, 1e-5])
    lazy, full = _StagePattern(weights, 1 << 18, 1, 0), _StagePattern(weights, 1 << 18, 1, 0)
    full.top.ensure(1 << 18)
    lazy.assign(np.arange(640))  # ten steps of 64 rows
    assert lazy.top.size < 4096
    assert (lazy.top.labels == full.top.labels[: lazy.top.size]).all()
    assert (lazy.top.ranks == full.top.ranks[: lazy.top.size]).all()


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


def test_read_threads_assigning_at_once_get_what_one_thread_gets():
    """grain's read threads call assign concurrently while the stage's pattern is still being materialised."""
    from concurrent.futures import ThreadPoolExecutor

    m = parse_mixture({"code": 0.37, "prose": 0.33, "records": 0.3 - 2e-5, "web": 2e-5})
    chunks = [np.arange(start, start + 64) for start in range(0, 200_000, 997)]
    want = [MixtureSchedule(m, global_batch_size=64, seed=5).assign(c) for c in chunks]
    for _ in range(3):
        schedule = MixtureSchedule(m, global_batch_size=64, seed=5)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(schedule.assign, chunks[::-1]))[::-1]
        for (d1, e1), (d2, e2) in zip(got, want):
            assert (d1 == d2).all() and (e1 == e2).all()
