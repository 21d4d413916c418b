"""Per-step metrics of every member of a run: read to the host one step late (dispatching step n+1 overlaps with
reading step n), checked for NaN/inf, turned into throughput and MFU every `logging.every` steps and written to
each member's metrics log.

Each member's per-domain sums (the train step's DOMAIN_SUMS, when the data carries domain ids) become its
`train_loss/<domain>` values and add up in its domain window until online mixing takes it (take_domain_window).

A run of one member stops on a non-finite value (NonFiniteLossError, nothing saved after it). A member of a
swarm is marked failed instead (its update was already masked on the device, mixlm.train_step.masked_step): its
metrics.jsonl gets a row {'step', 'failed': why}, its result.json the status 'failed', and the others go on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from mixlm.collectives import host_view
from mixlm.config import ExperimentConfig
from mixlm.errors import NonFiniteLossError
from mixlm.run_dir import RunDir
from mixlm.train_step import DOMAIN_SUMS, GUARDED_METRICS


def non_finite(row: dict[str, float]) -> str:
    """'loss is nan, grad_norm is inf' for the guarded metrics of `row` that are not finite, else ''."""
    return ", ".join(f"{k} is {row[k]}" for k in GUARDED_METRICS if k in row and not math.isfinite(row[k]))


class StepMeter:
    """Reads, checks and logs the step metrics of this process's members (`logs`: member -> its MetricsLog;
    `progress`: the log whose bar advances once per step). `failed` (member -> {'step', 'reason'}) is shared
    with the run: members in it are not logged any more. `domains`: member -> the names of its per-domain sums'
    entries (its source's domain_names)."""

    def __init__(self, cfgs: Sequence[ExperimentConfig], logs: dict, progress, *, start_step: int,
                 flops_per_token: float, peak: float, num_devices: int, tokens_before: dict[int, float],
                 failed: dict[int, dict], say: Callable[[str], None],
                 domains: dict[int, tuple[str, ...]] | None = None):
        self.cfgs, self.logs, self.progress, self.start_step = list(cfgs), logs, progress, start_step
        self.flops_per_token, self.peak, self.num_devices = flops_per_token, peak, num_devices
        self.failed, self.say = failed, say
        self.members = len(self.cfgs)
        self.every, self.steps = self.cfgs[0].logging.every, self.cfgs[0].train.steps
        self.history: list[list[dict]] = [[] for _ in self.cfgs]  # per member: one metrics dict per logged step
        self.last: list[dict[str, float]] = [{} for _ in self.cfgs]  # per member: its newest step's metrics
        self.tokens_total = {m: float(tokens_before.get(m, 0.0)) for m in logs}  # also before a resume
        self.domains = {m: tuple((domains or {}).get(m, ())) for m in logs}
        # Per member: the per-domain sums [D] (float64) of every step read since its last take_domain_window().
        self.domain_window: dict[int, dict[str, np.ndarray]] = {m: {} for m in logs}
        self.window_steps = {m: 0 for m in logs}
        self._pending = None  # (step, device metrics, device alive mask or None) not yet read
        self._started = time.perf_counter()
        self._window_start, self._window_tokens = self._started, {m: 0.0 for m in logs}
        spread = len(logs) != self.members
        self._whose = f" on process {jax.process_index()}" if spread else ""

    def record(self, step: int, metrics_dev: dict, alive_dev=None) -> None:
        """Takes the device metrics of `step` (and, for a swarm, its alive mask) and reads those of the step
        before."""
        self.flush()
        self._pending = (step, metrics_dev, alive_dev)
        if step == self.start_step + 1:  # the first step's time went to compilation, not throughput
            jax.block_until_ready(metrics_dev)
            if self.members > 1:
                self.say(f"swarm step {step} (compilation included) took {time.perf_counter() - self._started:.1f}s")
            self._window_start, self._window_tokens = time.perf_counter(), {m: 0.0 for m in self.logs}

    def flush(self) -> None:
        """Reads the pending step's metrics now (a run of one member raises NonFiniteLossError on a NaN/inf)."""
        if self._pending is None:
            return
        step, metrics_dev, alive_dev = self._pending
        self._pending = None
        metrics, alive = host_view((metrics_dev, alive_dev))
        sums = {k: np.reshape(metrics.pop(k), (self.members, -1)) for k in DOMAIN_SUMS if k in metrics}  # [K, D]
        metrics = {k: np.reshape(v, (-1,)) for k, v in metrics.items()}  # [K]; a single run's scalars: [1]
        self.progress.advance()
        logged = step % self.every == 0 or step == self.steps
        now = time.perf_counter()
        for m, log in self.logs.items():
            if m in self.failed:
                continue
            row = {k: float(v[m]) for k, v in metrics.items()}
            bad = non_finite(row)
            if self.members == 1 and bad:
                raise NonFiniteLossError(
                    f"{bad} at step {step}: stopping; nothing was saved after the last good checkpoint. Lower "
                    "optimizer.lr, raise schedule.warmup_steps, or set train.z_loss.")
            if alive is not None and not alive[m]:
                self._fail(m, step, bad or "non-finite values")
                continue
            if sums:
                row.update(self._per_domain(m, {k: v[m] for k, v in sums.items()}))
            self.tokens_total[m] += row["tokens_step"]
            row["tokens_total"] = self.tokens_total[m]
            self.last[m] = {"step": step, **row}
            if step != self.start_step + 1:
                self._window_tokens[m] += row["tokens_step"]
            if logged:
                if self.members == 1:  # a swarm's throughput is its members' together: the swarm line
                    tokens_per_s = self._window_tokens[m] / max(now - self._window_start, 1e-9)
                    row["tokens_per_s"] = tokens_per_s
                    row["mfu"] = (tokens_per_s * self.flops_per_token / (self.peak * self.num_devices)
                                  if self.peak else 0.0)
                self.history[m].append({"step": step, **row})
                log.write(step, row)
        if logged:
            if self.members > 1:
                self._swarm_line(step, metrics, now)
            self._window_start, self._window_tokens = now, {m: 0.0 for m in self.logs}

    def take_domain_window(self, m: int) -> tuple[dict[str, np.ndarray], int]:
        """(per-domain sums, steps) of member m's steps read since its last take (call flush() first), and
        restarts its window."""
        window, steps = self.domain_window[m], self.window_steps[m]
        self.domain_window[m], self.window_steps[m] = {}, 0
        return window, steps

    def _per_domain(self, m: int, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Adds member m's step sums to its window; returns train_loss/<domain> (this step's mean loss of each
        domain that had loss tokens in it)."""
        window = self.domain_window[m]
        for k, v in sums.items():
            window[k] = window.get(k, 0.0) + np.asarray(v, np.float64)
        self.window_steps[m] += 1
        return {f"train_loss/{name}": float(np.float64(nll) / tokens)
                for name, nll, tokens in zip(self.domains[m], sums["domain_nll"], sums["domain_tokens"]) if tokens > 0}

    def _fail(self, m: int, step: int, reason: str) -> None:
        self.failed[m] = {"step": step, "reason": reason}
        self.logs[m].write(step, {"failed": reason})
        if self.logs[m].is_main:
            RunDir(self.cfgs[m].train.output_dir).write_result(step=step, eval={}, status="failed", reason=reason)
        self.say(f"swarm member {m} ({self.cfgs[m].train.output_dir}): {reason} at step {step}: marked failed; its "
                 "updates are masked and the other members go on")

    def _swarm_line(self, step: int, metrics: dict, now: float) -> None:
        live = [float(metrics["loss"][m]) for m in self.logs if m not in self.failed]
        loss = f"loss {min(live):.4f}..{max(live):.4f}" if live else "every member failed"
        rate = sum(self._window_tokens.values()) / max(now - self._window_start, 1e-9)
        together = "this process's members together" if self._whose else "all members together"
        self.say(f"swarm step {step}: {loss} over {len(live)}/{len(self.logs)} members{self._whose}, "
                 f"{rate:,.0f} tokens/s ({together})")
