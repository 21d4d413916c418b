"""The training loop's features as values: hooks with a cadence that run between steps.

    train(cfg)                                                  # default_hooks(cfg): what the config asks for
    train(cfg, hooks=default_hooks(cfg, MixtureUpdateHook(every=100, update=my_rule)))   # e.g. online mixing

After each optimizer step the loop calls `hook.after_step(run, step)` for every hook with
`hook.due(run, step)`, in list order, and `hook.at_end(run)` once when the run reaches train.steps (not
when it stops early on a signal). A hook reads and changes the run through `Run`: `run.state` (the live
TrainState), `run.source` (the data source), `run.checkpoints`, `run.log_values(...)`, `run.stop(reason)`.
Hooks that need the previous step's metrics on the host (everything that saves, evaluates or looks at the
loss) call `run.flush()` first; the loop otherwise reads step metrics one step late so the host never waits
for the device.

Order matters and `default_hooks` gets it right: evaluation before the checkpoint of the same step, the
preemption check before the checkpoint hook (which then saves the step and stops the run).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import jax

from mixlm.checkpoint import run_metadata
from mixlm.config import ExperimentConfig
from mixlm.preemption import PreemptionGuard
from mixlm.sharding import to_global_batch


class NonFiniteLossError(RuntimeError):
    """A loss, gradient or parameter norm became NaN or infinite; nothing was saved after it."""


def host_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# Metrics of a step that must be finite, and what to try when one is not.
GUARDED_METRICS = ("loss", "log_z_sq", "grad_norm", "param_norm", "update_norm")


class StepMeter:
    """Per-step metrics: read one step late (so dispatching step n+1 overlaps with reading step n), checked
    for NaN/inf, turned into throughput and MFU every `logging.every` steps and written to the metrics log."""

    def __init__(self, cfg: ExperimentConfig, log, *, start_step: int, flops_per_token: float, peak: float,
                 num_devices: int, tokens_before: int = 0):
        self.cfg, self.log, self.start_step = cfg, log, start_step
        self.flops_per_token, self.peak, self.num_devices = flops_per_token, peak, num_devices
        self.history: list[dict] = []  # one metrics dict per logged step
        self.last: dict[str, float] = {}  # the newest step's metrics read to the host
        self.tokens_total = float(tokens_before)  # loss tokens of every step so far, also before a resume
        self._pending = None  # (step, device metrics) not yet read
        self._window_start, self._window_tokens = time.perf_counter(), 0.0

    def record(self, step: int, metrics_dev: dict) -> None:
        """Takes the device metrics of `step` and reads those of the step before."""
        self.flush()
        self._pending = (step, metrics_dev)
        if step == self.start_step + 1:  # the first step's time went to compilation, not throughput
            jax.block_until_ready(metrics_dev)
            self._window_start, self._window_tokens = time.perf_counter(), 0.0

    def flush(self) -> None:
        """Reads the pending step's metrics now (raises NonFiniteLossError on a NaN/inf)."""
        if self._pending is not None:
            step, metrics_dev = self._pending
            self._pending = None
            self._finish(step, host_metrics(metrics_dev))

    def _finish(self, step: int, m: dict[str, float]) -> None:
        bad = [k for k in GUARDED_METRICS if k in m and not math.isfinite(m[k])]
        if bad:
            raise NonFiniteLossError(
                f"{', '.join(f'{k} is {m[k]}' for k in bad)} at step {step}: stopping; nothing was saved after "
                "the last good checkpoint. Lower optimizer.lr, raise schedule.warmup_steps, or set train.z_loss."
            )
        self.tokens_total += m["tokens_step"]
        m["tokens_total"] = self.tokens_total
        self.last = {"step": step, **m}
        if step != self.start_step + 1:
            self._window_tokens += m["tokens_step"]
        self.log.advance()
        if step % self.cfg.logging.every == 0 or step == self.cfg.train.steps:
            now = time.perf_counter()
            tokens_per_s = self._window_tokens / max(now - self._window_start, 1e-9)
            m["tokens_per_s"] = tokens_per_s
            m["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.num_devices) if self.peak else 0.0
            self.history.append({"step": step, **m})
            self.log.write(step, m)
            self._window_start, self._window_tokens = now, 0.0


@dataclasses.dataclass
class Run:
    """What hooks see and change: the live state and the run's services."""

    cfg: ExperimentConfig
    setup: Any  # mixlm.train.TrainSetup
    source: Any  # the data source (mixlm.data)
    checkpoints: Any  # mixlm.checkpoint.RunCheckpoints
    log: Any  # mixlm.metrics.MetricsLog
    say: Callable[[str], None]
    meter: StepMeter
    state: Any  # mixlm.train.TrainState
    out_dir: Path
    step: int = 0
    latest_eval: dict[str, float] = dataclasses.field(default_factory=dict)  # newest value of every eval key
    final_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    stop_reason: str = ""  # set by run.stop(): the loop ends after this step's hooks
    preempted_at: int | None = None
    already_finished: bool = False  # resumed at train.steps: a rerun of a finished run (nothing to train)
    logged_at_end: dict = dataclasses.field(default_factory=dict)  # then: metrics.jsonl's values at that step

    def flush(self) -> None:
        self.meter.flush()

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def log_values(self, step: int, label: str, values: dict[str, float]) -> None:
        """Writes eval-like values to the metrics log and prints them as one line."""
        if values:
            self.latest_eval.update(values)
            self.log.write(step, values)
            self.say(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))


class Hook:
    """Base hook: due every `every` steps (0: never between steps); `after_step` and `at_end` do nothing."""

    every: int = 0

    def due(self, run: Run, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def after_step(self, run: Run, step: int) -> None:
        pass

    def at_end(self, run: Run) -> None:
        pass

    def close(self) -> None:
        pass


def evaluate(
    setup, params: dict, eval_batches: dict[str, list[dict]], eval_only: Collection[str] = ()
) -> dict[str, float]:
    """Mean validation loss per domain (`val_loss/<domain>`) and the token-weighted total (`val_loss`)
    over the trained domains: `eval_only` ones (eval.domains, e.g. a target) are reported, not totalled."""
    out, total_nll, total_tokens = {}, 0.0, 0.0
    for domain, batches in eval_batches.items():
        nll, tokens = 0.0, 0.0
        for host_batch in batches:
            s, n = setup.eval_step(params, to_global_batch(host_batch, setup.layout))
            nll, tokens = nll + float(s), tokens + float(n)
        out[f"val_loss/{domain}"] = nll / max(tokens, 1.0)
        if domain not in eval_only:
            total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    out["val_loss"] = total_nll / max(total_tokens, 1.0)
    return out


class EvalHook(Hook):
    """Values about the live model (`values(run)`) every `every` steps and once at the end (so not again on
    the last step), logged as one line each; the end's values are the run's final eval. In a rerun of a
    finished run whose metrics.jsonl already has them (keys starting with `keys`), they are read, not redone."""

    name = "eval"  # the log line's label: "step N <name>" / "final <name>"
    keys: tuple[str, ...] = ()  # the prefixes of the keys `values` returns

    def __init__(self, every: int):
        self.every = every

    def due(self, run: Run, step: int) -> bool:
        return super().due(run, step) and step != run.cfg.train.steps

    def values(self, run: Run) -> dict[str, float]:
        raise NotImplementedError

    def after_step(self, run: Run, step: int) -> None:
        run.log_values(step, f"step {step} {self.name}", self.values(run))

    def at_end(self, run: Run) -> None:
        logged = {k: v for k, v in run.logged_at_end.items() if self.keys and k.startswith(self.keys)}
        if run.already_finished and logged:  # written before: never a second row for the same step
            run.final_eval.update(logged)
            return
        values = self.values(run)
        run.final_eval.update(values)
        run.log_values(run.cfg.train.steps, f"final {self.name}", values)


class ValidationLossHook(EvalHook):
    """Per-domain validation loss (`val_loss/<domain>`, and `val_loss` over the trained domains) on `batches`
    held-out batches per domain."""

    name = "eval"
    keys = ("val_loss",)

    def __init__(self, every: int, batches: int):
        super().__init__(every)
        self.batches = batches
        self._eval_batches = None

    def values(self, run: Run) -> dict[str, float]:
        run.flush()
        self._eval_batches = self._eval_batches or run.source.eval_batches(self.batches)
        eval_only = [d.name for d in getattr(run.source, "eval_only", ())]
        return evaluate(run.setup, run.state.params, self._eval_batches, eval_only)


class LiveTasksHook(EvalHook):
    """lm-eval tasks (eval.tasks) scored on the live model, no export."""

    name = "tasks"
    keys = ("lm_eval/",)

    def values(self, run: Run) -> dict[str, float]:
        # lm-eval is heavy: imported only by runs that score tasks.
        from mixlm.eval.live import run_tasks_on_live_model

        run.flush()
        return run_tasks_on_live_model(run.cfg, run.setup.graphdef, run.state.params)


class PreemptionHook(Hook):
    """Every step: SIGTERM/SIGINT (or JAX's preemption notice on pods) asks the run to stop after this step;
    the checkpoint hook after it then saves the step."""

    def __init__(self):
        self._guard = None

    def due(self, run: Run, step: int) -> bool:
        return True

    def after_step(self, run: Run, step: int) -> None:
        if self._guard is None:
            self._guard = PreemptionGuard(run.checkpoints, log=run.say).install()
        if self._guard.requested(step):
            run.stop(self._guard.signal_name)

    def close(self) -> None:
        if self._guard is not None:
            self._guard.uninstall()


class CheckpointHook(Hook):
    """Saves state, data position and metadata on checkpoint.every / at the end (checkpoint.save_at_end), and
    the current step when the run is stopping (then waits for the save to commit)."""

    def due(self, run: Run, step: int) -> bool:
        return bool(run.stop_reason) or run.checkpoints.should_save(step, run.cfg.train.steps)

    def after_step(self, run: Run, step: int) -> None:
        run.flush()  # never checkpoint past a non-finite value
        run.checkpoints.save(step, run.state, data_state=run.source.get_state(),
                             meta=run_metadata(run.cfg, step, tokens_seen=run.source.tokens_seen(),
                                               mesh=run.setup.mesh))
        run.log.flush()  # an object store's buffered metrics rows: none before a checkpoint is ever lost
        if run.stop_reason:
            run.checkpoints.wait()
            run.preempted_at = step
            run.say(f"stopped by {run.stop_reason} after step {step}: checkpoint saved in "
                    f"{run.checkpoints.shown(step)}; rerun the same command to resume")


@dataclasses.dataclass(frozen=True)
class MixtureStats:
    """What a mixture update sees: the step, the weights in force, the loss tokens each domain has given so
    far, the newest per-domain validation losses (empty before the first eval) and this step's train loss."""

    step: int
    weights: dict[str, float]
    tokens_seen: dict[str, int]
    val_loss: dict[str, float]
    train_loss: float | None


class MixtureUpdateHook(Hook):
    """Every `every` steps: `update(MixtureStats) -> {domain: weight} | None`; new weights apply from the next
    step on (the source records them in its state, so a resumed run replays the same schedule). Pass it
    through `default_hooks(cfg, hook)`: after validation (it sees this step's losses), before the checkpoint."""

    def __init__(self, every: int, update: Callable[[MixtureStats], dict[str, float] | None]):
        self.every, self.update = every, update

    def after_step(self, run: Run, step: int) -> None:
        run.flush()
        val = {k.split("/", 1)[1]: v for k, v in run.latest_eval.items() if k.startswith("val_loss/")}
        stats = MixtureStats(step=step, weights=dict(run.source.current_weights()),
                             tokens_seen=run.source.tokens_seen(), val_loss=val,
                             train_loss=run.meter.last.get("loss"))
        weights = self.update(stats)
        if weights is not None:
            run.source.set_weights(weights)
            run.say(f"step {step}: mixture now " + ", ".join(f"{d} {w:.4f}" for d, w in
                                                             run.source.current_weights().items()))


def default_hooks(cfg: ExperimentConfig, *extra: Hook) -> list[Hook]:
    """The hooks the config asks for, in the order they must run, with `extra` hooks after evaluation and
    before the checkpoint of the same step (so a mixture update is saved with the step it was made at and a
    resumed run replays it)."""
    hooks: list[Hook] = []
    if cfg.eval.batches:
        hooks.append(ValidationLossHook(cfg.eval.every, cfg.eval.batches))
    if cfg.eval.tasks:
        hooks.append(LiveTasksHook(cfg.eval.every))
    return [*hooks, *extra, PreemptionHook(), CheckpointHook()]
