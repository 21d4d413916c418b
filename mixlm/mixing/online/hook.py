"""The loop side of online mixing: a hook that feeds a strategy the per-domain statistics of the steps since its
last update and applies the mixture it returns at the next step boundary.

    hooks = default_hooks(cfg, OnlineMixingHook(ADO(every=20)))        # or mixing.kind=ado in the config

How a switch loses no data: the batch of step s is a pure function of (data, mixture stages, s). An update after
step t appends a stage at t (the source's set_weights), so batches 1..t are the ones already trained and t+1..
follow the new weights; the batches the prefetcher had already built for t+1.. under the old weights are
dropped unread and rebuilt, and every domain's stream resumes at the element count the schedule gives for step t
(elements are numbered per domain and each is read once), so no document is skipped or read twice
(tests/test_online_mixing.py counts them).

Identical on every process: the statistics are the train step's per-domain sums (replicated outputs, already
reduced over all devices and processes) and the strategies are deterministic numpy, so every process computes
the same update; the hook still gathers every process's result and adopts process 0's, counting any
disagreement (`mismatches`, expected 0) so heterogeneous hosts cannot drift apart.

Saved state (the checkpoint's data state, under hooks.online_mixing): the strategy's state, the decision history
[{step, weights, probe}], and the statistics of the steps since the last update; the sampling weights
themselves are the source's mixture updates. A resumed run continues bitwise (tests/test_online_mixing.py).

Records: metrics rows `mixture/<domain>` at every decision (and `train_loss/<domain>` every step, from the
meter); at the end `mixture_final.yaml` and `mixture_average.yaml` (step-weighted, probes left out) in
train.output_dir, mixtures that `mixlm train data.mixture=...` and `mix predict --mixtures` read.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from mixlm.collectives import allgather_json
from mixlm.errors import ConfigError
from mixlm.hooks import Hook, Run, evaluate
from mixlm.mixing.online.base import APPLY_MODES, Decision, DomainSignal, OnlineStrategy, vector
from mixlm.mixing.tables import write_mixture_yaml


class OnlineMixingHook(Hook):
    """Runs `strategy` on its cadence; `apply`: 'sampling' (the source's weights) or 'objective' (per-row loss
    multipliers weight_d / sampling_d, so the objective is sum_d weight_d * loss_d); default: the strategy's own.
    `eval_batches`: validation batches per domain for strategies that measure it (default eval.batches)."""

    state_key = "online_mixing"

    def __init__(self, strategy: OnlineStrategy, *, apply: str = "", eval_batches: int | None = None):
        self.strategy = strategy
        self.apply = apply or strategy.applies_as
        if self.apply not in APPLY_MODES:
            raise ConfigError(f"mixing.apply={apply!r}: expected {' or '.join(APPLY_MODES)}")
        self.eval_batches = eval_batches
        self.state: dict | None = None  # the strategy's state, None until started
        self.history: list[dict] = []  # {"step", "weights", "probe"} of every decision
        self.mismatches = 0  # updates where a process computed other weights than process 0
        self._domains: tuple[str, ...] = ()
        self._objective: np.ndarray | None = None
        self._reference = None  # (params, jitted per-token loss) of DoReMi's reference model
        self._row_weights = None
        self._eval_cache = None

    # ---- the hook contract ----------------------------------------------------------------------------------
    def at_start(self, run: Run) -> None:
        self._domains = tuple(run.source.domain_names)
        if len(self._domains) < self.strategy.min_domains:
            raise ConfigError(f"mixing.kind={self.strategy.kind} needs at least {self.strategy.min_domains} domains in "
                              f"data.mixture; this run has {len(self._domains)} ({', '.join(self._domains)})")
        if self.strategy.needs_reference and self._reference is None:  # a missing reference: before any step
            self._reference = load_reference(run, self.strategy.reference)
        if self.state is None:  # a fresh run (a resumed one got its state from load_state_dict)
            weights = self._vector(run.source.current_weights())
            natural = self._vector(run.source.natural_weights())
            self.state, decision = self.strategy.start(self._domains, weights, natural)
            self._adopt(run, run.step, self.state, decision)
            if run.step == 0 and self.strategy.due(self.state, 0):
                self._update(run, 0)

    def due(self, run: Run, step: int) -> bool:
        return self.strategy.due(self.state, step)

    def after_step(self, run: Run, step: int) -> None:
        self._update(run, step)

    def before_step(self, run: Run, step: int, batch: dict) -> dict:
        if self.apply == "objective" and self._objective is not None and "domain_ids" in batch:
            batch = {**batch, "loss_weights": self._loss_weights(run, step, batch["domain_ids"])}
        if self.strategy.needs_reference:
            batch = {**batch, "reference_nll": self._reference_losses(run, batch)}
        return batch

    def at_end(self, run: Run) -> None:
        final, average = self.final_weights(), self.average_weights(run.cfg.train.steps)
        if jax.process_index() == 0 and final is not None:
            head = f"online mixing ({self.strategy.kind}, {self.apply} weights) of {run.out_dir}"
            write_mixture_yaml(run.out_dir / "mixture_final.yaml", final, f"{head}: the weights at the end")
            write_mixture_yaml(run.out_dir / "mixture_average.yaml", average,
                               f"{head}: the weights averaged over its {run.cfg.train.steps} steps")
        if final is not None:
            run.say(f"online mixing ({self.strategy.kind}): average " + _listing(average) + " -> "
                    f"{Path(run.out_dir) / 'mixture_average.yaml'} (and mixture_final.yaml)")

    def state_dict(self, run: Run) -> dict:
        window = {k: v.tolist() for k, v in run.meter.domain_window.items()}
        return {"strategy": self.state, "history": self.history, "window": window,
                "window_steps": run.meter.window_steps, "mismatches": self.mismatches}

    def load_state_dict(self, run: Run, state: dict) -> None:
        self.state, self.history = state["strategy"], list(state["history"])
        self.mismatches = int(state.get("mismatches", 0))
        run.meter.domain_window = {k: vector(v) for k, v in state["window"].items()}
        run.meter.window_steps = int(state["window_steps"])
        if self.apply == "objective" and self.history:
            self._objective = vector(self.history[-1]["weights"])

    # ---- updates ----------------------------------------------------------------------------------------------
    def _vector(self, weights: dict[str, float]) -> np.ndarray:
        return np.array([weights.get(d, 0.0) for d in self._domains], np.float64)

    def _update(self, run: Run, step: int) -> None:
        run.flush()
        window, steps = run.meter.take_domain_window()
        zeros = np.zeros(len(self._domains))
        signal = DomainSignal(
            step=step, domains=self._domains, nll=window.get("domain_nll", zeros),
            tokens=window.get("domain_tokens", zeros), steps=steps,
            tokens_seen=self._vector(run.source.tokens_seen()), weights=self._vector(self._sampling(run, step)),
            excess=window.get("domain_excess"),
            val_loss=self._validation(run) if self.strategy.needs_validation(self.state, step) else None)
        state, decision = self.strategy.update(self.state, signal)
        self._adopt(run, step, state, decision)

    def _adopt(self, run: Run, step: int, state: dict, decision: Decision | None) -> None:
        """Takes process 0's (state, decision) everywhere, counting a process that computed otherwise."""
        mine = {"state": state, "weights": None if decision is None else decision.weights.tolist(),
                "probe": bool(decision is not None and decision.probe)}
        everyone = allgather_json(mine)
        if any(other != everyone[0] for other in everyone[1:]):
            self.mismatches += 1
            run.say(f"online mixing: at step {step} the processes computed different weights; process 0's are used")
        chosen = everyone[0]
        self.state = chosen["state"]
        if chosen["weights"] is None:
            return
        weights = vector(chosen["weights"])
        self.history.append({"step": step, "weights": chosen["weights"], "probe": chosen["probe"]})
        if self.apply == "sampling":
            if not np.array_equal(weights, self._vector(run.source.current_weights())):
                run.source.set_weights(dict(zip(self._domains, weights.tolist())))
        else:
            self._objective = weights
        run.log.write(step, {f"mixture/{d}": float(w) for d, w in zip(self._domains, weights)})

    def _sampling(self, run: Run, step: int) -> dict[str, float]:
        """The sampling weights of step `step`'s batch (before step 1: the first batch's)."""
        return run.source.weights_at(max(step - 1, 0))

    def _validation(self, run: Run) -> np.ndarray:
        batches = self.eval_batches if self.eval_batches is not None else run.cfg.eval.batches
        if batches < 1:
            raise ConfigError(f"mixing.kind={self.strategy.kind} measures validation losses: set eval.batches >= 1")
        if self._eval_cache is None:
            self._eval_cache = run.source.eval_batches(batches)
        run.flush()
        losses = evaluate(run.setup, run.state.params, {d: self._eval_cache[d] for d in self._domains})
        return np.array([losses[f"val_loss/{d}"] for d in self._domains])

    # ---- what the step gets -------------------------------------------------------------------------------
    def _loss_weights(self, run: Run, step: int, domain_ids: jax.Array) -> jax.Array:
        sampling = self._vector(self._sampling(run, step))
        multipliers = np.where(sampling > 0, self._objective / np.where(sampling > 0, sampling, 1.0), 0.0)
        if self._row_weights is None:
            sharding = run.setup.layout.batch_sharding(1)
            self._row_weights = jax.jit(lambda table, ids: table[ids], out_shardings=sharding)
        return self._row_weights(multipliers.astype(np.float32), domain_ids)

    def _reference_losses(self, run: Run, batch: dict) -> jax.Array:
        params, losses = self._reference
        return losses(params, batch)

    # ---- what the run learned -----------------------------------------------------------------------------
    def final_weights(self) -> dict[str, float] | None:
        kept = [h for h in self.history if not h["probe"]]
        return dict(zip(self._domains, kept[-1]["weights"])) if kept else None

    def average_weights(self, last_step: int) -> dict[str, float] | None:
        """Each domain's weight averaged over the steps (1..last_step), each step counting the decision in force
        for it; probe steps are left out, and steps before the first decision count its weights."""
        if not self.history:
            return None
        total, steps = np.zeros(len(self._domains)), 0
        for i, h in enumerate(self.history):
            end = self.history[i + 1]["step"] if i + 1 < len(self.history) else last_step
            start = 0 if i == 0 else h["step"]
            if not h["probe"] and end > start:
                total += (end - start) * vector(h["weights"])
                steps += end - start
        if steps == 0:
            return self.final_weights()
        return dict(zip(self._domains, (total / steps).tolist()))


def _listing(weights: dict[str, float]) -> str:
    return ", ".join(f"{d} {w:.4f}" for d, w in weights.items())


def load_reference(run: Run, path: str):
    """(params, jitted per-token loss function) of the reference model saved under `path` (a run folder, its
    checkpoints/ or one step folder): the same architecture as the run's model, on the run's shardings."""
    from mixlm.checkpoint import CheckpointError, resolve_step_dir, restore_params
    from mixlm.models import forward

    try:
        step_dir = resolve_step_dir(path)
        params = restore_params(step_dir, run.setup.abstract_state.params, run.cfg.model.vocab_size)
    except CheckpointError as e:
        raise ConfigError(f"mixing.options.reference={path!r}: {str(e).split(': ', 1)[-1]}") from None
    graphdef, vocab, layout = run.setup.graphdef, run.cfg.model.vocab_size, run.setup.layout

    def per_token_loss(p, batch):
        logits_BxLxV = forward.batch_logits(graphdef, p, batch, vocab_size=vocab, layout=layout)
        return forward.token_losses(logits_BxLxV, batch["targets"])[0]

    run.say(f"online mixing: reference model from {step_dir}")
    return params, jax.jit(per_token_loss, out_shardings=layout.batch_sharding(2))


__all__ = ["OnlineMixingHook", "load_reference"]
