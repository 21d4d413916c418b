"""A model's params as a plain nested dict and back: the one bridge between flax NNX modules and the pytrees
that jit, optax, checkpoints and export handle. A leaf module (flax only), so the forward pass and the model
families import it without importing each other."""

from __future__ import annotations

from flax import nnx

__all__ = ["merge_params", "split_params", "str_keys"]


def str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): str_keys(v) for k, v in tree.items()}
    return tree


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params): params is a nested dict of arrays with str keys, e.g.
    params['layers']['0']['self_attn']['q_proj']['kernel']."""
    graphdef, state = nnx.split(model)
    return graphdef, str_keys(nnx.to_pure_dict(state))


def merge_params(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
    """The model for `params` (the inverse of split_params); traceable under jax.jit / jax.grad.

    Layer keys go back to ints first: nnx.merge pairs leaves in sorted-key order, and as strings
    '10' sorts before '2', which would silently permute the layers of any model deeper than 10."""
    return nnx.merge(graphdef, _int_keys(params))


def _int_keys(tree):
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree
