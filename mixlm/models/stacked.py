"""Scanned layers (`model.scan_layers: true`): the num_layers blocks of a family held as ONE block whose params
have a leading [num_layers] axis (logical axis "layers", replicated by mixlm.sharding.DEFAULT_RULES), run by
`jax.lax.scan`, so the compiled program holds one block whatever the depth.

    self.layers = stack_blocks([Block(...) for _ in range(n)])      # in the family's __init__
    x_BxLxD = scan_blocks(self.layers, run_block, x_BxLxD, pos, seg)  # in its __call__

Params trees (mixlm.models.split_params) differ between the two layouts only under the family's
LAYERS_PARAM key ('layers' for llama, 'h' for gpt2):

    plain     params['layers']['3']['mlp']['up_proj']['kernel']       [D, F]
    scanned   params['layers']['mlp']['up_proj']['kernel']            [num_layers, D, F]

`unstack_layers` / `stack_layers` convert one to the other (numpy or jax leaves); export, import, checkpoint
reading and the HF name maps see the plain layout only (mixlm.hf.export reads a scanned source through
`layer_slice_path`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYERS_AXIS = "layers"  # the logical axis name of the stacked-layer dimension


def stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
    """One block (the first, reused as template) whose every Variable holds the blocks' values stacked on a new
    leading axis, with "layers" prepended to its logical_axes. The blocks must share one structure."""
    template = blocks[0]
    others = [dict(nnx.iter_graph(b)) for b in blocks[1:]]
    for path, var in list(nnx.iter_graph(template)):
        if not isinstance(var, nnx.Variable):
            continue
        values = [var[...]] + [o[path][...] for o in others]
        axes = tuple(var.get_metadata().get("logical_axes", (None,) * np.ndim(values[0])))
        var.set_metadata("logical_axes", (LAYERS_AXIS, *axes))
        var.set_value(jnp.stack(values))
    return template


def scan_blocks(stacked: nnx.Module, run_block: Callable, x, *args, constrain: Callable | None = None):
    """`x` through every layer of `stacked` (stack_blocks): run_block(block, x, *args) -> x per layer, where
    block is one layer's slice (run_block may be a layers.remat_block). `constrain(x)` runs after each layer."""
    graphdef, state = nnx.split(stacked)

    def body(x_carry, layer_state):
        out = run_block(nnx.merge(graphdef, layer_state), x_carry, *args)
        return (out if constrain is None else constrain(out)), None

    x, _ = jax.lax.scan(body, x, state)
    return x


def _stack(values):
    if all(isinstance(v, np.ndarray) for v in values):
        return np.stack(values)
    return jnp.stack(values)


def unstack_layers(params: dict, layers_key: str) -> dict:
    """Scanned params -> the plain layout: params[layers_key] (leaves [num_layers, ...]) becomes
    {'0': layer 0, '1': ..., ...}. Other entries are shared, not copied. A plain tree is returned unchanged."""
    stacked = params[layers_key]
    if is_unstacked(stacked):
        return params
    num_layers = int(np.shape(jax.tree.leaves(stacked)[0])[0])
    out = dict(params)
    out[layers_key] = {str(i): jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)}
    return out


def stack_layers(params: dict, layers_key: str) -> dict:
    """The inverse of unstack_layers: {'0': ..., '1': ...} under layers_key -> one tree of [num_layers, ...]
    leaves (numpy leaves stay numpy). A scanned tree is returned unchanged."""
    per_layer = params[layers_key]
    if not is_unstacked(per_layer):
        return params
    ordered = [per_layer[k] for k in sorted(per_layer, key=int)]
    out = dict(params)
    out[layers_key] = jax.tree.map(lambda *xs: _stack(xs), *ordered)
    return out


def is_unstacked(layers_tree: dict) -> bool:
    """True for the plain layout (keys '0', '1', ... under the layers key)."""
    return bool(layers_tree) and all(str(k).isdigit() for k in layers_tree)


def layer_slice_path(path: tuple[str, ...], layers_key: str) -> tuple[tuple[str, ...], int | None]:
    """A plain-layout param path -> (its scanned path, layer index); (path, None) outside the layers, e.g.
    ('layers', '3', 'mlp', 'up_proj', 'kernel') -> (('layers', 'mlp', 'up_proj', 'kernel'), 3)."""
    if len(path) > 2 and path[0] == layers_key and path[1].isdigit():
        return (path[0], *path[2:]), int(path[1])
    return path, None
