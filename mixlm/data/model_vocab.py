"""The model's vocabulary from the prepared data: one config works on any prepared folder.

    cfg = resolve_vocab(cfg, explicit="model.vocab_size" in origin)   # mixlm.run_config does this

A config whose files and overrides never set `model.vocab_size` (e.g. configs/experiments/cpu-proxy.yaml)
takes the tokenizer's vocabulary from the manifests of the mixture's prepared domains, and `data.tokenizer`
from them when it is empty and the folder recorded there exists. A vocabulary set explicitly is kept (a
published architecture pads it on purpose); one smaller than the tokenizer's is still refused by the data
source, naming both numbers. Reads manifests only: no jax, no shards opened.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mixlm import storage
from mixlm.config import ExperimentConfig
from mixlm.data.prepared import MANIFEST, DomainManifest, list_domains
from mixlm.errors import ShardError


def _mixture_domains(mixture: dict) -> list[str]:
    weights = mixture.get("weights") if isinstance(mixture.get("weights"), dict) else mixture
    names = {str(d) for d in weights}
    for stage in mixture.get("stages", []) or []:
        if isinstance(stage, dict) and isinstance(stage.get("weights"), dict):
            names.update(str(d) for d in stage["weights"])
    return sorted(names)


def prepared_tokenizer(cfg: ExperimentConfig) -> dict | None:
    """The tokenizer record ({name, fingerprint, vocab_size, ...}) shared by the manifests of the domains
    the config reads (mixture + eval.domains; every prepared domain when no mixture is set), or None when
    the config reads no prepared data, a manifest is missing or the domains disagree (the data source
    then reports it)."""
    data = cfg.data
    if data.source != "prepared" or not data.prepared_dir:
        return None
    names = _mixture_domains(data.mixture) if data.mixture else list_domains(data.prepared_dir)
    names += [d for d in cfg.eval.domains if isinstance(d, str) and d not in names]
    records = []
    for name in names:
        try:
            records.append(DomainManifest.load(storage.join(data.prepared_dir, name, MANIFEST)).tokenizer)
        except ShardError:
            return None
    if not records or len({r.get("fingerprint") for r in records}) != 1:
        return None
    return records[0]


def resolve_vocab(cfg: ExperimentConfig, *, explicit: bool = False) -> ExperimentConfig:
    """`cfg` with model.vocab_size = the prepared data's tokenizer vocabulary unless `explicit`, and
    data.tokenizer = the tokenizer folder the data was prepared with when it is empty and that folder
    exists. Unchanged when the config reads no prepared data."""
    record = prepared_tokenizer(cfg)
    if record is None:
        return cfg
    out = cfg
    if not explicit and int(record["vocab_size"]) != cfg.model.vocab_size:
        out = out.replace(model=dataclasses.replace(cfg.model, vocab_size=int(record["vocab_size"])))
    name = str(record.get("name", ""))
    if not cfg.data.tokenizer and name and Path(name).is_dir():
        out = out.replace(data=dataclasses.replace(cfg.data, tokenizer=name))
    return out
