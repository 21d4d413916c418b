"""The loop side of online mixing: a hook that feeds each member's strategy the per-domain statistics of its steps
since its last update and applies the mixture it returns at the next step boundary.

    hooks = default_hooks(cfg, OnlineMixingHook(ADO(every=20)))        # or mixing.kind=ado in the config
    train(member_cfgs, swarm_dir)       # a swarm: each member runs its own config's mixing (e.g. K DoReMi step sizes)

How a switch loses no data: the batch of step s is a pure function of (data, mixture stages, s). An update after
step t appends a stage at t (the source's set_weights), so batches 1..t are the ones already trained and t+1..
follow the new weights; the batches the prefetcher had already built for t+1.. under the old weights are
dropped unread and rebuilt, and every domain's stream resumes at the element count the schedule gives for step t
(elements are numbered per domain and each is read once), so no document is skipped or read twice
(tests/test_online_mixing.py counts them).

Identical on every process: a single run's statistics are the train step's per-domain sums (replicated outputs,
already reduced over all devices and processes) and the strategies are deterministic numpy, so every process
computes the same update; the hook still gathers every process's result and adopts process 0's, counting any
disagreement (`mismatches`, expected 0) so heterogeneous hosts cannot drift apart. A swarm member is updated by
the one process that owns it (mixlm.members.member_owners), from its own row of the [K, D] sums.

Saved state (per member, in its data state under hooks.online_mixing): the strategy's state, the decision history
[{step, weights, probe}], and the statistics of the steps since the last update; the sampling weights themselves
are the source's mixture updates. A resumed run continues bitwise (tests/test_online_mixing.py).

Records: metrics rows `mixture/<domain>` at every decision (and `train_loss/<domain>` every step, from the
meter); at the end `mixture_final.yaml` and `mixture_average.yaml` (step-weighted, probes left out) in each
member's train.output_dir, mixtures that `mixlm train data.mixture=...` and `mix predict --mixtures` read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixlm import storage
from mixlm.collectives import allgather_json
from mixlm.errors import ConfigError
from mixlm.hooks import Hook, Run, evaluate_members
from mixlm.mixing.online.base import APPLY_MODES, Decision, DomainSignal, OnlineStrategy, vector
from mixlm.mixing.tables import write_mixture_yaml


@dataclasses.dataclass
class MemberMixing:
    """One member's online mixing: its strategy, how its mixture applies ('sampling' or 'objective'), its domains
    (its source's domain_names), the strategy's state (None until started) and every decision taken."""

    strategy: OnlineStrategy
    apply: str
    domains: tuple[str, ...] = ()
    state: dict | None = None
    history: list[dict] = dataclasses.field(default_factory=list)  # {"step", "weights", "probe"} per decision
    objective: np.ndarray | None = None  # apply == 'objective': the per-domain loss weights in force
    mismatches: int = 0  # updates where a process computed other weights than process 0

    def vector(self, weights: dict[str, float]) -> np.ndarray:
        return np.array([weights.get(d, 0.0) for d in self.domains], np.float64)

    def final_weights(self) -> dict[str, float] | None:
        kept = [h for h in self.history if not h["probe"]]
        return dict(zip(self.domains, kept[-1]["weights"])) if kept else None

    def average_weights(self, last_step: int) -> dict[str, float] | None:
        """Each domain's weight averaged over the steps (1..last_step), each step counting the decision in force
        for it; probe steps are left out, and steps before the first decision count its weights."""
        if not self.history:
            return None
        total, steps = np.zeros(len(self.domains)), 0
        for i, h in enumerate(self.history):
            end = self.history[i + 1]["step"] if i + 1 < len(self.history) else last_step
            start = 0 if i == 0 else h["step"]
            if not h["probe"] and end > start:
                total += (end - start) * vector(h["weights"])
                steps += end - start
        if steps == 0:
            return self.final_weights()
        return dict(zip(self.domains, (total / steps).tolist()))


def check_swarm_strategies(strategies: Sequence, processes: int) -> list[str]:
    """The members' strategies of one run (one: a single run) on `processes` jax processes: raises ConfigError
    for what one swarm cannot run together; returns the reference model folders they name (at most one)."""
    if len(strategies) > 1 and processes > 1:
        measuring = sorted({s.kind for s in strategies if s.measures_validation})
        if measuring:
            raise ConfigError(f"mixing.kind={measuring[0]} evaluates at member-specific steps, which a swarm over "
                              f"{processes} processes cannot line up; train it in a swarm on one process "
                              "(--shard I/N gives each host its own swarms) or as single runs")
    references = sorted({s.reference for s in strategies if s.needs_reference})
    if len(references) > 1:
        raise ConfigError(f"swarm members name {len(references)} reference models ({', '.join(references)}): "
                          "members of one swarm share one mixing.options.reference; train the others in "
                          "another swarm")
    return references


class OnlineMixingHook(Hook):
    """Runs a strategy per member on its cadence. `strategy`: one value every member runs (each with its own
    state), or one per member of a swarm. `apply` (one or one per member): 'sampling' (the source's weights) or
    'objective' (per-row loss multipliers weight_d / sampling_d, so the objective is sum_d weight_d * loss_d);
    default: the strategy's own. `eval_batches`: validation batches per domain for strategies that measure it
    (default eval.batches)."""

    state_key = "online_mixing"

    def __init__(self, strategy: OnlineStrategy | Sequence[OnlineStrategy], *, apply: str | Sequence[str] = "",
                 eval_batches: int | None = None):
        self.strategies = list(strategy) if isinstance(strategy, (list, tuple)) else None
        self.strategy = self.strategies[0] if self.strategies else strategy  # member 0's (a single run's)
        self.applies = list(apply) if isinstance(apply, (list, tuple)) else None
        for value in self.applies or [apply]:
            if value and value not in APPLY_MODES:
                raise ConfigError(f"mixing.apply={value!r}: expected {' or '.join(APPLY_MODES)}")
        self._apply = "" if self.applies else apply
        self.eval_batches = eval_batches
        self.members: dict[int, MemberMixing] = {}  # this process's members, by member index
        self._reference = None  # (params, jitted per-token loss) of DoReMi's reference model
        self._row_weights = None
        self._eval_cache = None

    @classmethod
    def from_configs(cls, cfgs: Sequence) -> OnlineMixingHook:
        """The hook every member's `mixing` section asks for (a single run: [cfg])."""
        from mixlm.mixing.online import strategy_from_config

        strategies = [strategy_from_config(c.mixing) for c in cfgs]
        applies = [c.mixing.apply for c in cfgs]
        return cls(strategies, apply=applies) if len(cfgs) > 1 else cls(strategies[0], apply=applies[0])

    # ---- one member's pieces ------------------------------------------------------------------------------
    def member_strategy(self, m: int) -> OnlineStrategy:
        return self.strategies[m] if self.strategies else self.strategy

    def member_apply(self, m: int) -> str:
        return (self.applies[m] if self.applies else self._apply) or self.member_strategy(m).applies_as

    def _mixer(self, run: Run, m: int) -> MemberMixing:
        if self.strategies and len(self.strategies) != run.members:
            raise ValueError(f"OnlineMixingHook got {len(self.strategies)} strategies for a run of {run.members} "
                             "members; give one, or one per member")
        if m not in self.members:
            self.members[m] = MemberMixing(self.member_strategy(m), self.member_apply(m))
        return self.members[m]

    # A single run's view (member 0), as tests and scripts read it.
    @property
    def history(self) -> list[dict]:
        return self.members[0].history if 0 in self.members else []

    @property
    def state(self) -> dict | None:
        return self.members[0].state if 0 in self.members else None

    @property
    def mismatches(self) -> int:
        return sum(mm.mismatches for mm in self.members.values())

    def final_weights(self, member: int = 0) -> dict[str, float] | None:
        return self.members[member].final_weights() if member in self.members else None

    def average_weights(self, last_step: int, member: int = 0) -> dict[str, float] | None:
        return self.members[member].average_weights(last_step) if member in self.members else None

    # ---- the hook contract --------------------------------------------------------------------------------
    def at_start(self, run: Run) -> None:
        everyone = [self.member_strategy(m) for m in range(run.members)]
        references = check_swarm_strategies(everyone, jax.process_count())
        if references and self._reference is None:  # a missing reference fails before any step
            self._reference = load_reference(run, references[0])
        due = []
        for m, source in run.training:
            mm = self._mixer(run, m)
            mm.domains = tuple(source.domain_names)
            if len(mm.domains) < mm.strategy.min_domains:
                raise ConfigError(f"mixing.kind={mm.strategy.kind} needs at least {mm.strategy.min_domains} domains "
                                  f"in data.mixture; this run has {len(mm.domains)} ({', '.join(mm.domains)})")
            if mm.state is None:  # a fresh run (a resumed one got its state from load_state_dict)
                state, decision = mm.strategy.start(mm.domains, mm.vector(source.current_weights()),
                                                    mm.vector(source.natural_weights()))
                self._adopt(run, m, source, run.step, state, decision)
                if run.step == 0 and mm.strategy.due(mm.state, 0):
                    due.append((m, source))
        self._update(run, 0, due)

    def due(self, run: Run, step: int) -> bool:
        return any(mm.strategy.due(mm.state, step) for m, mm in self.members.items() if m not in run.failed)

    def after_step(self, run: Run, step: int) -> None:
        run.flush()
        self._update(run, step, [(m, source) for m, source in run.training
                                 if self.members[m].strategy.due(self.members[m].state, step)])

    def before_step(self, run: Run, step: int, batch: dict) -> dict:
        if "domain_ids" in batch and self._weights_rows(run):
            batch = {**batch, "loss_weights": self._loss_weights(run, step, batch["domain_ids"])}
        if self._reference is not None:
            params, losses = self._reference
            batch = {**batch, "reference_nll": losses(params, batch)}
        return batch

    def at_end(self, run: Run) -> None:
        for m, _ in run.training:
            mm = self.members[m]
            final, average = mm.final_weights(), mm.average_weights(run.cfg.train.steps)
            if final is None:
                continue
            out = run.cfgs[m].train.output_dir
            if run.setup.writes(m):
                head = f"online mixing ({mm.strategy.kind}, {mm.apply} weights) of {out}"
                write_mixture_yaml(storage.join(out, "mixture_final.yaml"), final, f"{head}: the weights at the end")
                write_mixture_yaml(storage.join(out, "mixture_average.yaml"), average,
                                   f"{head}: the weights averaged over its {run.cfg.train.steps} steps")
            who = "" if run.members == 1 else f" member {m}"
            run.say(f"online mixing{who} ({mm.strategy.kind}): average " + _listing(average) + " -> "
                    f"{storage.join(out, 'mixture_average.yaml')} (and mixture_final.yaml)")

    def state_dict(self, run: Run, member: int) -> dict:
        mm = self.members.get(member)
        if mm is None or mm.state is None:
            return {}
        window = {k: v.tolist() for k, v in run.meter.domain_window[member].items()}
        return {"strategy": mm.state, "history": mm.history, "window": window,
                "window_steps": run.meter.window_steps[member], "mismatches": mm.mismatches}

    def load_state_dict(self, run: Run, member: int, state: dict) -> None:
        if not state:
            return
        mm = self._mixer(run, member)
        mm.state, mm.history = state["strategy"], list(state["history"])
        mm.mismatches = int(state.get("mismatches", 0))
        run.meter.domain_window[member] = {k: vector(v) for k, v in state["window"].items()}
        run.meter.window_steps[member] = int(state["window_steps"])
        if mm.apply == "objective" and mm.history:
            mm.objective = vector(mm.history[-1]["weights"])

    # ---- updates ------------------------------------------------------------------------------------------
    def _update(self, run: Run, step: int, due: list[tuple[int, object]]) -> None:
        """One update of each (member, source) in `due`, after optimizer step `step`."""
        measured = [m for m, _ in due if self.members[m].strategy.needs_validation(self.members[m].state, step)]
        val_loss = self._validation(run) if measured else {}
        for m, source in due:
            mm = self.members[m]
            d = len(mm.domains)
            window, steps = run.meter.take_domain_window(m)
            zeros = np.zeros(d)
            excess = window.get("domain_excess")
            signal = DomainSignal(
                step=step, domains=mm.domains, nll=window.get("domain_nll", zeros)[:d],
                tokens=window.get("domain_tokens", zeros)[:d], steps=steps,
                tokens_seen=mm.vector(source.tokens_seen()), weights=mm.vector(_sampling(source, step)),
                excess=None if excess is None else excess[:d], val_loss=val_loss.get(m) if m in measured else None)
            state, decision = mm.strategy.update(mm.state, signal)
            self._adopt(run, m, source, step, state, decision)

    def _adopt(self, run: Run, m: int, source, step: int, state: dict, decision: Decision | None) -> None:
        """Takes member m's (state, decision); a single run takes process 0's everywhere, counting a process that
        computed otherwise (a swarm member has one process: its owner)."""
        mm = self.members[m]
        chosen = {"state": state, "weights": None if decision is None else decision.weights.tolist(),
                  "probe": bool(decision is not None and decision.probe)}
        if run.members == 1:
            everyone = allgather_json(chosen)
            if any(other != everyone[0] for other in everyone[1:]):
                mm.mismatches += 1
                run.say(f"online mixing: at step {step} the processes computed different weights; process 0's are "
                        "used")
            chosen = everyone[0]
        mm.state = chosen["state"]
        if chosen["weights"] is None:
            return
        weights = vector(chosen["weights"])
        mm.history.append({"step": step, "weights": chosen["weights"], "probe": chosen["probe"]})
        if mm.apply == "sampling":
            if not np.array_equal(weights, mm.vector(source.current_weights())):
                source.set_weights(dict(zip(mm.domains, weights.tolist())))
        else:
            mm.objective = weights
        run.logs[m].write(step, {f"mixture/{d}": float(w) for d, w in zip(mm.domains, weights)})

    def _validation(self, run: Run) -> dict[int, np.ndarray]:
        """Each of this process's members' validation loss per domain (its domains' order), now."""
        batches = self.eval_batches if self.eval_batches is not None else run.cfg.eval.batches
        if batches < 1:
            raise ConfigError(f"mixing.kind={self.strategy.kind} measures validation losses: set eval.batches >= 1")
        if self._eval_cache is None:
            self._eval_cache = [src.eval_batches(batches) for src in run.sources]
        trained = tuple(run.sources[0].domain_names)  # eval-only domains (eval.domains) are not mixed
        losses = evaluate_members(run.setup, run.state.params,
                                  [{d: cache[d] for d in trained} for cache in self._eval_cache])
        return {m: np.array([losses[m][f"val_loss/{d}"] for d in self.members[m].domains])
                for m, _ in run.training}

    # ---- what the step gets -------------------------------------------------------------------------------
    def _weights_rows(self, run: Run) -> bool:
        """Whether steps carry per-row loss weights: a single run once its objective weights are set; a swarm
        whenever any member applies objective weights (every member's batch has the same keys)."""
        if run.members == 1:
            return 0 in self.members and self.members[0].objective is not None
        return any(self.member_apply(m) == "objective" for m in range(run.members))

    def _loss_weights(self, run: Run, step: int, domain_ids: jax.Array) -> jax.Array:
        """Per-row multipliers objective_d / sampling_d of each row's domain d (1 for a sampling member)."""
        width = max(run.setup.num_domains, 1)
        table = np.ones((run.members, width), np.float32)
        for m, source in run.training:
            mm = self.members[m]
            if mm.objective is None:
                continue
            sampling = mm.vector(_sampling(source, step))
            multipliers = np.where(sampling > 0, mm.objective / np.where(sampling > 0, sampling, 1.0), 0.0)
            table[m, :len(multipliers)] = multipliers
        if self._row_weights is None:
            if run.members == 1:
                self._row_weights = jax.jit(lambda t, ids: t[0][ids], out_shardings=run.setup.layout.batch_sharding(1))
            else:
                self._row_weights = jax.jit(lambda t, ids: jnp.take_along_axis(t, ids, axis=1),
                                            out_shardings=run.setup.batch_sharding(2))
        if run.members == 1:
            return self._row_weights(table, domain_ids)
        return self._row_weights(run.setup.put_members(table), domain_ids)


def _sampling(source, step: int) -> dict[str, float]:
    """The sampling weights of step `step`'s batch (before step 1: the first batch's)."""
    return source.weights_at(max(step - 1, 0))


def _listing(weights: dict[str, float]) -> str:
    return ", ".join(f"{d} {w:.4f}" for d, w in weights.items())


def load_reference(run: Run, path: str):
    """(params, jitted per-token loss function) of the reference model saved under `path` (a run folder, its
    checkpoints/ or one step folder): the same architecture as the run's model, on one member's shardings; the
    function takes the run's device batch (a swarm's [K, B, L]: every member scored by the one reference)."""
    from mixlm.checkpoint import CheckpointError, resolve_step_dir, restore_params
    from mixlm.members import over_members
    from mixlm.models import forward

    setup = run.setup
    try:
        step_dir = resolve_step_dir(path)
        params = restore_params(step_dir, setup.member_abstract_params, run.cfg.model.vocab_size)
    except CheckpointError as e:
        raise ConfigError(f"mixing.options.reference={path!r}: {str(e).split(': ', 1)[-1]}") from None
    graphdef, vocab, layout = setup.graphdef, run.cfg.model.vocab_size, setup.layout

    def per_token_loss(p, batch):
        logits_BxLxV = forward.batch_logits(graphdef, p, batch, vocab_size=vocab, layout=layout)
        return forward.token_losses(logits_BxLxV, batch["targets"])[0]

    run.say(f"online mixing: reference model from {step_dir}")
    if setup.members == 1:
        return params, jax.jit(per_token_loss, out_shardings=layout.batch_sharding(2))

    def members_loss(p, batch):
        return over_members(lambda b: per_token_loss(p, b), setup.member_map)(batch)

    return params, jax.jit(members_loss, out_shardings=setup.batch_sharding(3))


__all__ = ["MemberMixing", "OnlineMixingHook", "check_swarm_strategies", "load_reference"]
