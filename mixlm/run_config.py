"""The config a run trains, resolved in one step that every entry point calls (train, sweep, plan, params,
metarater), so they all see the same config.

    cfg = load_run_config("configs/experiments/cpu-proxy.yaml", ["data.prepared_dir=data/prepared"])

mixlm.config.load_config reads the YAML files and overrides and validates them; `resolve` then fills in what
depends on other files, as the files and overrides left it:

* a `random:` mixture spec in data.mixture becomes mixture data.mixture_index of it
  (mixlm.mixing.random_mixtures; a relative prior path is relative to the file that set data.mixture);
* model.vocab_size, unless a file or an override set it, becomes the vocabulary of the tokenizer the prepared
  data was made with, and an empty data.tokenizer that tokenizer's folder (mixlm.data.model_vocab).

Resolving reads files and nothing else (manifests, a prior); it is idempotent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from mixlm.config import ExperimentConfig, load_config_and_origin, validate
from mixlm.data.model_vocab import resolve_vocab
from mixlm.mixing.random_mixtures import resolve_random_mixture


def resolve(cfg: ExperimentConfig, origin: Mapping[str, str] | None = None) -> ExperimentConfig:
    """`cfg` with its random mixture drawn and its vocabulary taken from the prepared data (see the module
    docstring). `origin` ('section.key' -> the file or override that set it, from load_config_and_origin) says
    which keys were set explicitly; without it every key counts as set (a saved config.yaml is resolved)."""
    explicit = origin is None or "model.vocab_size" in origin
    data = resolve_random_mixture(dataclasses.asdict(cfg.data), origin or {})
    out = cfg.replace(data=dataclasses.replace(cfg.data, **data))
    out = resolve_vocab(out, explicit=explicit)
    if out != cfg:
        validate(out, dict(origin or {}))
    return out


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config `mixlm train PATH OVERRIDES...` trains: load_config, then resolve."""
    cfg, origin = load_config_and_origin(path, list(overrides))
    return resolve(cfg, origin)
