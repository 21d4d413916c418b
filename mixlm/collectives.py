"""What several jax.distributed processes agree on, in one place: every process calls these at the same point
(they are collectives), and in one process they return at once without communicating.

    all_processes(ok)        True only where `ok` holds on every process (so all take the same branch)
    barrier(name)            wait until every process reached `name`
    allgather_json(obj)      every process's JSON-able value, in process order
    gather_members(local)    {member: value} merged over the processes that own the members
    host_view(tree)          [K, ...] device arrays read to numpy, this process's shards filled (no collective)
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def all_processes(ok: bool) -> bool:
    """True only if `ok` on every process (so all processes take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def barrier(name: str) -> None:
    """Returns once every process has called barrier(name)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(obj) -> list:
    """`obj` (JSON-able) of every process, in process order; [obj] in one process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(gathered[i, :int(n)]).decode()) for i, n in enumerate(sizes)]


def gather_members(local: dict[int, Any]) -> dict[int, Any]:
    """{member: value} of this process's members -> {member: value} of every member (allgather_json)."""
    merged: dict[int, Any] = {}
    for part in allgather_json({str(m): v for m, v in local.items()}):
        merged.update({int(m): v for m, v in part.items()})
    return merged


def host_view(tree):
    """[K, ...] device arrays -> numpy with this process's shards filled (the others 0): in one process
    jax.device_get; across processes only the addressable shards are read (no collective)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def one(a: jax.Array) -> np.ndarray:
        out = np.zeros(a.shape, a.dtype)
        for shard in a.addressable_shards:
            out[shard.index] = np.asarray(shard.data)
        return out

    return jax.tree.map(one, tree)
