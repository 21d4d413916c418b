"""Data selection: per-document quality signals → weighted percentile score → top documents to a budget.

The pieces, each usable alone (the `mixlm select` verb chains them):

* `signals.compute_signals(text)` — rule-based signals of one document (RedPajama / Gopher style).
* `shards.compute_tables(inputs, out_dir, ...)` — signals (plus model-rating columns of the input, a
  classifier score, token counts) for every document of every input shard, in parallel, one table
  (parquet or jsonl) per shard keyed by `file` and `line`; `shards.load_tables(dirs)` reads them back as one `SignalTable`.
* `scoring` — percentile normalisation, weighted combination, budgeted top-k selection, the seeded
  random baseline, and `sample_rater_weightings` (Meta-rater's Dirichlet over raters).
* `classifier` — the DCLM-style filter: hashed uni+bigrams + logistic regression (or fastText).
* `perplexity.perplexity_scores(texts, cfg, graphdef, params, tokenizer)` — perplexity under a mixlm model.
* `shards.write_selected(...)` — the chosen documents, verbatim, as jsonl.zst for `mixlm prepare`.
"""

from __future__ import annotations

from mixlm.config import ConfigError


class SelectionError(ConfigError):
    """Bad input or settings for selection; the message names the file / key and what to do."""
