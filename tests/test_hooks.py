"""Loop hooks: a mixture update changes the data from the next step on, sees per-domain statistics, and is
replayed exactly by a resumed run; hooks run on their cadence."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from test_data_pipeline import _cfg, _row_domains, _same, _take, data  # noqa: F401  (data: the shared fixture)

from mixlm.config import CheckpointConfig, EvalConfig, LoggingConfig
from mixlm.data import make_train_source
from mixlm.errors import ConfigError
from mixlm.hooks import Hook, MixtureUpdateHook, default_hooks
from mixlm.train import train

START = {"alpha": 0.5, "digits": 0.5, "upper": 0.0, "symbols": 0.0}


def test_set_weights_applies_from_the_next_batch_and_resumes(data):  # noqa: F811
    cfg = _cfg(data, START, batch=40)
    source = make_train_source(cfg)
    before = np.concatenate([_row_domains(data, b) for b in _take(source, 10)])
    assert set(before.tolist()) == {0, 1}  # alpha, digits (sorted: alpha digits symbols upper)
    source.set_weights({"upper": 3.0, "symbols": 1.0})
    assert source.current_weights() == {"alpha": 0.0, "digits": 0.0, "symbols": 0.25, "upper": 0.75}
    after = np.concatenate([_row_domains(data, b) for b in _take(source, 20)])
    np.testing.assert_allclose(np.bincount(after, minlength=4) / len(after), [0, 0, 0.25, 0.75], atol=0.01)
    state = json.loads(json.dumps(source.get_state()))
    assert state["mixture_updates"] == [[10, {"upper": 3.0, "symbols": 1.0}]]
    expected = _take(source, 5)
    fresh = make_train_source(cfg)  # a restarted run: configured mixture, then the recorded update
    fresh.set_state(state)
    _same(_take(fresh, 5), expected)
    assert fresh.tokens_seen() == source.tokens_seen()
    with pytest.raises(ConfigError, match="mixture update at step 35.*unknown domain 'web'"):
        fresh.set_weights({"web": 1.0})
    for s in (source, fresh):
        s.close()


def _run_cfg(data, tmp_path, steps):  # noqa: F811
    cfg = _cfg(data, START, batch=8, steps=steps)
    return cfg.replace(
        eval=EvalConfig(every=2, batches=1),
        checkpoint=CheckpointConfig(every=2, async_save=False),
        logging=LoggingConfig(progress=False, tensorboard=False, peak_flops=1e9),
        train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "run")),
    )


class ShiftToUpper:
    """Moves weight onto `upper` by step, and records what it was shown."""

    def __init__(self):
        self.seen = []

    def __call__(self, stats):
        self.seen.append(stats)
        return {"alpha": 1.0, "digits": 1.0, "upper": stats.step / 2}


def test_mixture_update_hook_sees_domain_stats_and_a_resumed_run_replays_it(data, tmp_path):  # noqa: F811
    rule = ShiftToUpper()
    whole = train(_run_cfg(data, tmp_path / "a", 6), hooks=default_hooks(_run_cfg(data, tmp_path / "a", 6),
                                                                          MixtureUpdateHook(2, rule)),
                  log_fn=lambda _: None)
    assert [s.step for s in rule.seen] == [2, 4, 6]
    first = rule.seen[0]
    assert set(first.val_loss) == set(START) and all(np.isfinite(v) for v in first.val_loss.values())
    assert first.weights == {"alpha": 0.5, "digits": 0.5, "symbols": 0.0, "upper": 0.0}
    assert first.tokens_seen["upper"] == 0 and first.tokens_seen["alpha"] > 0
    assert np.isfinite(first.train_loss)
    assert rule.seen[1].weights["upper"] == pytest.approx(1 / 3) and rule.seen[1].tokens_seen["upper"] > 0

    # The same run stopped after step 4 by a hook (checkpointed with its update), then resumed to 6.
    class StopAt(Hook):
        def due(self, run, step):
            return step == 4

        def after_step(self, run, step):
            run.stop("a test hook")

    cfg = _run_cfg(data, tmp_path / "b", 6)
    part = train(cfg, hooks=default_hooks(cfg, MixtureUpdateHook(2, ShiftToUpper()), StopAt()), log_fn=lambda _: None)
    assert part.preempted_at == 4 and int(part.state.step) == 4
    resumed = train(cfg, hooks=default_hooks(cfg, MixtureUpdateHook(2, ShiftToUpper())), log_fn=lambda _: None)
    for a, b in zip(jax.tree.leaves(jax.device_get(whole.state.params)),
                    jax.tree.leaves(jax.device_get(resumed.state.params))):
        np.testing.assert_array_equal(a, b)


def test_hooks_run_on_their_cadence_and_only_finished_runs_get_at_end(data, tmp_path):  # noqa: F811
    class Recorder(Hook):
        every = 3

        def __init__(self):
            self.calls = []

        def after_step(self, run, step):
            self.calls.append(step)

        def at_end(self, run):
            self.calls.append("end")

    cfg = _run_cfg(data, tmp_path, 7).replace(eval=EvalConfig(every=0, batches=0))
    recorder = Recorder()
    result = train(cfg, hooks=[recorder], log_fn=lambda _: None)
    assert recorder.calls == [3, 6, "end"] and int(result.state.step) == 7
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
