"""The options of `mixlm prepare`, and which of them shape the prepared bytes (the plan a rerun compares)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: str  # HF tokenizer folder or hub name
    text_field: str = "text"
    append_eos: bool = True
    prepend_bos: bool = False
    seed: int = 0
    validation_fraction: float = 0.01  # share of documents held out (at least 1 when > 0 and >= 2 documents)
    validation_docs: int = 0  # > 0: exactly this many held-out documents instead
    shard_tokens: int = 50_000_000  # target train tokens per shard
    workers: int = 1  # tokenizer processes (1: in this process)
    batch_docs: int = 256  # documents per tokenizer call
    chunk_docs: int = 50_000  # documents per resumable tokenization chunk
    strict: bool = False  # malformed input is an error instead of counted and skipped
    overwrite: bool = False  # replace a domain prepared with other inputs or options
    progress: bool = True
    keep_work: bool = False  # keep the .work folder (tokenized chunks) after success
    max_document_chars: int = 10_000_000  # longest text tokenized whole (a document, or a piece that cannot be cut)


# Options that change how prepare runs, not what it writes: left out of the plan a rerun compares.
RUN_ONLY_OPTIONS = ("workers", "batch_docs", "strict", "overwrite", "progress", "keep_work", "max_document_chars")


def plan_options(options: PrepareOptions) -> dict:
    """The options that shape the output (every field but RUN_ONLY_OPTIONS)."""
    return {k: v for k, v in asdict(options).items() if k not in RUN_ONLY_OPTIONS}
