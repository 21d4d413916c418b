"""What every model scorer of the selection shares (the model raters of mixlm.selection.model_raters and the
perplexity scorer of mixlm.selection.perplexity), and what rater configs check before loading any model: the
column names they write, whether a folder is a rater, the torch device, and length-bucketed batches."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixlm.selection import SelectionError

LINEAR_RATER_FILE = "rater.json"  # a mixlm linear-head rater folder holds this (mixlm.selection.model_raters)

# The perplexity scorer's signal and its columns: mean NLL per token, and bits per byte of text.
SIGNAL = "perplexity"
NLL_COLUMN = "perplexity_nll"
BPB_COLUMN = "perplexity_bpb"
COLUMNS = (NLL_COLUMN, BPB_COLUMN)


def rater_folder_problem(folder: str | Path) -> str:
    """'' when `folder` looks like a rater folder, else what is wrong with it."""
    p = Path(folder)
    if not p.is_dir():
        return f"{folder}: no such folder"
    if not ((p / "config.json").is_file() or (p / LINEAR_RATER_FILE).is_file()):
        return (f"{folder}: neither a Hugging Face model folder (config.json) nor a mixlm linear-head rater "
                f"({LINEAR_RATER_FILE})")
    return ""


def output_columns(name: str, labels: Sequence[str], override: Sequence[str] = ()) -> list[str]:
    """The column names of a rater NAME with these output labels (see the module docstring)."""
    if override:
        if len(override) != len(labels):
            raise SelectionError(f"rater {name}: {len(override)} column names given for {len(labels)} outputs "
                                 f"({', '.join(map(str, labels))})")
        labels = override
    elif len(labels) == 1:
        return [name]
    safe = [re.sub(r"[^A-Za-z0-9]+", "_", str(label)).strip("_").lower() or str(i) for i, label in enumerate(labels)]
    if len(set(safe)) != len(safe):
        raise SelectionError(f"rater {name}: output labels {list(labels)} collide as column names; name them "
                             f"with --columns {name}=a,b,...")
    return [f"{name}_{label}" for label in safe]


def resolve_device(device: str) -> str:
    """auto → cuda when torch sees a GPU, else cpu; an explicit cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SelectionError(f"--device {device}: torch sees no CUDA device here; use --device cpu or auto")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SelectionError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches, longest documents first, so each batch pads to about its own length."""
    order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
