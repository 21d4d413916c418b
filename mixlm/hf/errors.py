"""The error of export and import, and the check of a config.json field that raises it."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export or import cannot go on; the message names the file, the step or the field and what to do."""


def require_hf_value(hf: dict, key: str, allowed, where: str, default=None) -> None:
    """Refuses a transformers config.json whose `key` (default `default`) is not one of `allowed`."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ExportError(f"{where}: {key}={value!r} is not supported by mixlm (supported: {allowed})")
