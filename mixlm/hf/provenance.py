"""What an exported folder was made from (mixlm_export.json) and the model card rendered from it, so that
`mixlm release` can re-render the card later (e.g. with eval scores) without the checkpoint.

    prov = read_provenance("hf/x")
    text = render_folder_card("hf/x", CardOptions(eval_results=json.load(open("scores.json"))))
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mixlm import model_card
from mixlm.config import ExperimentConfig, config_from_dict
from mixlm.errors import ExportError
from mixlm.models import param_counts

PROVENANCE_FILE = "mixlm_export.json"  # what the folder was made from; `mixlm release` re-renders the card from it


@dataclasses.dataclass
class CardOptions:
    """What the model card needs beyond the checkpoint."""

    name: str = ""  # default: the output folder's name
    license: str = "apache-2.0"
    datasets: list[str] = dataclasses.field(default_factory=list)
    hardware: str = ""
    train_seconds: float | None = None
    eval_results: object = None  # parsed eval JSON (see model_card.eval_scores_from_json)


def tokens_trained(cfg: ExperimentConfig, step: int | None, meta: dict) -> int | None:
    if meta.get("tokens_seen_total"):
        return int(meta["tokens_seen_total"])
    if step is None:
        return None
    return step * cfg.train.global_batch_size * cfg.data.seq_len


def card_info_from_provenance(prov: dict, card: CardOptions):
    """model_card.CardInfo from an export's mixlm_export.json plus the options given now."""
    cfg = config_from_dict(prov["config"])
    meta = prov.get("checkpoint_meta", {})
    total, non_embedding = param_counts(cfg.model)
    evals = model_card.eval_scores_from_json(card.eval_results) if card.eval_results is not None else []
    mesh = meta.get("mesh") or {}
    hardware = card.hardware or meta.get("hardware", "") or (
        f"{int(np.prod(list(mesh.values())))} devices, mesh "
        + " x ".join(f"{axis} {size}" for axis, size in mesh.items()) if mesh else "")
    return model_card.CardInfo(
        name=card.name or prov.get("name", ""), cfg=cfg, architecture=prov["architecture"],
        total_params=total, non_embedding_params=non_embedding, dtype=prov["dtype"], step=prov.get("step"),
        tokens_trained=tokens_trained(cfg, prov.get("step"), meta),
        tokens_by_domain={k: int(v) for k, v in (meta.get("tokens_seen") or {}).items()},
        license=card.license, datasets=list(card.datasets), hardware=hardware,
        train_seconds=card.train_seconds or meta.get("train_seconds"), evals=evals, source=prov.get("source", ""),
        mixlm_version=meta.get("mixlm_version", ""), git_commit=meta.get("git_commit", ""),
    )


def read_provenance(folder: str | Path) -> dict:
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise ExportError(f"{folder}: no {PROVENANCE_FILE}; is it a folder written by `mixlm export`?")
    return json.loads(path.read_text())


def render_folder_card(folder: str | Path, card: CardOptions) -> str:
    """The README.md text of an exported folder rendered anew (e.g. with eval scores); writes nothing."""
    prov = read_provenance(folder)
    return model_card.render_model_card(card_info_from_provenance(prov, card))
