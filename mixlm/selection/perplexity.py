"""Perplexity of documents under a mixlm model: a quality signal where lower is better.

Each document is tokenized without special tokens and scored as it is seen in training, after an
EOS (prepare appends one to every document, so in a packed stream a document follows an EOS).
Documents longer than the model's context are cut into non-overlapping windows of `max_seq_len`
targets; each window starts from the token before it, with no longer context. Windows are padded to
fixed [batch_size, max_seq_len] batches so one compiled function serves every batch.

Loading a model from a checkpoint folder waits on mixlm's checkpoint format; this takes the
in-memory (cfg, graphdef, params) of `mixlm.models.split_params`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixlm.config import ModelConfig

SIGNAL = "perplexity"


def _windows(ids: list[int], start_id: int, length: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of at most `length` targets covering `ids`."""
    out = []
    for begin in range(0, len(ids), length):
        targets = ids[begin:begin + length]
        previous = ids[begin - 1] if begin else start_id
        out.append(([previous] + targets[:-1], targets))
    return out


def perplexity_scores(texts: Sequence[str], cfg: ModelConfig, graphdef, params: dict, tokenizer, *,
                      batch_size: int = 8) -> np.ndarray:
    """float64 [n]: exp(mean next-token NLL) of each text; NaN for a text with no tokens.

    `tokenizer`: a HF tokenizer folder or hub name (loaded as `mixlm prepare` loads it) or a
    `mixlm.data.prepare.TokenizerSpec`; it needs an EOS token.
    """
    import jax
    import jax.numpy as jnp
    from tokenizers import Tokenizer

    from mixlm.data.prepare import load_tokenizer_spec
    from mixlm.models import forward
    from mixlm.selection import SelectionError

    spec = load_tokenizer_spec(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if spec.eos_id is None:
        raise SelectionError(f"tokenizer {spec.name!r} has no EOS token to start documents with")
    encoded = Tokenizer.from_str(spec.backend_json).encode_batch(list(texts), add_special_tokens=False)
    length = cfg.max_seq_len
    rows = [(doc, w) for doc, e in enumerate(encoded) for w in _windows(e.ids, spec.eos_id, length)]

    @jax.jit
    def row_nll(params, inputs_BxL, targets_BxL, mask_BxL):
        logits_BxLxV = forward.logits(graphdef, params, inputs_BxL, vocab_size=cfg.vocab_size)
        nll_BxL, _ = forward.token_losses(logits_BxLxV, targets_BxL)
        return jnp.sum(nll_BxL * mask_BxL, axis=1)

    nll_sum, counts = np.zeros(len(texts)), np.zeros(len(texts))
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        inputs_BxL = np.zeros((batch_size, length), np.int32)
        targets_BxL = np.zeros((batch_size, length), np.int32)
        mask_BxL = np.zeros((batch_size, length), np.float32)
        for r, (_, (inputs, targets)) in enumerate(batch):
            inputs_BxL[r, :len(inputs)], targets_BxL[r, :len(targets)] = inputs, targets
            mask_BxL[r, :len(targets)] = 1.0
        sums = np.asarray(row_nll(params, inputs_BxL, targets_BxL, mask_BxL), np.float64)
        for r, (doc, (_, targets)) in enumerate(batch):
            nll_sum[doc] += sums[r]
            counts[doc] += len(targets)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.exp(nll_sum / np.maximum(counts, 1)), np.nan)
