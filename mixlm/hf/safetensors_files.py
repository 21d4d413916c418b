"""safetensors files written one tensor at a time: the tensors of an export (HFTensor), their grouping into
shard files, and a writer whose header goes first (from the known shapes) so no tensor waits in memory.

    shards = shard_plan(plan, numpy_dtype("bfloat16").itemsize, DEFAULT_MAX_SHARD_BYTES)
    write_safetensors(folder / "model.safetensors", shards[0], "bfloat16", fetch)   # fetch(t) -> np.ndarray
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mixlm.errors import ExportError

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB"
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str  # HF state-dict key
    path: tuple[str, ...]  # our param
    kind: str  # layout change, see mixlm.models.layers ("copy", "linear", "embedding", "lm_head")
    shape: tuple[int, ...]  # HF shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in SAFETENSORS_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(SAFETENSORS_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def shard_plan(plan: list[HFTensor], itemsize: int, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Consecutive tensors grouped into files of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in plan:
        n = t.size * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_safetensors(path: Path, tensors: list[HFTensor], dtype: str,
                      fetch: Callable[[HFTensor], np.ndarray]) -> int:
    """Writes a safetensors file one tensor at a time: the header (8-byte little-endian length, JSON with
    each tensor's dtype, shape and byte range) goes first, then `fetch(t)` for each tensor in order.
    Returns the bytes of tensor data written."""
    itemsize = numpy_dtype(dtype).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = t.size * itemsize
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            a = fetch(t)
            if a.shape != t.shape or a.dtype != numpy_dtype(dtype) or not a.flags.c_contiguous:
                raise ExportError(f"internal: {t.name} came out {a.shape} {a.dtype}, expected {t.shape} {dtype}")
            f.write(a.reshape(-1).view(np.uint8).data)
            del a
    return offset
