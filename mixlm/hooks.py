"""The training loop's features as values: hooks with a cadence that run between steps.

    train(cfg)                                                  # default_hooks(cfg): what the config asks for
    train(cfg, hooks=default_hooks(cfg, MixtureUpdateHook(every=100, update=my_rule)))   # e.g. online mixing
    train(member_cfgs, "runs/swarm")                            # a swarm: the same hooks, per member

Before the first step the loop hands every hook with a `state_key` its saved state of each of this process's
members (`hook.load_state_dict(run, member, state)`, when the run resumes from a checkpoint that has one), then
calls `hook.at_start(run)`. Before each optimizer step it passes the step's device batch (a swarm: [K, B, ...])
through every hook's `hook.before_step(run, step, batch)` (identity by default; online mixing adds per-row
objective weights and a reference model's losses there). After each optimizer step it calls
`hook.after_step(run, step)` for every hook with `hook.due(run, step)`, in list order, and `hook.at_end(run)` once
when the run reaches train.steps (not when it stops early on a signal). A hook's state is per member: each
checkpoint saves `hook.state_dict(run, member)` (JSON-able) in that member's data state under
"hooks"/<state_key>. A hook reads and changes the run through `Run`: `run.state` (the live
TrainState, with a leading member axis in a swarm), `run.sources` (this process's members' data sources),
`run.checkpoints`, `run.log_values(...)`, `run.stop(reason)`. Every value a hook reports is per member: a list
with one dict per member (a single run: one). Hooks that need the previous step's metrics on the host
(everything that saves, evaluates or looks at the loss) call `run.flush()` first; the loop otherwise reads
step metrics one step late so the host never waits for the device.

Order matters and `default_hooks` gets it right: evaluation before the checkpoint of the same step, the
preemption check before the checkpoint hook (which then saves the step and stops the run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any

from mixlm import collectives
from mixlm.checkpoint import run_metadata
from mixlm.config import ExperimentConfig
from mixlm.errors import ConfigError, NonFiniteLossError
from mixlm.members import member_slice, swarm_data_state
from mixlm.preemption import PreemptionGuard
from mixlm.run_dir import RunDir
from mixlm.step_meter import StepMeter

__all__ = ["CheckpointHook", "EvalHook", "Hook", "LiveTasksHook", "MixtureStats", "MixtureUpdateHook",
           "NonFiniteLossError", "PreemptionHook", "Run", "StepMeter", "StopAtStep", "ValidationLossHook", "default_hooks",
           "evaluate", "evaluate_members"]


@dataclasses.dataclass
class Run:
    """What hooks see and change: the live state and the run's services. A run trains `members` members (a
    single run: 1); per-member lists are indexed by member, and this process feeds `local` of them."""

    cfg: ExperimentConfig  # the shared config (a swarm: member 0's, with the swarm's folder as output_dir)
    cfgs: list[ExperimentConfig]  # every member's own config (a single run: [cfg])
    setup: Any  # mixlm.setup.TrainSetup
    sources: list  # this process's members' data sources, in `local` order
    checkpoints: Any  # mixlm.checkpoint.RunCheckpoints
    logs: dict  # member -> its mixlm.metrics.MetricsLog (this process's members)
    progress: Any  # the MetricsLog whose bar shows the steps (a single run: its own log)
    say: Callable[[str], None]
    meter: StepMeter
    state: Any  # mixlm.train_step.TrainState
    run_dir: RunDir  # the run's folder (a swarm: the swarm's folder, with its checkpoints)
    step: int = 0
    alive: Any = None  # a swarm: the [K] device mask of the members still training
    failed: dict[int, dict] = dataclasses.field(default_factory=dict)  # member -> {'step', 'reason'}
    latest_eval: list[dict[str, float]] = dataclasses.field(default_factory=list)  # newest value of every eval key
    final_eval: list[dict[str, float]] = dataclasses.field(default_factory=list)
    stop_reason: str = ""  # set by run.stop(): the loop ends after this step's hooks
    preempted_at: int | None = None
    resumed_at_end: bool = False  # resumed at train.steps: the end was reached before, its outputs maybe not
    logged_at_end: list[dict] = dataclasses.field(default_factory=list)  # then: each metrics.jsonl's row there
    hooks: list = dataclasses.field(default_factory=list)  # the run's hooks, in order (set by the loop)
    hook_states: dict = dataclasses.field(default_factory=dict)  # member -> {state_key: state} from the checkpoint

    @property
    def members(self) -> int:
        return len(self.cfgs)

    @property
    def local(self) -> list[int]:
        return self.setup.local_members

    @property
    def training(self) -> list[tuple[int, Any]]:
        """(member, its source) for this process's members that have not failed."""
        return [(m, src) for m, src in zip(self.local, self.sources) if m not in self.failed]

    def member_params(self, m: int):
        """Member m's params: the live (sharded) params of a single run, a swarm member's as host arrays."""
        return self.state.params if self.members == 1 else member_slice(self.state.params, m)

    def flush(self) -> None:
        self.meter.flush()

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def log_values(self, step: int, label: str, values: Sequence[dict[str, float]]) -> None:
        """Writes eval-like values (one dict per member) to each member's metrics log and prints them as one
        line (a swarm: the range over its members)."""
        shown = [values[m] for m, _ in self.training if values[m]]
        if not shown:
            return
        for m, _ in self.training:
            self.latest_eval[m].update(values[m])
            self.logs[m].write(step, values[m])
        if self.members == 1:
            self.say(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown[0].items()))
            return
        key = "val_loss" if "val_loss" in shown[0] else next(iter(shown[0]))
        numbers = [v[key] for v in shown if key in v]
        self.say(f"{label}: {key} {min(numbers):.4f}..{max(numbers):.4f} over {len(shown)} members")

    def member_data_state(self, m: int, source) -> dict:
        """Member m's data state: its source's state and, under "hooks", the state of every hook with a
        state_key (call flush() first: hooks may count the steps read)."""
        state = source.get_state()
        saved = {h.state_key: h.state_dict(self, m) for h in self.hooks if h.state_key}
        return {**state, "hooks": saved} if saved else state

    def checkpoint_items(self, step: int) -> tuple[dict, dict]:
        """(data state, meta) of a checkpoint of `step`: a single run's member data state, or the swarm's
        (mixlm.members.swarm_data_state: every member's, gathered from their processes)."""
        if self.members == 1:
            source = self.sources[0]
            return self.member_data_state(0, source), run_metadata(self.cfg, step, tokens_seen=source.tokens_seen(),
                                                                   mesh=self.setup.mesh)
        mine = {m: {"state": self.member_data_state(m, s), "tokens": s.tokens_seen()}
                for m, s in zip(self.local, self.sources)}
        every = collectives.gather_members(mine)
        tokens = [every[m]["tokens"] for m in range(self.members)]
        meta = run_metadata(self.cfg, step, tokens_seen={d: sum(t.get(d, 0) for t in tokens) for d in tokens[0]},
                            mesh=self.setup.mesh)
        meta["members"] = [{"output_dir": c.train.output_dir, "tokens_seen": t} for c, t in zip(self.cfgs, tokens)]
        failed = collectives.gather_members(self.failed)
        return swarm_data_state(self.cfgs, {m: every[m]["state"] for m in every}, failed), meta


class Hook:
    """Base hook: due every `every` steps (0: never between steps); `before_step` passes the batch on,
    `at_start`, `after_step` and `at_end` do nothing, and there is no state to save (`state_key` empty)."""

    every: int = 0
    state_key: str = ""  # non-empty: state_dict() is saved in checkpoints under this key, load_state_dict() on resume

    def due(self, run: Run, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def at_start(self, run: Run) -> None:
        """Once before the first step of this process's run (after load_state_dict when resuming)."""

    def before_step(self, run: Run, step: int, batch: dict) -> dict:
        """The device batch step `step` will train on (a swarm: [K, B, ...]), possibly with keys added (the
        same keys for every member)."""
        return batch

    def state_dict(self, run: Run, member: int) -> dict:
        """Member `member`'s state (JSON-able), saved with its data state."""
        return {}

    def load_state_dict(self, run: Run, member: int, state: dict) -> None:
        pass

    def after_step(self, run: Run, step: int) -> None:
        pass

    def at_end(self, run: Run) -> None:
        pass

    def close(self) -> None:
        pass


def evaluate_members(setup, params, member_batches: Sequence[dict[str, list[dict]]],
                     eval_only: Collection[str] = ()) -> list[dict[str, float]]:
    """Mean validation loss per domain (`val_loss/<domain>`) and the token-weighted total (`val_loss`) over the
    trained domains, per member: `eval_only` ones (eval.domains, e.g. a target) are reported, not totalled.
    `member_batches`: this process's members' {domain: [host batch, ...]} (setup.local_members order), all
    with the same domains and batch counts; the members of other processes get {}."""
    first = member_batches[0]
    for k, batches in enumerate(member_batches[1:], start=1):
        if {d: len(b) for d, b in batches.items()} != {d: len(b) for d, b in first.items()}:
            raise ConfigError(f"swarm member {setup.local_members[k]} has other validation domains or batch counts "
                              f"than member {setup.local_members[0]}; members must read the same prepared domains")
    k = setup.members
    out = [{} for _ in range(k)]
    total_nll, total_tokens = [0.0] * k, [0.0] * k
    for domain in first:
        nll, tokens = [0.0] * k, [0.0] * k
        for j in range(len(first[domain])):
            batch = setup.put_batch([b[domain][j] for b in member_batches])
            s_K, n_K = (v.reshape(-1) for v in collectives.host_view(setup.eval_step(params, batch)))
            nll = [a + float(b) for a, b in zip(nll, s_K)]
            tokens = [a + float(b) for a, b in zip(tokens, n_K)]
        for m in range(k):
            out[m][f"val_loss/{domain}"] = nll[m] / max(tokens[m], 1.0)
            if domain not in eval_only:
                total_nll[m], total_tokens[m] = total_nll[m] + nll[m], total_tokens[m] + tokens[m]
    for m in range(k):
        out[m]["val_loss"] = total_nll[m] / max(total_tokens[m], 1.0)
    local = set(setup.local_members)
    return [values if m in local else {} for m, values in enumerate(out)]


def evaluate(setup, params: dict, eval_batches: dict[str, list[dict]],
             eval_only: Collection[str] = ()) -> dict[str, float]:
    """evaluate_members for a single run: its {'val_loss/<domain>': ..., 'val_loss': ...}."""
    return evaluate_members(setup, params, [eval_batches], eval_only)[0]


class EvalHook(Hook):
    """Values about the live model (`values(run)`: one dict per member) every `every` steps and once at the end
    (so not again on the last step), logged as one line each; the end's values are the run's final eval. In a
    run resumed at its end whose metrics.jsonl files already have them (keys starting with `keys`), they are
    read, not redone."""

    name = "eval"  # the log line's label: "step N <name>" / "final <name>"
    keys: tuple[str, ...] = ()  # the prefixes of the keys `values` returns

    def __init__(self, every: int):
        self.every = every

    def due(self, run: Run, step: int) -> bool:
        return super().due(run, step) and step != run.cfg.train.steps

    def values(self, run: Run) -> list[dict[str, float]]:
        raise NotImplementedError

    def after_step(self, run: Run, step: int) -> None:
        run.log_values(step, f"step {step} {self.name}", self.values(run))

    def at_end(self, run: Run) -> None:
        logged = [{k: v for k, v in row.items() if self.keys and k.startswith(self.keys)} for row in run.logged_at_end]
        # every process takes the same branch: evaluating is a collective
        if collectives.all_processes(run.resumed_at_end and all(logged[m] for m, _ in run.training)):
            for m, _ in run.training:  # written before: never a second row for the same step
                run.final_eval[m].update(logged[m])
            return
        values = self.values(run)
        for m, _ in run.training:
            run.final_eval[m].update(logged[m] or values[m])
        fresh = [{} if logged[m] else v for m, v in enumerate(values)]  # a member's logged values stay its only row
        run.log_values(run.cfg.train.steps, f"final {self.name}", fresh)


class ValidationLossHook(EvalHook):
    """Per-domain validation loss (`val_loss/<domain>`, and `val_loss` over the trained domains) on `batches`
    held-out batches per domain, for every member."""

    name = "eval"
    keys = ("val_loss",)

    def __init__(self, every: int, batches: int):
        super().__init__(every)
        self.batches = batches
        self._eval_batches = None

    def values(self, run: Run) -> list[dict[str, float]]:
        run.flush()
        self._eval_batches = self._eval_batches or [src.eval_batches(self.batches) for src in run.sources]
        eval_only = [d.name for d in getattr(run.sources[0], "eval_only", ())]
        return evaluate_members(run.setup, run.state.params, self._eval_batches, eval_only)


class LiveTasksHook(EvalHook):
    """lm-eval tasks (eval.tasks) scored on the live model, no export; in a swarm each member on its own
    params, by the process that owns it."""

    name = "tasks"
    keys = ("lm_eval/",)

    def values(self, run: Run) -> list[dict[str, float]]:
        # lm-eval is heavy: imported only by runs that score tasks.
        from mixlm.eval.live import run_tasks_on_live_model

        run.flush()
        out: list[dict[str, float]] = [{} for _ in range(run.members)]
        for m, _ in run.training:
            out[m] = run_tasks_on_live_model(run.cfgs[m], run.setup.graphdef, run.member_params(m))
        return out


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


class StopAtStep(Hook):
    """Stops the run after `step` (on every process alike), as SIGTERM would: the checkpoint hook after it saves
    that step, and a rerun resumes from there."""

    def __init__(self, step: int):
        self.step = step

    def due(self, run: Run, step: int) -> bool:
        return step == self.step

    def after_step(self, run: Run, step: int) -> None:
        run.stop(f"a stop at step {step}")


class CheckpointHook(Hook):
    """Saves state, data position and metadata on checkpoint.every / at the end (checkpoint.save_at_end), and
    the current step when the run is stopping (then waits for the save to commit)."""

    def due(self, run: Run, step: int) -> bool:
        return bool(run.stop_reason) or run.checkpoints.should_save(step, run.cfg.train.steps)

    def after_step(self, run: Run, step: int) -> None:
        run.flush()  # never checkpoint past a non-finite value (a swarm: its failures of this step are known)
        data_state, meta = run.checkpoint_items(step)
        run.checkpoints.save(step, run.state, data_state=data_state, meta=meta)
        for member_log in run.logs.values():  # an object store's buffered metrics rows: none before a
            member_log.flush()  # checkpoint is ever lost
        if run.stop_reason:
            run.checkpoints.wait()
            run.preempted_at = step
            run.say(f"stopped by {run.stop_reason} after step {step}: checkpoint saved in "
                    f"{run.checkpoints.shown(step)}; rerun the same command to resume")


@dataclasses.dataclass(frozen=True)
class MixtureStats:
    """What a mixture update sees: the step, the weights in force, the loss tokens each domain has given so
    far, the newest per-domain validation losses (empty before the first eval), this step's train loss, and
    which member of a swarm it is about (a single run: 0)."""

    step: int
    weights: dict[str, float]
    tokens_seen: dict[str, int]
    val_loss: dict[str, float]
    train_loss: float | None
    member: int = 0


class MixtureUpdateHook(Hook):
    """Every `every` steps: `update(MixtureStats) -> {domain: weight} | None`, once per member with that
    member's own statistics; new weights apply to that member's source from the next step on (the source
    records them in its state, so a resumed run replays the same schedule). Pass it through
    `default_hooks(cfg, hook)`: after validation (it sees this step's losses), before the checkpoint."""

    def __init__(self, every: int, update: Callable[[MixtureStats], dict[str, float] | None]):
        self.every, self.update = every, update

    def after_step(self, run: Run, step: int) -> None:
        run.flush()
        changed = []
        for m, source in run.training:
            val = {k.split("/", 1)[1]: v for k, v in run.latest_eval[m].items() if k.startswith("val_loss/")}
            stats = MixtureStats(step=step, weights=dict(source.current_weights()),
                                 tokens_seen=source.tokens_seen(), val_loss=val,
                                 train_loss=run.meter.last[m].get("loss"), member=m)
            weights = self.update(stats)
            if weights is not None:
                source.set_weights(weights)
                changed.append(source)
        if run.members == 1 and changed:
            run.say(f"step {step}: mixture now " + ", ".join(f"{d} {w:.4f}" for d, w in
                                                             changed[0].current_weights().items()))
        elif changed:
            run.say(f"step {step}: mixture updated in {len(changed)} of {len(run.training)} members")


def default_hooks(cfg: ExperimentConfig, *extra: Hook, members: Sequence[ExperimentConfig] = ()) -> list[Hook]:
    """The hooks the config asks for, in the order they must run, with the online mixing hook (a mixing.kind
    other than static in `cfg`, or in any of a swarm's `members` configs: each member runs its own) and `extra`
    hooks after evaluation and before the checkpoint of the same step (so a mixture update is saved with the step
    it was made at and a resumed run replays it)."""
    hooks: list[Hook] = []
    if cfg.eval.batches:
        hooks.append(ValidationLossHook(cfg.eval.every, cfg.eval.batches))
    if cfg.eval.tasks:
        hooks.append(LiveTasksHook(cfg.eval.every))
    member_cfgs = list(members) or [cfg]
    if any(c.mixing.kind != "static" for c in member_cfgs):
        from mixlm.mixing.online import OnlineMixingHook

        hooks.append(OnlineMixingHook.from_configs(member_cfgs))
    return [*hooks, *extra, PreemptionHook(), CheckpointHook()]
