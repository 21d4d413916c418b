"""Mesh from config, the one logical-axis rule table, and the shardings of params, activations and batches.

Parameters carry logical axis names (`nnx.Param(..., logical_axes=('embed', 'mlp'))`) and activations are
constrained by logical names too (`layout.constrain(x_BxLxD, ('batch', 'length', 'embed'))`); one rule table
maps each logical name to mesh axes. `Layout` (a mesh plus the rules) is a plain value passed where needed:
no global mesh, no context. `mesh.rules` in the config overrides single rules:

    mesh:
      fsdp: -1
      rules: {mlp: [tensor, fsdp], vocab: []}   # logical name -> mesh axes ([] replicates)
      strict: true                              # a big weight that cannot be sharded is an error

A dimension whose size does not divide its mesh axes is replicated instead (and a mesh axis is never used
twice in one spec), so any config runs on any mesh; a weight above FALLBACK_WARN_ELEMENTS elements that
ends up replicated this way is named in a warning (a ConfigError under `mesh.strict`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixlm.config import MeshConfig
from mixlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
FALLBACK_WARN_ELEMENTS = 1 << 20  # weights larger than this should never be replicated by accident
ACTIVATION_AXES = ("batch", "length", "embed")  # the residual stream between blocks


class ShardingFallbackWarning(UserWarning):
    """A large weight is replicated because its dimensions do not divide the mesh axes of its rules."""


@dataclass(frozen=True)
class AxisRules:
    """(logical name, mesh axes) pairs; a logical name not listed is replicated."""

    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        for name, axes in self.rules:
            if name == logical:
                return axes
        return ()

    def with_overrides(self, overrides: Mapping, where: str = "mesh.rules") -> AxisRules:
        """These rules with `overrides` ({logical name: mesh axis | [mesh axes] | [] | None}) replacing or
        adding single rules."""
        new = dict(self.rules)
        for name, axes in overrides.items():
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad or not all(isinstance(a, str) for a in axes):
                raise ConfigError(f"{where}.{name}: mesh axes must be among {', '.join(MESH_AXES)}, got {list(axes)}")
            if len(set(axes)) != len(axes):
                raise ConfigError(f"{where}.{name}: a mesh axis is listed twice in {list(axes)}")
            new[str(name)] = axes
        return AxisRules(tuple(new.items()))


# Batch rows over both data-parallel axes; FSDP shards the model dimension of every weight (activations'
# embed dim finds fsdp already taken by the batch, so it stays whole); tensor parallelism splits heads, MLP
# and vocab.
DEFAULT_RULES = AxisRules(
    rules=(
        ("batch", ("data", "fsdp")),
        ("vocab", ("tensor",)),
        ("embed", ("fsdp",)),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("head_dim", ()),
        ("norm", ()),
        ("position", ()),
        ("length", ()),
        ("layers", ()),  # the stacked-layer axis of model.scan_layers: every device holds all layers
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
            raise ConfigError(
                f"mesh: {num_devices} {'device' if num_devices == 1 else 'devices'} present, not divisible by the "
                f"fixed axes' product {known} (data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}); set the fixed "
                "axes to divide it (e.g. mesh.data=1, and -1 on one axis to fill the devices), or on CPU fake more "
                f"devices with XLA_FLAGS=--xla_force_host_platform_device_count={known}")
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


def is_logical_axes(x) -> bool:
    """True for a leaf of a logical-axes tree: a tuple of axis names (None for an unnamed dimension)."""
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


@dataclass(frozen=True)
class Layout:
    """A mesh and the rule table: where every parameter and activation lives."""

    mesh: Mesh
    rules: AxisRules = DEFAULT_RULES
    strict: bool = False

    def spec(self, logical_axes: tuple, shape: tuple[int, ...]) -> P:
        return logical_to_spec(logical_axes, shape, self.mesh, self.rules)

    def sharding(self, logical_axes: tuple, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def constrain(self, x: jax.Array, logical_axes: tuple) -> jax.Array:
        """`x` constrained to its logical axes' sharding (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    def axis_size(self, logical: str) -> int:
        """Devices one dimension named `logical` is split over (when its size divides them)."""
        return math.prod(self.mesh.shape[a] for a in self.rules.mesh_axes(logical))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Rows over the batch rule's axes (data, fsdp), everything else replicated."""
        return NamedSharding(self.mesh, P(self.rules.mesh_axes("batch") or None, *([None] * (ndim - 1))))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def param_shardings(self, abstract_params, logical_axes):
        """A NamedSharding per parameter (same tree as `abstract_params`); warns about (or, when strict,
        refuses) any weight above FALLBACK_WARN_ELEMENTS elements left replicated by indivisible sizes."""
        shardings = jax.tree.map(lambda a, axes: self.sharding(axes, a.shape), abstract_params, logical_axes,
                                 is_leaf=is_logical_axes)
        problems = self.fallbacks(abstract_params, logical_axes)
        if problems:
            text = (f"{len(problems)} weight(s) above {FALLBACK_WARN_ELEMENTS:,} elements are replicated on every "
                    f"device because their sizes do not divide the mesh {dict(self.mesh.shape)}: "
                    + "; ".join(problems) + ". Change the mesh or the model sizes, or map the dimension to other "
                    "axes with mesh.rules")
            if self.strict:
                raise ConfigError(f"mesh.strict: {text}")
            warnings.warn(text, ShardingFallbackWarning, stacklevel=2)
        return shardings

    def fallbacks(self, abstract_params, logical_axes) -> list[str]:
        """'path [shape]: why' for each weight above FALLBACK_WARN_ELEMENTS elements that shards over no mesh
        axis although its rules name mesh axes of size > 1."""
        out = []
        flat_axes = dict(jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_logical_axes)[0])
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
            axes = flat_axes[path]
            if math.prod(leaf.shape) <= FALLBACK_WARN_ELEMENTS or any(self.spec(axes, leaf.shape)):
                continue
            wanted = [(name, size, [a for a in self.rules.mesh_axes(name) if self.mesh.shape[a] > 1])
                      for name, size in zip(axes, leaf.shape)]
            reasons = [f"{name}={size} by {'x'.join(f'{a}={self.mesh.shape[a]}' for a in want)}"
                       for name, size, want in wanted if want]
            if reasons:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                out.append(f"{name} {list(leaf.shape)} ({', '.join(reasons)} does not divide)")
        return out


def make_layout(cfg: MeshConfig, devices=None) -> Layout:
    """The mesh of `cfg` over `devices` (default: all) with DEFAULT_RULES overridden by mesh.rules."""
    return Layout(make_mesh(cfg, devices), DEFAULT_RULES.with_overrides(cfg.rules), strict=cfg.strict)


def _as_layout(mesh_or_layout: Mesh | Layout) -> Layout:
    return mesh_or_layout if isinstance(mesh_or_layout, Layout) else Layout(mesh_or_layout)


def to_global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh | Layout) -> dict[str, jax.Array]:
    """Host-local rows → one global jax.Array per key (each process passes its own slice of rows)."""
    layout = _as_layout(mesh)
    return {
        k: jax.make_array_from_process_local_data(layout.batch_sharding(v.ndim), v) for k, v in host_batch.items()
    }


__all__ = ["ACTIVATION_AXES", "DEFAULT_RULES", "MESH_AXES", "AxisRules", "Layout", "ShardingFallbackWarning",
           "is_logical_axes", "logical_to_spec", "make_layout", "make_mesh", "resolve_mesh_shape",
           "to_global_batch"]
