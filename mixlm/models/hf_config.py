"""The checks every family's reading of a transformers config.json shares (mixlm.models.llama, .gpt2)."""

from __future__ import annotations

from mixlm.errors import ExportError


def require_hf_value(hf: dict, key: str, allowed, where: str, default=None) -> None:
    """Refuses a transformers config.json whose `key` (default `default`) is not one of `allowed`."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ExportError(f"{where}: {key}={value!r} is not supported by mixlm (supported: {allowed})")
