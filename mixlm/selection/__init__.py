"""Data selection: per-document quality signals → weighted percentile score → top documents to a budget.

The pieces, each usable alone (the `mixlm select` verb chains them):

* `signals.compute_signals(text)` — rule-based signals of one document (RedPajama-v2 / Gopher / DCLM style).
* `heuristics` — threshold rules over those signals, as presets (`refinedweb`: DCLM's RefinedWeb filters)
  or YAML rules; `apply_rules` counts what each rule dropped.
* `documents` — input reading (`iter_documents`, `iter_texts`, `read_texts`, `resolve_inputs`) and
  `write_selected(...)`, the chosen documents (jsonl lines verbatim, parquet rows as JSON) as jsonl.zst for
  `mixlm prepare`. Inputs are jsonl(.gz/.zst) or parquet files, read by `mixlm.data.inputs.iter_records`.
* `signal_tables` — `compute_tables(inputs, out_dir, ...)`: signals (plus rating columns of the input, a classifier score, model
  raters, perplexity, token counts) for every document of every input shard, in parallel, one table (parquet
  or jsonl) per shard keyed by `file` and `line`; `load_tables(dirs)` reads them back as one `SignalTable`.
* `score_folder.write_score_folder(inputs, out_dir, scorer)` — the same tables from any batch scorer.
* `pick` — percentile normalisation, weighted combination, budgeted top-k selection, DSIR's Gumbel
  top-k resampling, the seeded random baseline, `sample_rater_weightings` (Meta-rater's Dirichlet) and the
  selection report's parts; `pick_documents.select_documents` — all of it over signal tables, writing the
  chosen documents, whole columns in this process or, via `distributed_pick`, in an engine's tasks (Ray)
  with no whole column on the driver.
* `classifier` — the DCLM-style filter: hashed uni+bigrams + logistic regression, or fastText (`dclm` preset).
* `dsir` — DSIR importance weights against target sets (hashed n-gram models); `hashing` — the stable word
  and n-gram hashes DSIR and dedup share.
* `dedup` — exact, MinHash-LSH and Bloom-filter dedup (document level, or DCLM's paragraph level).
* `pipeline` — a YAML chain of stages (heuristics → dedup → classifier), `mixlm select run`; `dedup_documents`
  runs one dedup stage alone, `mixlm select dedup`.
* `model_raters` — HF classification / regression models and mixlm linear heads as raters;
  `rater_config` — rater configs (Meta-rater's 25 in configs/selection/metarater-25.yaml).
* `perplexity.perplexity_scores(texts, cfg, graphdef, params, tokenizer)` — perplexity under a mixlm model
  (and HF causal LMs through `load_perplexity_scorer`).
* `metarater` — Meta-rater's learned rater weights: proxies on sampled weightings, a fit, the best weighting.
"""

from __future__ import annotations

from pathlib import Path

from mixlm.errors import ConfigError


class SelectionError(ConfigError):
    """Bad input or settings for selection; the message names the file / key and what to do."""


def load_yaml_file(path: str | Path, what: str):
    """The YAML document at `path` (a selection config); a missing file or invalid YAML is a SelectionError
    naming `what` (e.g. "pipeline config") and the path."""
    from mixlm.config import read_yaml_file

    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"{what} {path}: file not found")
    try:
        return read_yaml_file(path)
    except ConfigError as e:
        raise SelectionError(f"{what}: {e}") from None
