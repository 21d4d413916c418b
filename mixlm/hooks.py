"""The training loop's features as values: hooks with a cadence that run between steps.

    train(cfg)                                                  # default_hooks(cfg): what the config asks for
    train(cfg, hooks=default_hooks(cfg, MixtureUpdateHook(every=100, update=my_rule)))   # e.g. online mixing

Before each optimizer step the loop passes the step's global batch through every hook's
`hook.before_step(run, step, batch)` (identity by default; online mixing adds per-row objective weights and a
reference model's losses there). After each optimizer step the loop calls `hook.after_step(run, step)` for
every hook with `hook.due(run, step)`, in list order, and `hook.at_end(run)` once when the run reaches
train.steps (not when it stops early on a signal). A hook with a `state_key` keeps state across a resume: its
`state_dict(run)` (JSON-able) is saved in the checkpoint's data state under "hooks" and handed back to
`load_state_dict(run, state)` when the run resumes from it. A hook reads and changes the run through `Run`: `run.state` (the live
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
import numpy as np

from mixlm.checkpoint import PreemptionGuard, run_metadata
from mixlm.config import ExperimentConfig
from mixlm.sharding import to_global_batch


class NonFiniteLossError(RuntimeError):
    """A loss, gradient or parameter norm became NaN or infinite; nothing was saved after it."""


def host_metrics(metrics: dict) -> dict[str, float | np.ndarray]:
    """Device metrics on the host: scalars as floats, vectors (per-domain sums) as float64 arrays."""
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64) for k, v in jax.device_get(metrics).items()}


# Per-domain sums a train step returns (mixlm.train.domain_sums), each [num_domains].
DOMAIN_SUMS = ("domain_nll", "domain_tokens", "domain_excess")


# Metrics of a step that must be finite, and what to try when one is not.
GUARDED_METRICS = ("loss", "log_z_sq", "grad_norm", "param_norm", "update_norm")


class StepMeter:
    """Per-step metrics: read one step late (so dispatching step n+1 overlaps with reading step n), checked
    for NaN/inf, turned into throughput and MFU every `logging.every` steps and written to the metrics log."""

    def __init__(self, cfg: ExperimentConfig, log, *, start_step: int, flops_per_token: float, peak: float,
                 num_devices: int, tokens_before: int = 0, domains: tuple[str, ...] = ()):
        self.cfg, self.log, self.start_step = cfg, log, start_step
        self.flops_per_token, self.peak, self.num_devices = flops_per_token, peak, num_devices
        self.domains = tuple(domains)  # names of the per-domain sums' entries (the source's domain_names)
        self.history: list[dict] = []  # one metrics dict per logged step
        self.last: dict[str, float] = {}  # the newest step's metrics read to the host
        # Per-domain sums of every step read since the last take_domain_window() (online mixing's window).
        self.domain_window: dict[str, np.ndarray] = {}
        self.window_steps = 0
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

    def take_domain_window(self) -> tuple[dict[str, np.ndarray], int]:
        """(per-domain sums, steps) of the steps read since the last take (call flush() first), and restarts
        the window."""
        window, steps = self.domain_window, self.window_steps
        self.domain_window, self.window_steps = {}, 0
        return window, steps

    def _per_domain(self, m: dict) -> None:
        """Moves the step's per-domain vectors out of `m` into the window; adds train_loss/<domain> (this step's
        mean loss of each domain that had loss tokens in it)."""
        sums = {k: m.pop(k) for k in DOMAIN_SUMS if k in m}
        if not sums:
            return
        for k, v in sums.items():
            self.domain_window[k] = self.domain_window.get(k, 0.0) + v
        self.window_steps += 1
        for name, nll, tokens in zip(self.domains, sums["domain_nll"], sums["domain_tokens"]):
            if tokens > 0:
                m[f"train_loss/{name}"] = float(nll / tokens)

    def _finish(self, step: int, m: dict[str, float]) -> None:
        self._per_domain(m)
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
    hooks: list = dataclasses.field(default_factory=list)  # the run's hooks, in order (set by the loop)
    hook_states: dict = dataclasses.field(default_factory=dict)  # {state_key: state} restored from the checkpoint

    def flush(self) -> None:
        self.meter.flush()

    def data_state(self) -> dict:
        """What the checkpoint saves as the data state: the source's state and, under "hooks", the state of
        every hook with a state_key (call flush() first: hooks may count the steps read)."""
        state = self.source.get_state()
        saved = {h.state_key: h.state_dict(self) for h in self.hooks if h.state_key}
        if saved:
            state = {**state, "hooks": saved}
        return state

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def log_values(self, step: int, label: str, values: dict[str, float]) -> None:
        """Writes eval-like values to the metrics log and prints them as one line."""
        if values:
            self.latest_eval.update(values)
            self.log.write(step, values)
            self.say(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))


class Hook:
    """Base hook: due every `every` steps (0: never between steps); `before_step` passes the batch on,
    `after_step` and `at_end` do nothing, and there is no state to save (`state_key` empty)."""

    every: int = 0
    state_key: str = ""  # non-empty: state_dict() is saved in checkpoints under this key, load_state_dict() on resume

    def due(self, run: Run, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def at_start(self, run: Run) -> None:
        """Once before the first step of this process's run (after load_state_dict when resuming)."""

    def before_step(self, run: Run, step: int, batch: dict) -> dict:
        """The global batch (jax arrays) step `step` will train on, possibly with keys added."""
        return batch

    def state_dict(self, run: Run) -> dict:
        return {}

    def load_state_dict(self, run: Run, state: dict) -> None:
        pass

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
    the last step), logged as one line each; the end's values are the run's final eval."""

    name = "eval"  # the log line's label: "step N <name>" / "final <name>"

    def __init__(self, every: int):
        self.every = every

    def due(self, run: Run, step: int) -> bool:
        return super().due(run, step) and step != run.cfg.train.steps

    def values(self, run: Run) -> dict[str, float]:
        raise NotImplementedError

    def after_step(self, run: Run, step: int) -> None:
        run.log_values(step, f"step {step} {self.name}", self.values(run))

    def at_end(self, run: Run) -> None:
        values = self.values(run)
        run.final_eval.update(values)
        run.log_values(run.cfg.train.steps, f"final {self.name}", values)


class ValidationLossHook(EvalHook):
    """Per-domain validation loss (`val_loss/<domain>`, and `val_loss` over the trained domains) on `batches`
    held-out batches per domain."""

    name = "eval"

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
        run.checkpoints.save(step, run.state, data_state=run.data_state(),
                             meta=run_metadata(run.cfg, step, tokens_seen=run.source.tokens_seen(),
                                               mesh=run.setup.mesh))
        if run.stop_reason:
            run.checkpoints.wait()
            run.preempted_at = step
            run.say(f"stopped by {run.stop_reason} after step {step}: checkpoint saved in "
                    f"{run.checkpoints.directory / str(step)}; rerun the same command to resume")


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
    """The hooks the config asks for, in the order they must run, with the online mixing hook (mixing.kind other
    than static) and `extra` hooks after evaluation and before the checkpoint of the same step (so a mixture
    update is saved with the step it was made at and a resumed run replays it)."""
    hooks: list[Hook] = []
    if cfg.eval.batches:
        hooks.append(ValidationLossHook(cfg.eval.every, cfg.eval.batches))
    if cfg.eval.tasks:
        hooks.append(LiveTasksHook(cfg.eval.every))
    if cfg.mixing.kind != "static":
        from mixlm.mixing.online import OnlineMixingHook, strategy_from_config

        hooks.append(OnlineMixingHook(strategy_from_config(cfg.mixing), apply=cfg.mixing.apply))
    return [*hooks, *extra, PreemptionHook(), CheckpointHook()]
