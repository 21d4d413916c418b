"""The one forward pass over (graphdef, params): training, validation, export verification, lm-eval on a
live model and perplexity scoring all call these, so the padded vocabulary is handled in one place.

    logits_BxLxV = forward.logits(graphdef, params, tokens_BxL, vocab_size=V)         # float32, V_pad wide
    nll_BxL, log_z_BxL = forward.token_losses(logits_BxLxV, targets_BxL)
    logp_BxLxV = forward.log_probs(graphdef, params, tokens_BxL, vocab_size=V)       # real vocabulary only
    objective, (nll_sum, z_sum, tokens) = forward.batch_loss_sums(graphdef, params, batch, vocab_size=V,
                                                                  z_loss=z, layout=layout)  # training / eval

The training loss never holds the whole [tokens, V_pad] float32 logits: `batch_loss_sums` takes the model's
final hidden states and LM-head kernel and runs the cross-entropy over chunks of positions (`loss_sums`), each
chunk's logits computed, used and dropped; its gradient is formed in the same pass (a custom VJP), so the
backward never recomputes or stores logits. A regmix-1m proxy at 512 x 2048 tokens has 200 GB of fp32 logits.

The embedding and LM head have V_pad >= V rows (padded so the vocabulary shards evenly); ids >= V never
occur in data, and `logits` gives them -1e9 so every softmax / logsumexp ignores them while the array keeps
its sharded V_pad width.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from mixlm.models import layers
from mixlm.models.params import merge_params

PADDED_LOGIT = -1e9
# One loss chunk's float32 logits on one device stay under this: ~4 such arrays are live at once (logits,
# probabilities, their gradient in the compute dtype), and each chunk's LM-head gradient is reduced over the
# batch shards, so fewer, larger chunks cost less communication.
LOSS_CHUNK_BYTES = 256 << 20


def mask_padded_vocab(logits_BxLxV: jax.Array, vocab_size: int) -> jax.Array:
    """Sets the logits of padded ids (>= vocab_size) to -1e9 so softmax / logsumexp ignore them."""
    if logits_BxLxV.shape[-1] <= vocab_size:
        return logits_BxLxV
    ids_V = jnp.arange(logits_BxLxV.shape[-1])
    keep_11V = (ids_V < vocab_size).reshape((1,) * (logits_BxLxV.ndim - 1) + (-1,))
    return jnp.where(keep_11V, logits_BxLxV, jnp.asarray(PADDED_LOGIT, logits_BxLxV.dtype))


def logits(graphdef, params: dict, tokens_BxL: jax.Array, *, vocab_size: int,
           positions_BxL: jax.Array | None = None, segment_ids_BxL: jax.Array | None = None,
           layout=None) -> jax.Array:
    """float32 logits [B, L, V_pad] of the model (graphdef, params), padded ids masked. Traceable. With a
    `layout` (mixlm.sharding.Layout) activations and logits keep the shardings of its rule table."""
    model = merge_params(graphdef, params)
    out_BxLxV = model(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL, layout=layout)
    out_BxLxV = layers.constrain(out_BxLxV, ("batch", "length", "vocab"), layout)
    return mask_padded_vocab(out_BxLxV.astype(jnp.float32), vocab_size)


def batch_logits(graphdef, params: dict, batch: dict, *, vocab_size: int, layout=None) -> jax.Array:
    """`logits` of a packed batch dict (inputs, optional positions / segment_ids)."""
    return logits(graphdef, params, batch["inputs"], vocab_size=vocab_size, positions_BxL=batch.get("positions"),
                  segment_ids_BxL=batch.get("segment_ids"), layout=layout)


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                 vocab_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood, log partition) per token, in float32. Padded vocabulary rows (ids >=
    vocab_size, when given; `logits` has already masked them) never receive probability."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    if vocab_size is not None:
        logits_BxLxV = mask_padded_vocab(logits_BxLxV, vocab_size)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL, log_z_BxL


def batch_hidden(graphdef, params: dict, batch: dict, *, layout=None) -> tuple[jax.Array, jax.Array] | None:
    """(final hidden states [B, L, D] in the compute dtype, LM-head kernel [D, V_pad] in the same dtype) of a
    packed batch, or None for a model family without `hidden` / `output_kernel` (its logits are used whole)."""
    model = merge_params(graphdef, params)
    if not (hasattr(model, "hidden") and hasattr(model, "output_kernel")):
        return None
    hidden_BxLxD = model.hidden(batch["inputs"], positions_BxL=batch.get("positions"),
                                segment_ids_BxL=batch.get("segment_ids"), layout=layout)
    return hidden_BxLxD, model.output_kernel().astype(hidden_BxLxD.dtype)


def batch_loss_sums(graphdef, params: dict, batch: dict, *, vocab_size: int, z_loss: float, layout=None,
                    chunk_len: int | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Summed (not averaged) training objective over a batch's unmasked tokens: (nll_sum + z_loss * z_sum,
    (nll_sum, z_sum, tokens)), z_sum = sum of log(Z)^2; only the objective is differentiable. Chunked over
    positions (`loss_sums`) for families with `hidden`, whole logits otherwise."""
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    features = batch_hidden(graphdef, params, batch, layout=layout)
    if features is None:
        nll_BxL, log_z_BxL = token_losses(batch_logits(graphdef, params, batch, vocab_size=vocab_size, layout=layout),
                                          batch["targets"])
        nll_sum, z_sum = jnp.sum(nll_BxL * mask_BxL), jnp.sum(jnp.square(log_z_BxL) * mask_BxL)
        sums = (jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum))
        return nll_sum + z_loss * z_sum, (*sums, jnp.sum(mask_BxL))
    objective, nll_sum, z_sum = loss_sums(*features, batch["targets"], mask_BxL, vocab_size=vocab_size,
                                          z_loss=z_loss, layout=layout, chunk_len=chunk_len)
    return objective, (nll_sum, z_sum, jnp.sum(mask_BxL))


@contextlib.contextmanager
def loss_chunk_budget(budget_bytes: int):
    """Programs traced inside chunk their loss to `budget_bytes` of float32 logits per device instead of
    LOSS_CHUNK_BYTES (mixlm.compiled.plan times a chunk by compiling the step with chunks twice as long). A
    jitted function already traced keeps its chunks: trace a fresh one inside."""
    global LOSS_CHUNK_BYTES
    saved, LOSS_CHUNK_BYTES = LOSS_CHUNK_BYTES, budget_bytes
    try:
        yield
    finally:
        LOSS_CHUNK_BYTES = saved


def loss_chunk_len_for(rows: int, length: int, vocab_padded: int, layout=None) -> int:
    """The chunk length loss_sums uses for a [rows, length] batch and a vocab_padded-wide LM head under
    `layout` (rows and vocabulary split as the rule table splits them)."""
    return loss_chunk_len(rows // _shards(layout, "batch", rows), length,
                          vocab_padded // _shards(layout, "vocab", vocab_padded))


def loss_chunk_len(rows: int, length: int, vocab: int, budget_bytes: int | None = None) -> int:
    """The largest divisor c of `length` whose chunk of float32 logits (rows x c x vocab, per device) fits in
    `budget_bytes` (default LOSS_CHUNK_BYTES); 1 when even one position per row does not."""
    budget_bytes = LOSS_CHUNK_BYTES if budget_bytes is None else budget_bytes
    fitting = [c for c in range(1, length + 1) if length % c == 0 and rows * c * vocab * 4 <= budget_bytes]
    return max(fitting, default=1)


def loss_sums(hidden_BxLxD: jax.Array, kernel_DxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array, *,
              vocab_size: int, z_loss: float, layout=None, chunk_len: int | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective, nll_sum, z_sum) of the logits hidden @ kernel (float32, padded ids masked) against the
    targets, weighted by the mask: nll_sum = sum mask * (log Z - target logit), z_sum = sum mask * log(Z)^2,
    objective = nll_sum + z_loss * z_sum. Computed over chunks of `chunk_len` positions (default: the longest
    whose logits fit LOSS_CHUNK_BYTES per device under `layout`); the gradient of the objective with respect to
    hidden and kernel is formed in the same pass. nll_sum and z_sum are metrics: no gradient flows from them."""
    batch, length, _ = hidden_BxLxD.shape
    if chunk_len is None:
        chunk_len = loss_chunk_len_for(batch, length, kernel_DxV.shape[1], layout)
    if length % chunk_len:
        raise ValueError(f"loss chunk of {chunk_len} positions does not divide the sequence length {length}")

    def chunked(x):  # [B, L, ...] -> [L / c, B, c, ...]: chunk i holds positions [i c, (i + 1) c) of every row
        return jnp.moveaxis(x.reshape(batch, length // chunk_len, chunk_len, *x.shape[2:]), 1, 0)

    objective, nll_sum, z_sum = _chunked_loss(chunked(hidden_BxLxD), kernel_DxV, chunked(targets_BxL),
                                              chunked(mask_BxL.astype(jnp.float32)), vocab_size, float(z_loss),
                                              layout)
    return objective, jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum)


def _shards(layout, logical: str, size: int) -> int:
    """Devices a dimension of `size` named `logical` splits over under `layout` (1 when it stays whole)."""
    if layout is None:
        return 1
    n = layout.axis_size(logical)
    return n if size % n == 0 else 1


def _chunk_logits(x_BxCxD, kernel_DxV, vocab_size, layout):
    logits_BxCxV = jnp.dot(x_BxCxD, kernel_DxV, preferred_element_type=jnp.float32)
    return mask_padded_vocab(layers.constrain(logits_BxCxV, ("batch", "length", "vocab"), layout), vocab_size)


def _chunk_sums(x_BxCxD, kernel_DxV, targets_BxC, mask_BxC, vocab_size, layout):
    """(nll sum, log(Z)^2 sum, logits, log Z) of one chunk."""
    logits_BxCxV = _chunk_logits(x_BxCxD, kernel_DxV, vocab_size, layout)
    nll_BxC, log_z_BxC = token_losses(logits_BxCxV, targets_BxC)
    return jnp.sum(nll_BxC * mask_BxC), jnp.sum(jnp.square(log_z_BxC) * mask_BxC), logits_BxCxV, log_z_BxC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_loss(x_NxBxCxD, kernel_DxV, targets_NxBxC, mask_NxBxC, vocab_size, z_loss, layout):
    def body(sums, chunk):
        x_BxCxD, targets_BxC, mask_BxC = chunk
        nll, z, _, _ = _chunk_sums(x_BxCxD, kernel_DxV, targets_BxC, mask_BxC, vocab_size, layout)
        return (sums[0] + nll, sums[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (x_NxBxCxD, targets_NxBxC, mask_NxBxC))
    return nll_sum + z_loss * z_sum, nll_sum, z_sum


def _chunked_loss_fwd(x_NxBxCxD, kernel_DxV, targets_NxBxC, mask_NxBxC, vocab_size, z_loss, layout):
    """The sums and, chunk by chunk, d objective / d logits = mask * ((1 + 2 z log Z) softmax - onehot)
    pushed through the LM head: dx per chunk, dkernel summed in float32."""
    ids_11V = jnp.arange(kernel_DxV.shape[1]).reshape(1, 1, -1)

    def body(carry, chunk):
        nll_sum, z_sum, dkernel_DxV = carry
        x_BxCxD, targets_BxC, mask_BxC = chunk
        nll, z, logits_BxCxV, log_z_BxC = _chunk_sums(x_BxCxD, kernel_DxV, targets_BxC, mask_BxC, vocab_size,
                                                      layout)
        probs_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        scale_BxC = mask_BxC * (1.0 + 2.0 * z_loss * log_z_BxC)
        dlogits_BxCxV = probs_BxCxV * scale_BxC[..., None] - jnp.where(
            ids_11V == targets_BxC[..., None], mask_BxC[..., None], 0.0)
        dlogits_BxCxV = dlogits_BxCxV.astype(x_BxCxD.dtype)  # the two matmuls run in the compute dtype
        dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, kernel_DxV,
                              preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
        dkernel_DxV = dkernel_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV,
                                               preferred_element_type=jnp.float32)
        return (nll_sum + nll, z_sum + z, dkernel_DxV), dx_BxCxD

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(kernel_DxV.shape, jnp.float32))
    (nll_sum, z_sum, dkernel_DxV), dx_NxBxCxD = jax.lax.scan(body, init, (x_NxBxCxD, targets_NxBxC, mask_NxBxC))
    residuals = (dx_NxBxCxD, dkernel_DxV.astype(kernel_DxV.dtype))
    return (nll_sum + z_loss * z_sum, nll_sum, z_sum), residuals


def _chunked_loss_bwd(vocab_size, z_loss, layout, residuals, cotangents):
    # nll_sum and z_sum leave loss_sums through stop_gradient: only the objective's cotangent is ever nonzero.
    d_objective = cotangents[0]
    dx_NxBxCxD, dkernel_DxV = residuals
    return (dx_NxBxCxD * d_objective.astype(dx_NxBxCxD.dtype), dkernel_DxV * d_objective.astype(dkernel_DxV.dtype),
            None, None)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def log_probs(graphdef, params: dict, tokens_BxL: jax.Array, *, vocab_size: int) -> jax.Array:
    """float32 log-softmax [B, L, V] over the real vocabulary (the padded columns cut off)."""
    out_BxLxV = logits(graphdef, params, tokens_BxL, vocab_size=vocab_size)[..., :vocab_size]
    return jax.nn.log_softmax(out_BxLxV, axis=-1)
