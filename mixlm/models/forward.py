"""The one forward pass over (graphdef, params): training, validation, export verification, lm-eval on a
live model and perplexity scoring all call these, so the padded vocabulary is handled in one place.

    logits_BxLxV = forward.logits(graphdef, params, tokens_BxL, vocab_size=V)         # float32, V_pad wide
    nll_BxL, log_z_BxL = forward.token_losses(logits_BxLxV, targets_BxL)
    logp_BxLxV = forward.log_probs(graphdef, params, tokens_BxL, vocab_size=V)       # real vocabulary only

The embedding and LM head have V_pad >= V rows (padded so the vocabulary shards evenly); ids >= V never
occur in data, and `logits` gives them -1e9 so every softmax / logsumexp ignores them while the array keeps
its sharded V_pad width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PADDED_LOGIT = -1e9


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
    from mixlm.models import layers, merge_params

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


def log_probs(graphdef, params: dict, tokens_BxL: jax.Array, *, vocab_size: int) -> jax.Array:
    """float32 log-softmax [B, L, V] over the real vocabulary (the padded columns cut off)."""
    out_BxLxV = logits(graphdef, params, tokens_BxL, vocab_size=vocab_size)[..., :vocab_size]
    return jax.nn.log_softmax(out_BxLxV, axis=-1)
