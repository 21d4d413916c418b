"""Data: sources → prepare (tokenize to ArrayRecord) → mixture (grain) → packing → host batches.

The trainer needs one thing from here: `make_train_source(cfg, process_index, process_count)`, an
object with `next_batch() -> dict of host-local numpy arrays` ('inputs', 'targets', 'loss_mask' int32/
float32 [b, L]; optional 'segment_ids', 'positions'), `get_state()/set_state()` (JSON-able, exact
resume), `tokens_seen() -> {domain: tokens}` and `eval_batches(n) -> {domain: [batch, ...]}`.

The steps before training, as plain functions (the CLI verbs `tokenizer train` and `prepare` wrap them):
`demo_corpus.generate_demo_corpus`, `tokenizer_train.train_tokenizer`, `prepare.prepare_domains`.
"""

from __future__ import annotations

from mixlm.config import ExperimentConfig
from mixlm.errors import ConfigError


def make_train_source(cfg: ExperimentConfig, *, process_index: int = 0, process_count: int = 1):
    if cfg.train.global_batch_size % process_count:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
            f"{process_count} processes; choose a multiple of {process_count} (resuming a run, which keeps its "
            "global batch: run on a process count that divides it)"
        )
    host_batch = cfg.train.global_batch_size // process_count
    if cfg.data.source == "synthetic":
        if cfg.eval.domains:
            raise ConfigError(
                f"eval.domains={cfg.eval.domains} needs data.source='prepared' (the synthetic source has one domain)"
            )
        from mixlm.data.synthetic import SyntheticSource

        return SyntheticSource(
            vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len, batch_size=host_batch,
            seed=cfg.data.seed, process_index=process_index, process_count=process_count,
        )
    if cfg.data.source == "prepared":
        from mixlm.data.pipeline import PreparedMixtureSource

        return PreparedMixtureSource(cfg, process_index=process_index, process_count=process_count)
    raise ConfigError(f"data.source={cfg.data.source!r} is not known; use 'synthetic' or 'prepared'")
