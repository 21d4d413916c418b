"""Layers shared by the model families: params with logical axes, linear, norms, RoPE, attention.

Every parameter is an `nnx.Param(value, logical_axes=(...))`. `logical_axes` is our own metadata key
(one name per dimension, e.g. ('embed', 'mlp')); mixlm/sharding.py maps the names to mesh axes. We do
not use flax's `sharding=` metadata: in flax 0.12 it shards eagerly and needs a global mesh.

Params are float32 (master weights); each layer casts them to the compute dtype where it uses them.
Shape suffixes: B batch, L length, D d_model, H query heads, K kv heads, Dh head dim, F mlp, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def normal_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], std: float, logical_axes: tuple[str, ...]
) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


def constant_param(shape: tuple[int, ...], value: float, logical_axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, jnp.float32), logical_axes=logical_axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored (in, out) like HF Conv1D (nn.Linear is its transpose)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        logical_axes: tuple[str, str],
        init_std: float,
        use_bias: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = normal_param(rngs, (in_dim, out_dim), init_std, logical_axes)
        self.bias = constant_param((out_dim,), 0.0, logical_axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
        y_BxLxO = jnp.dot(x_BxLxI.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y_BxLxO = y_BxLxO + self.bias[...].astype(self.dtype)[None, None, :]
        return y_BxLxO


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, normalised in float32 (HF LlamaRMSNorm order of ops)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.scale = constant_param((dim,), 1.0, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return x32.astype(self.dtype) * scale


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias over the last axis, in float32."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.scale = constant_param((dim,), 1.0, ("norm",))
        self.bias = constant_param((dim,), 0.0, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x32 = x_BxLxD.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...][None, None, :] + self.bias[...][None, None, :]
        return y.astype(self.dtype)


def default_positions(tokens_BxL: jax.Array) -> jax.Array:
    batch, length = tokens_BxL.shape
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))


def apply_rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, base: float) -> jax.Array:
    """Rotary embedding in the HF `rotate_half` convention: dim i pairs with dim i + Dh/2.

    The frequencies are base^(-2i/Dh) for i < Dh/2, repeated for both halves (HF
    LlamaRotaryEmbedding), so HF checkpoints map onto ours with no q/k permutation.
    """
    head_dim = x_BxLxHxDh.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BxLxDh2 = positions_BxL.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles_BxLx1xDh = jnp.concatenate([angles_BxLxDh2, angles_BxLxDh2], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxLx1xDh), jnp.sin(angles_BxLx1xDh)
    x32 = x_BxLxHxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_BxLxHxDh.dtype)


def attention(
    q_BxLxHxDh: jax.Array,
    k_BxLxKxDh: jax.Array,
    v_BxLxKxDh: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Causal scaled dot-product attention (GQA when K < H) through `jax.nn.dot_product_attention`.

    With `segment_ids_BxL`, a token attends only to earlier tokens of the same segment (packed
    documents). `implementation`: None / 'xla' / 'cudnn' (passed through).
    """
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        mask_Bx1xLxL = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask=mask_Bx1xLxL, is_causal=True, implementation=implementation
    )


def embed_lookup(table_VxD: nnx.Param, tokens_BxL: jax.Array, dtype) -> jax.Array:
    return jnp.take(table_VxD[...], tokens_BxL, axis=0).astype(dtype)


def unembed(x_BxLxD: jax.Array, kernel_DxV: jax.Array) -> jax.Array:
    """Logits in float32 (the matmul runs in x's dtype, accumulating in float32)."""
    return jnp.dot(x_BxLxD, kernel_DxV.astype(x_BxLxD.dtype), preferred_element_type=jnp.float32)


# --- Hugging Face state-dict mapping, shared by the families --------------------------------------
# A family lists (our param path, HF name, kind); kind says how the array is laid out on each side:
#   "copy"      same layout (norm scales, biases, GPT-2 Conv1D kernels which HF also stores (in, out))
#   "linear"    ours (in, out), HF nn.Linear (out, in): transpose
#   "embedding" ours [V_pad, D], HF [V, D]: cut / zero-pad the padded vocabulary rows
#   "lm_head"   ours [D, V_pad], HF nn.Linear [V, D]: transpose and cut / zero-pad
HFNameMap = list[tuple[tuple[str, ...], str, str]]


def params_to_hf(params: dict, name_map: HFNameMap, vocab_size: int):
    out = {}
    for path, hf_name, kind in name_map:
        a = params
        for key in path:
            a = a[key]
        a = np.asarray(a, np.float32)
        if kind == "linear":
            a = a.T
        elif kind == "embedding":
            a = a[:vocab_size]
        elif kind == "lm_head":
            a = a[:, :vocab_size].T
        out[hf_name] = np.array(a, np.float32, order="C")  # a writable copy (torch.from_numpy wants one)
    return out


def params_from_hf(state_dict: dict, name_map: HFNameMap, padded_vocab: int) -> dict:
    def pad_rows(a):
        extra = padded_vocab - a.shape[0]
        return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) if extra > 0 else a

    params: dict = {}
    for path, hf_name, kind in name_map:
        if hf_name not in state_dict:
            raise KeyError(f"HF state dict has no {hf_name!r} (needed for param {'/'.join(path)})")
        t = state_dict[hf_name]
        a = np.asarray(t.detach().float().numpy() if hasattr(t, "detach") else t, np.float32)
        if kind == "linear":
            a = a.T
        elif kind == "embedding":
            a = pad_rows(a)
        elif kind == "lm_head":
            a = pad_rows(a).T
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(a)
    return params
