"""Mesh from config, the logical-axis rule table, and the shardings of params, state and batches.

Parameters carry logical axis names (`nnx.Param(..., logical_axes=('embed', 'mlp'))`); a rule table
maps each logical name to mesh axes. The table is a plain value passed where needed: no global
context. A logical axis whose size does not divide its mesh axes is replicated instead (and a mesh
axis is never used twice in one spec), so any config runs on any mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixlm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


@dataclass(frozen=True)
class AxisRules:
    """(logical name, mesh axes) pairs; a logical name not listed is replicated."""

    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        for name, axes in self.rules:
            if name == logical:
                return axes
        return ()


# FSDP shards the model dimension of every weight; tensor parallelism splits heads, MLP and vocab.
DEFAULT_RULES = AxisRules(
    rules=(
        ("batch", BATCH_AXES),
        ("vocab", ("tensor",)),
        ("embed", ("fsdp",)),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("head_dim", ()),
        ("norm", ()),
        ("position", ()),
        ("length", ()),
    )
)


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Fills the one -1 axis so that data * fsdp * tensor == num_devices."""
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(shape)} but {num_devices} devices are present; "
            "set one axis to -1 to fill the rest"
        )
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (Explicit breaks NNX train steps)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> P:
    """PartitionSpec for one array: each dim takes its rule's mesh axes if they divide it and are unused."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in rules.mesh_axes(name) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(abstract_params, logical_axes, mesh: Mesh, rules: AxisRules = DEFAULT_RULES):
    """A NamedSharding per parameter (same tree as `abstract_params`)."""
    return jax.tree.map(
        lambda a, axes: NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh, rules)),
        abstract_params,
        logical_axes,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over (data, fsdp), everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def to_global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local rows → one global jax.Array per key (each process passes its own slice of rows)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in host_batch.items()
    }
