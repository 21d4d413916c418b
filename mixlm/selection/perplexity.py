"""Perplexity of documents under a language model: a quality signal where lower is better.

Each document is tokenized without special tokens and scored as it is seen in training, after a start
token (a mixlm model: EOS, since prepare appends one to every document and in a packed stream a document
follows an EOS; a Hugging Face model: its BOS, or EOS when it has none). Documents longer than the
context are cut into non-overlapping windows of `max_seq_len` targets; each window starts from the token
before it, with no longer context.

Two model paths, one result:

* `perplexity_scores(texts, cfg, graphdef, params, tokenizer)` / `flax_nll_sums`: a mixlm model in
  memory (Flax); `FlaxPerplexity(folder)` loads one from a mixlm run or checkpoint folder.
* `CausalLMPerplexity(folder)`: any local Hugging Face causal LM (`AutoModelForCausalLM`), mixlm's
  exported folders included, under torch on cpu or cuda.

`load_perplexity_scorer(path)` picks the path by what the folder holds; its `score(texts)` gives the
signal columns `perplexity_nll` (mean next-token NLL in nats per token) and `perplexity_bpb` (the summed
NLL in bits per UTF-8 byte of the text), NaN for a text with no tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixlm.config import ModelConfig
from mixlm.selection import SelectionError
from mixlm.selection.model_scoring import (
    BPB_COLUMN,
    NLL_COLUMN,
    length_buckets,
    resolve_device,
)


def _windows(ids: list[int], start_id: int, length: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of at most `length` targets covering `ids`."""
    out = []
    for begin in range(0, len(ids), length):
        targets = ids[begin:begin + length]
        previous = ids[begin - 1] if begin else start_id
        out.append(([previous] + targets[:-1], targets))
    return out


def nll_columns(texts: Sequence[str], nll_sum: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """{perplexity_nll: nats per token, perplexity_bpb: bits per UTF-8 byte} from per-text NLL sums."""
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {NLL_COLUMN: np.where(counts > 0, nll_sum / np.maximum(counts, 1), np.nan),
                BPB_COLUMN: np.where((counts > 0) & (n_bytes > 0), nll_sum / (math.log(2) * n_bytes), np.nan)}


def _flax_row_nll(cfg: ModelConfig, graphdef):
    """jitted (params, inputs_BxL, targets_BxL, mask_BxL) → summed NLL per row."""
    import jax
    import jax.numpy as jnp

    from mixlm.models import forward

    @jax.jit
    def row_nll(params, inputs_BxL, targets_BxL, mask_BxL):
        logits_BxLxV = forward.logits(graphdef, params, inputs_BxL, vocab_size=cfg.vocab_size)
        nll_BxL, _ = forward.token_losses(logits_BxLxV, targets_BxL)
        return jnp.sum(nll_BxL * mask_BxL, axis=1)

    return row_nll


def flax_nll_sums(texts: Sequence[str], cfg: ModelConfig, graphdef, params: dict, tokenizer, *,
                  batch_size: int = 8, window: int | None = None, row_nll=None) -> tuple[np.ndarray, np.ndarray]:
    """(summed next-token NLL in nats, predicted tokens) per text under a mixlm model (Flax). Windows of
    `window` targets (default cfg.max_seq_len) are padded to fixed [batch_size, window] batches so one
    compiled function serves every batch (pass `row_nll` from `_flax_row_nll` to reuse it across calls).
    `tokenizer`: a HF tokenizer folder or hub name (loaded as `mixlm prepare` loads it) or a
    `mixlm.data.prepare.TokenizerSpec`; it needs an EOS token."""
    from tokenizers import Tokenizer

    from mixlm.data.tokenizer import load_tokenizer_spec

    spec = load_tokenizer_spec(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if spec.eos_id is None:
        raise SelectionError(f"tokenizer {spec.name!r} has no EOS token to start documents with")
    encoded = Tokenizer.from_str(spec.backend_json).encode_batch(list(texts), add_special_tokens=False)
    length = min(window or cfg.max_seq_len, cfg.max_seq_len)
    rows = [(doc, w) for doc, e in enumerate(encoded) for w in _windows(e.ids, spec.eos_id, length)]
    row_nll = row_nll or _flax_row_nll(cfg, graphdef)

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
    return nll_sum, counts


def perplexity_scores(texts: Sequence[str], cfg: ModelConfig, graphdef, params: dict, tokenizer, *,
                      batch_size: int = 8) -> np.ndarray:
    """float64 [n]: exp(mean next-token NLL) of each text under a mixlm model; NaN for a text with no
    tokens. The in-memory (cfg, graphdef, params) of `mixlm.models.split_params`."""
    nll_sum, counts = flax_nll_sums(texts, cfg, graphdef, params, tokenizer, batch_size=batch_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.exp(nll_sum / np.maximum(counts, 1)), np.nan)


class FlaxPerplexity:
    """Perplexity columns under a mixlm run / checkpoint folder (its newest complete step), in Flax."""

    def __init__(self, checkpoint: str | Path, *, batch_size: int = 8, max_length: int | None = None):
        from mixlm.data.tokenizer import load_tokenizer_spec
        from mixlm.errors import ExportError
        from mixlm.hf.param_readers import open_checkpoint
        from mixlm.hf.verify import load_params
        from mixlm.model_families import get_family
        from mixlm.models import abstract_params

        try:
            source = open_checkpoint(checkpoint)
        except ExportError as e:
            raise SelectionError(f"--perplexity {checkpoint}: {e}") from None
        cfg = source.cfg.model
        if not source.cfg.data.tokenizer:
            raise SelectionError(f"--perplexity {checkpoint}: its config names no data.tokenizer to read text with")
        import jax

        self.params = jax.device_put(load_params(source))  # once, not per batch
        rows = int(np.shape(self.params[get_family(cfg.family).EMBEDDING_PARAM])[0])
        self.cfg = dataclasses.replace(cfg, compute_dtype="float32", vocab_multiple=rows)
        self.graphdef = abstract_params(self.cfg)[0]
        self.tokenizer = load_tokenizer_spec(source.cfg.data.tokenizer)
        self.batch_size, self.window = batch_size, max_length
        self.row_nll = _flax_row_nll(self.cfg, self.graphdef)  # compiled once, reused by every score() call

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        sums, counts = flax_nll_sums(texts, self.cfg, self.graphdef, self.params, self.tokenizer,
                                     batch_size=self.batch_size, window=self.window, row_nll=self.row_nll)
        return nll_columns(texts, sums, counts)


class CausalLMPerplexity:
    """Perplexity columns under a local Hugging Face causal LM folder (torch; device auto | cpu | cuda).
    Windows are scored in length buckets (longest first, each batch right-padded to its own longest)."""

    def __init__(self, folder: str | Path, *, device: str = "auto", batch_size: int = 8,
                 max_length: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer


        self.device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise SelectionError(f"--perplexity {folder}: cannot load it as a causal LM ({e})") from None
        self.model.to(self.device).eval()
        self.start_id = self.tokenizer.bos_token_id
        if self.start_id is None:
            self.start_id = self.tokenizer.eos_token_id
        if self.start_id is None:
            raise SelectionError(f"--perplexity {folder}: the tokenizer has no BOS or EOS token to start documents")
        context = getattr(self.model.config, "max_position_embeddings", None) or 1024
        self.window = min(max_length or context, context)
        self.batch_size = batch_size

    def nll_sums(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch


        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = [(doc, w) for doc, ids in enumerate(encoded) for w in _windows(ids, self.start_id, self.window)]
        nll_sum, counts = np.zeros(len(texts)), np.zeros(len(texts))
        for idx in length_buckets([len(t) for _, (_, t) in rows], self.batch_size):
            width = max(len(rows[i][1][1]) for i in idx)
            inputs_BxL = torch.zeros((len(idx), width), dtype=torch.long)
            targets_BxL = torch.zeros((len(idx), width), dtype=torch.long)
            mask_BxL = torch.zeros((len(idx), width), dtype=torch.float32)
            for r, i in enumerate(idx):
                inputs, targets = rows[i][1]
                inputs_BxL[r, :len(inputs)] = torch.tensor(inputs)
                targets_BxL[r, :len(targets)] = torch.tensor(targets)
                mask_BxL[r, :len(targets)] = 1.0
            with torch.inference_mode():
                logits_BxLxV = self.model(input_ids=inputs_BxL.to(self.device),
                                          attention_mask=mask_BxL.to(self.device).long()).logits.float()
                nll_BxL = torch.nn.functional.cross_entropy(
                    logits_BxLxV.transpose(1, 2), targets_BxL.to(self.device), reduction="none")
                sums = (nll_BxL * mask_BxL.to(self.device)).sum(1).double().cpu().numpy()
            for r, i in enumerate(idx):
                nll_sum[rows[i][0]] += sums[r]
                counts[rows[i][0]] += len(rows[i][1][1])
        return nll_sum, counts

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return nll_columns(texts, *self.nll_sums(texts))


def load_perplexity_scorer(path: str | Path, *, device: str = "auto", batch_size: int = 8,
                           max_length: int | None = None):
    """A HF causal-LM folder (config.json) → CausalLMPerplexity; a mixlm run / checkpoint folder →
    FlaxPerplexity. Its `score(texts)` → {perplexity_nll, perplexity_bpb}."""
    p = Path(path)
    if not p.is_dir():
        raise SelectionError(f"--perplexity {path}: no such folder; pass a HF causal LM folder (mixlm export "
                             "output included) or a mixlm run / checkpoint folder")
    if (p / "config.json").is_file():
        return CausalLMPerplexity(p, device=device, batch_size=batch_size, max_length=max_length)
    return FlaxPerplexity(p, batch_size=batch_size, max_length=max_length)
