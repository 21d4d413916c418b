"""The train state and the two jitted bodies of a run: one optimizer step over a batch (with gradient
accumulation) and the summed validation loss of a batch.

The state is a pytree of plain arrays (step, params as a nested dict, optax state) so that jit, sharding and
Orbax see ordinary values; the NNX module is rebuilt from (graphdef, params) inside the step. mixlm.setup jits
these bodies for one run, or maps them over a leading member axis for a swarm (mixlm.members).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mixlm.models import forward
from mixlm.sharding import Layout

# Metrics of a step that must be finite: a member (or run) with one that is not has failed.
GUARDED_METRICS = ("loss", "log_z_sq", "grad_norm", "param_norm", "update_norm")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: Any


def batch_sums(graphdef, params: dict, batch: dict, *, vocab_size: int, z_loss: float, layout: Layout | None = None):
    """Summed (not averaged) objective over the batch's unmasked tokens, so micro-batches add up
    exactly to the large batch. Returns (objective, (nll_sum, z_sum, tokens)); only the objective is
    differentiable. The cross-entropy runs over chunks of positions, never the whole [tokens, vocab] logits
    (mixlm.models.forward.batch_loss_sums)."""
    return forward.batch_loss_sums(graphdef, params, batch, vocab_size=vocab_size, z_loss=z_loss, layout=layout)


def split_microbatches(batch: dict, k: int) -> dict:
    """[k*b, ...] → [k, b, ...], micro-batch i = rows i, i+k, i+2k, ...: every device keeps its own rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, vocab_size: int, z_loss: float,
                    grad_accum_steps: int, layout: Layout | None = None) -> Callable:
    """train_step(state, batch) -> (state, metrics): one optimizer step over the whole batch."""
    grad_fn = jax.value_and_grad(
        lambda p, b: batch_sums(graphdef, p, b, vocab_size=vocab_size, z_loss=z_loss, layout=layout), has_aux=True
    )

    def train_step(state: TrainState, batch: dict):
        if grad_accum_steps == 1:
            (_, (nll_sum, z_sum, tokens)), grad_sums = grad_fn(state.params, batch)
        else:
            def micro_step(carry, micro):
                acc_grads, acc = carry
                (_, aux), g = grad_fn(state.params, micro)
                return (jax.tree.map(jnp.add, acc_grads, g), jax.tree.map(jnp.add, acc, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, (jnp.float32(0), jnp.float32(0), jnp.float32(0)))
            (grad_sums, (nll_sum, z_sum, tokens)), _ = jax.lax.scan(
                micro_step, init, split_microbatches(batch, grad_accum_steps)
            )
        n = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / n, grad_sums)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": nll_sum / n,
            "log_z_sq": z_sum / n,  # mean log(Z)^2: the z-loss statistic (penalised only with train.z_loss > 0)
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            "lr": schedule(state.step),
            "tokens_step": tokens,  # loss tokens of this step (the meter adds tokens_total, cumulative)
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef, *, vocab_size: int, layout: Layout | None = None) -> Callable:
    """eval_step(params, batch) -> (nll_sum, tokens)."""

    def eval_step(params, batch):
        _, (nll_sum, _, tokens) = batch_sums(graphdef, params, batch, vocab_size=vocab_size, z_loss=0.0,
                                             layout=layout)
        return nll_sum, tokens

    return eval_step


def all_finite(metrics: dict) -> jax.Array:
    """Whether every guarded metric (GUARDED_METRICS) is finite: [K] bool for [K] metrics."""
    return jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in GUARDED_METRICS if k in metrics]), axis=0)


def masked_step(step_fn: Callable) -> Callable:
    """(state [K, ...], alive [K], batch) -> (state, alive, metrics [K]): `step_fn` over members, a member whose
    step gives a non-finite guarded metric is marked dead and keeps its last good state (its update is masked,
    so the other members' arithmetic never sees its values)."""

    def step(state, alive_K, batch):
        new_state, metrics = step_fn(state, batch)
        alive_K = alive_K & all_finite(metrics)
        state = jax.tree.map(lambda new, old: jnp.where(alive_K.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                             new_state, state)
        return state, alive_K, metrics

    return step
