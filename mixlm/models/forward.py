"""The one forward pass over (graphdef, params): training, validation, export verification, lm-eval on a
live model and perplexity scoring all call these, so the padded vocabulary is handled in one place.

    logits_BxLxV = forward.logits(graphdef, params, tokens_BxL, vocab_size=V)         # float32, V_pad wide
    nll_BxL, log_z_BxL = forward.token_losses(logits_BxLxV, targets_BxL)
    logp_BxLxV = forward.log_probs(graphdef, params, tokens_BxL, vocab_size=V)       # real vocabulary only
    objective, (nll_sum, z_sum, tokens, rows) = forward.batch_loss_sums(graphdef, params, batch, vocab_size=V,
                                                                        z_loss=z, layout=layout)  # training / eval

The training loss never holds the whole [tokens, V_pad] float32 logits: `batch_loss_sums` takes the model's
final hidden states and LM-head kernel and runs the cross-entropy over chunks of positions (`loss_sums`), each
chunk's logits computed, used and dropped; its gradient is formed in the same pass (a custom VJP), so the
backward never recomputes or stores logits. A regmix-1m proxy at 512 x 2048 tokens has 200 GB of fp32 logits.
The same pass also sums each row's loss and tokens (and its loss in excess of a reference model's) for the
per-domain training signal, and weights each row's objective by the batch's 'loss_weights' (online mixing).

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
                    chunk_len: int | None = None, rows: bool = False
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]]:
    """Summed (not averaged) training objective over a batch's unmasked tokens: (nll_sum + z_loss * z_sum,
    (nll_sum, z_sum, tokens, per_row)), z_sum = sum of log(Z)^2; only the objective is differentiable. Chunked
    over positions (`loss_sums`) for families with `hidden`, whole logits otherwise.

    A batch's 'loss_weights' [B] multiply each row's objective (nll_sum, z_sum and tokens stay unweighted). With
    `rows`, per_row holds each row's summed loss and loss tokens {'nll', 'tokens'} [B] (and 'excess' [B], the
    summed max(nll - reference, 0), when the batch carries a reference model's per-token 'reference_nll'
    [B, L]); without, it is {}."""
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    weight_BxL = mask_BxL * batch["loss_weights"].astype(jnp.float32)[:, None] if "loss_weights" in batch else None
    reference_BxL = batch.get("reference_nll") if rows else None
    features = batch_hidden(graphdef, params, batch, layout=layout)
    if features is None:
        nll_BxL, log_z_BxL = token_losses(batch_logits(graphdef, params, batch, vocab_size=vocab_size, layout=layout),
                                          batch["targets"])
        nll_sum, z_sum = jnp.sum(nll_BxL * mask_BxL), jnp.sum(jnp.square(log_z_BxL) * mask_BxL)
        objective = nll_sum + z_loss * z_sum
        if weight_BxL is not None:
            objective = jnp.sum((nll_BxL + z_loss * jnp.square(log_z_BxL)) * weight_BxL)
        per_row = {}
        if rows:
            per_row = _row_sums(jax.lax.stop_gradient(nll_BxL), mask_BxL, reference_BxL)
        sums = (jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum))
        return objective, (*sums, jnp.sum(mask_BxL), per_row)
    objective, nll_sum, z_sum, per_row = _loss_parts(*features, batch["targets"], mask_BxL, weight_BxL, reference_BxL,
                                                     vocab_size=vocab_size, z_loss=z_loss, layout=layout,
                                                     chunk_len=chunk_len)
    return objective, (nll_sum, z_sum, jnp.sum(mask_BxL), per_row if rows else {})


def _row_sums(nll_BxL: jax.Array, mask_BxL: jax.Array, reference_BxL: jax.Array | None) -> dict[str, jax.Array]:
    """Each row's summed loss and tokens (and clipped excess over the reference) [B]: metrics, no gradient."""
    out = {"nll": jnp.sum(nll_BxL * mask_BxL, axis=1), "tokens": jnp.sum(mask_BxL, axis=1)}
    if reference_BxL is not None:
        out["excess"] = jnp.sum(jnp.maximum(nll_BxL - reference_BxL, 0.0) * mask_BxL, axis=1)
    return out


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
    return _loss_parts(hidden_BxLxD, kernel_DxV, targets_BxL, mask_BxL, None, None, vocab_size=vocab_size,
                       z_loss=z_loss, layout=layout, chunk_len=chunk_len)[:3]


def _loss_parts(hidden_BxLxD, kernel_DxV, targets_BxL, mask_BxL, weight_BxL, reference_BxL, *, vocab_size: int,
                z_loss: float, layout=None, chunk_len: int | None = None):
    """loss_sums' (objective, nll_sum, z_sum) with the objective weighted per token by `weight_BxL` (None: the
    mask), and each row's sums (_row_sums: from the same chunks, no second pass over the logits)."""
    batch, length, _ = hidden_BxLxD.shape
    if chunk_len is None:
        chunk_len = loss_chunk_len_for(batch, length, kernel_DxV.shape[1], layout)
    if length % chunk_len:
        raise ValueError(f"loss chunk of {chunk_len} positions does not divide the sequence length {length}")

    def chunked(x):  # [B, L, ...] -> [L / c, B, c, ...]: chunk i holds positions [i c, (i + 1) c) of every row
        return jnp.moveaxis(x.reshape(batch, length // chunk_len, chunk_len, *x.shape[2:]), 1, 0)

    mask = chunked(mask_BxL.astype(jnp.float32))
    weight = None if weight_BxL is None else chunked(weight_BxL.astype(jnp.float32))
    reference = None if reference_BxL is None else chunked(reference_BxL.astype(jnp.float32))
    objective, nll_sum, z_sum, per_row = _chunked_loss(chunked(hidden_BxLxD), kernel_DxV, chunked(targets_BxL), mask,
                                                       weight, reference, vocab_size, float(z_loss), layout)
    return objective, *jax.lax.stop_gradient((nll_sum, z_sum, per_row))


def _shards(layout, logical: str, size: int) -> int:
    """Devices a dimension of `size` named `logical` splits over under `layout` (1 when it stays whole)."""
    if layout is None:
        return 1
    n = layout.axis_size(logical)
    return n if size % n == 0 else 1


def _chunk_logits(x_BxCxD, kernel_DxV, vocab_size, layout):
    logits_BxCxV = jnp.dot(x_BxCxD, kernel_DxV, preferred_element_type=jnp.float32)
    return mask_padded_vocab(layers.constrain(logits_BxCxV, ("batch", "length", "vocab"), layout), vocab_size)


def _chunk_parts(chunk, kernel_DxV, vocab_size, layout):
    """One chunk's ((nll sum, log(Z)^2 sum, the objective's weighted nll and log(Z)^2 sums, row sums), weight,
    logits, log Z); the weight is the mask when the chunk carries none."""
    x_BxCxD, targets_BxC, mask_BxC, weight_BxC, reference_BxC = chunk
    logits_BxCxV = _chunk_logits(x_BxCxD, kernel_DxV, vocab_size, layout)
    nll_BxC, log_z_BxC = token_losses(logits_BxCxV, targets_BxC)
    z_BxC = jnp.square(log_z_BxC)
    nll, z = jnp.sum(nll_BxC * mask_BxC), jnp.sum(z_BxC * mask_BxC)
    weighted = (nll, z)
    if weight_BxC is None:
        weight_BxC = mask_BxC
    else:
        weighted = (jnp.sum(nll_BxC * weight_BxC), jnp.sum(z_BxC * weight_BxC))
    return (nll, z, *weighted, _row_sums(nll_BxC, mask_BxC, reference_BxC)), weight_BxC, logits_BxCxV, log_z_BxC


def _zero_sums(rows: int, with_reference: bool):
    zero = jnp.zeros((), jnp.float32)
    empty = jnp.zeros((rows, 1), jnp.float32)
    return zero, zero, zero, zero, _row_sums(empty, empty, empty if with_reference else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked_loss(x_NxBxCxD, kernel_DxV, targets_NxBxC, mask_NxBxC, weight_NxBxC, reference_NxBxC, vocab_size,
                  z_loss, layout):
    def body(sums, chunk):
        parts, _, _, _ = _chunk_parts(chunk, kernel_DxV, vocab_size, layout)
        return jax.tree.map(jnp.add, sums, parts), None

    init = _zero_sums(x_NxBxCxD.shape[1], reference_NxBxC is not None)
    chunks = (x_NxBxCxD, targets_NxBxC, mask_NxBxC, weight_NxBxC, reference_NxBxC)
    (nll_sum, z_sum, objective_nll, objective_z, per_row), _ = jax.lax.scan(body, init, chunks)
    return objective_nll + z_loss * objective_z, nll_sum, z_sum, per_row


def _chunked_loss_fwd(x_NxBxCxD, kernel_DxV, targets_NxBxC, mask_NxBxC, weight_NxBxC, reference_NxBxC, vocab_size,
                      z_loss, layout):
    """The sums and, chunk by chunk, d objective / d logits = weight * ((1 + 2 z log Z) softmax - onehot)
    pushed through the LM head: dx per chunk, dkernel summed in float32."""
    ids_11V = jnp.arange(kernel_DxV.shape[1]).reshape(1, 1, -1)

    def body(carry, chunk):
        sums, dkernel_DxV = carry
        x_BxCxD, targets_BxC = chunk[0], chunk[1]
        parts, weight_BxC, logits_BxCxV, log_z_BxC = _chunk_parts(chunk, kernel_DxV, vocab_size, layout)
        probs_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        scale_BxC = weight_BxC * (1.0 + 2.0 * z_loss * log_z_BxC)
        dlogits_BxCxV = probs_BxCxV * scale_BxC[..., None] - jnp.where(
            ids_11V == targets_BxC[..., None], weight_BxC[..., None], 0.0)
        dlogits_BxCxV = dlogits_BxCxV.astype(x_BxCxD.dtype)  # the two matmuls run in the compute dtype
        dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, kernel_DxV,
                              preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
        dkernel_DxV = dkernel_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV,
                                               preferred_element_type=jnp.float32)
        return (jax.tree.map(jnp.add, sums, parts), dkernel_DxV), dx_BxCxD

    init = (_zero_sums(x_NxBxCxD.shape[1], reference_NxBxC is not None), jnp.zeros(kernel_DxV.shape, jnp.float32))
    chunks = (x_NxBxCxD, targets_NxBxC, mask_NxBxC, weight_NxBxC, reference_NxBxC)
    ((nll_sum, z_sum, objective_nll, objective_z, per_row), dkernel_DxV), dx_NxBxCxD = jax.lax.scan(body, init, chunks)
    residuals = (dx_NxBxCxD, dkernel_DxV.astype(kernel_DxV.dtype))
    return (objective_nll + z_loss * objective_z, nll_sum, z_sum, per_row), residuals


def _chunked_loss_bwd(vocab_size, z_loss, layout, residuals, cotangents):
    # nll_sum, z_sum and the row sums leave loss_sums through stop_gradient: only the objective's cotangent counts.
    d_objective = cotangents[0]
    dx_NxBxCxD, dkernel_DxV = residuals
    return (dx_NxBxCxD * d_objective.astype(dx_NxBxCxD.dtype), dkernel_DxV * d_objective.astype(dkernel_DxV.dtype),
            None, None, None, None)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def log_probs(graphdef, params: dict, tokens_BxL: jax.Array, *, vocab_size: int) -> jax.Array:
    """float32 log-softmax [B, L, V] over the real vocabulary (the padded columns cut off)."""
    out_BxLxV = logits(graphdef, params, tokens_BxL, vocab_size=vocab_size)[..., :vocab_size]
    return jax.nn.log_softmax(out_BxLxV, axis=-1)
