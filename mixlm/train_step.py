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
# Per-domain sums a train step returns (domain_sums), each [num_domains] per member.
DOMAIN_SUMS = ("domain_nll", "domain_tokens", "domain_excess")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: Any


def batch_sums(graphdef, params: dict, batch: dict, *, vocab_size: int, z_loss: float, layout: Layout | None = None,
               num_domains: int = 0):
    """Summed (not averaged) objective over the batch's unmasked tokens, so micro-batches add up
    exactly to the large batch. Returns (objective, (nll_sum, z_sum, tokens, per_domain)); only the objective is
    differentiable. The cross-entropy runs over chunks of positions, never the whole [tokens, vocab] logits
    (mixlm.models.forward.batch_loss_sums).

    A batch may carry 'loss_weights' [B] (per-row multipliers of the objective: online mixing's objective
    weights, DoReMi's); nll_sum, z_sum and tokens stay unweighted. With `num_domains` and the batch's
    'domain_ids' [B], `per_domain` holds one segment-sum over rows of {'domain_nll', 'domain_tokens'} [D] (and
    'domain_excess' [D], the summed max(nll - reference_nll, 0), when the batch carries a reference model's
    per-token 'reference_nll' [B, L]), each row's sums taken in the same chunks as the loss; else it is empty."""
    by_domain = bool(num_domains) and "domain_ids" in batch
    objective, (nll_sum, z_sum, tokens, rows) = forward.batch_loss_sums(
        graphdef, params, batch, vocab_size=vocab_size, z_loss=z_loss, layout=layout, rows=by_domain)
    per_domain = domain_sums(rows, batch["domain_ids"], num_domains) if by_domain else {}
    return objective, (nll_sum, z_sum, tokens, per_domain)


def domain_sums(rows: dict[str, jax.Array], domain_ids_B: jax.Array, num_domains: int) -> dict[str, jax.Array]:
    """Per-domain sums [D] of a batch's per-row sums (forward.batch_loss_sums' {'nll', 'tokens'[, 'excess']},
    each [B]) by one segment-sum over its rows (a packed row holds one domain's documents, so a row's domain is
    each of its segments' domain): 'domain_nll' (summed loss), 'domain_tokens' (loss tokens) and 'domain_excess'
    (summed max(nll - reference, 0): DoReMi's clipped excess loss)."""
    columns = [key for key in ("nll", "tokens", "excess") if key in rows]
    sums_DxC = jax.ops.segment_sum(jnp.stack([rows[key] for key in columns], axis=1), domain_ids_B,
                                   num_segments=num_domains)
    return {f"domain_{key}": sums_DxC[:, i] for i, key in enumerate(columns)}


def split_microbatches(batch: dict, k: int) -> dict:
    """[k*b, ...] → [k, b, ...], micro-batch i = rows i, i+k, i+2k, ...: every device keeps its own rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, vocab_size: int, z_loss: float,
                    grad_accum_steps: int, layout: Layout | None = None, num_domains: int = 0) -> Callable:
    """train_step(state, batch) -> (state, metrics): one optimizer step over the whole batch. With
    `num_domains`, metrics also hold the per-domain sums of batch_sums ('domain_nll', 'domain_tokens'[,
    'domain_excess'], each [num_domains]) of batches that carry 'domain_ids'."""
    grad_fn = jax.value_and_grad(
        lambda p, b: batch_sums(graphdef, p, b, vocab_size=vocab_size, z_loss=z_loss, layout=layout,
                                num_domains=num_domains), has_aux=True
    )

    def train_step(state: TrainState, batch: dict):
        if grad_accum_steps == 1:
            (_, (nll_sum, z_sum, tokens, per_domain)), grad_sums = grad_fn(state.params, batch)
        else:
            micro_batches = split_microbatches(batch, grad_accum_steps)

            def micro_step(carry, micro):
                acc_grads, acc = carry
                (_, aux), g = grad_fn(state.params, micro)
                return (jax.tree.map(jnp.add, acc_grads, g), jax.tree.map(jnp.add, acc, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            _, aux_shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches))[0]
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
            (grad_sums, (nll_sum, z_sum, tokens, per_domain)), _ = jax.lax.scan(micro_step, init, micro_batches)
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
            **per_domain,  # [num_domains] vectors: the meter logs train_loss/<domain>, online mixing reads them
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef, *, vocab_size: int, layout: Layout | None = None) -> Callable:
    """eval_step(params, batch) -> (nll_sum, tokens)."""

    def eval_step(params, batch):
        _, (nll_sum, _, tokens, _) = batch_sums(graphdef, params, batch, vocab_size=vocab_size, z_loss=0.0,
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
