"""Layers shared by the model families: params with logical axes, linear, norms, RoPE, head projections,
per-block rematerialisation (attention itself is mixlm.models.attention).

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


def rope_tables(positions_BxL: jax.Array | None, length: int, head_dim: int, base: float
                ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotary angles, [B or 1, L, Dh/2] float32, computed once per forward and shared by
    every layer's q and k (and their backward). The frequencies are base^(-2i/Dh) for i < Dh/2 (HF
    LlamaRotaryEmbedding). With positions_BxL None (positions 0..L-1 in every row) the tables are
    constants built on the host, so XLA never evaluates cos/sin inside the fused q/k multiplies."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    if positions_BxL is None:
        angles = np.arange(length, dtype=np.float32)[None, :, None] * inv_freq[None, None, :].astype(np.float32)
        return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    angles = positions_BxL.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array], *, heads_axis: int = 2) -> jax.Array:
    """Rotary embedding in the HF `rotate_half` convention: dim i pairs with dim i + Dh/2, so HF checkpoints
    map onto ours with no q/k permutation. `rope` is rope_tables' (cos, sin) [B, L, Dh/2]; x is [B, L, H, Dh]
    (heads_axis=2) or [B, H, L, Dh] (heads_axis=1).
    Written on the two halves (x1·cos − x2·sin, x2·cos + x1·sin): one concatenation, cheap backward.
    """
    head_dim = x.shape[-1]
    cos, sin = (jnp.expand_dims(t, heads_axis) for t in rope)  # broadcast over the heads
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def project_heads(x_BxLxD: jax.Array, proj: Linear, heads: int) -> jax.Array:
    """x @ kernel straight into head-major [B, heads, L, Dh] (XLA picks the dot's output layout,
    so no separate transpose is materialised)."""
    kernel_DxHxDh = proj.kernel[...].astype(proj.dtype).reshape(x_BxLxD.shape[-1], heads, -1)
    y_BxHxLxDh = jnp.einsum("bld,dhe->bhle", x_BxLxD.astype(proj.dtype), kernel_DxHxDh)
    if proj.bias is not None:
        y_BxHxLxDh = y_BxHxLxDh + proj.bias[...].astype(proj.dtype).reshape(1, heads, 1, -1)
    return y_BxHxLxDh


def merge_heads(out_BxHxLxDh: jax.Array, proj: Linear) -> jax.Array:
    """The output projection from head-major [B, H, L, Dh]: contracts (H, Dh) in one dot."""
    heads, head_dim = out_BxHxLxDh.shape[1], out_BxHxLxDh.shape[3]
    kernel_HxDhxD = proj.kernel[...].astype(proj.dtype).reshape(heads, head_dim, -1)
    y_BxLxD = jnp.einsum("bhle,hed->bld", out_BxHxLxDh.astype(proj.dtype), kernel_HxDhxD)
    if proj.bias is not None:
        y_BxLxD = y_BxLxD + proj.bias[...].astype(proj.dtype)[None, None, :]
    return y_BxLxD


def remat_block(call, policy: str):
    """`call(block, *arrays)` (one block of the layer loop) recomputed in the backward pass instead of keeping
    its activations, per `model.remat`: 'none' returns `call` itself; 'full' keeps only the block's inputs;
    'dots_saveable' / 'dots_with_no_batch_dims_saveable' also keep those matmul outputs (jax.checkpoint_policies).
    Non-array arguments (the layout) must be closed over by `call`."""
    if policy == "none":
        return call
    policies = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
                "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if policy not in policies:
        raise ValueError(f"model.remat must be none|{'|'.join(policies)}, got {policy!r}")
    return nnx.remat(call, policy=policies[policy])


RESIDUAL_AXES = ("batch", "length", "embed")  # logical axes of the residual stream [B, L, D]


def constrain(x: jax.Array, logical_axes: tuple[str, ...], layout=None) -> jax.Array:
    """`x` kept at the sharding its logical axes have under `layout` (a mixlm.sharding.Layout; the trainer
    passes one): with FSDP the weights are gathered for each layer, the activations never are. Without a
    layout x is returned unchanged; a dimension that does not divide its mesh axes stays whole."""
    return x if layout is None else layout.constrain(x, logical_axes)


def embed_lookup(table_VxD: nnx.Param, tokens_BxL: jax.Array, dtype) -> jax.Array:
    return jnp.take(table_VxD[...], tokens_BxL, axis=0).astype(dtype)


@jax.custom_vjp
def swiglu(x_BxLxD: jax.Array, gate_DxF: jax.Array, up_DxF: jax.Array, down_FxD: jax.Array) -> jax.Array:
    """(silu(x @ gate) * (x @ up)) @ down, with a hand-written backward.

    Same values and gradients as autodiff; the backward is written as plain 2-D dots over the
    flattened tokens, which on XLA:CPU avoids writing the [F, tokens] activations out transposed
    for every weight gradient (≈ 45% of the MLP's backward time at d 512, F 1408)."""
    return _swiglu_forward(x_BxLxD, gate_DxF, up_DxF, down_FxD)[0]


def _swiglu_forward(x_BxLxD, gate_DxF, up_DxF, down_FxD):
    x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    g_NxF, u_NxF = x_NxD @ gate_DxF, x_NxD @ up_DxF
    sig_NxF = jax.nn.sigmoid(g_NxF)
    y_NxD = (g_NxF * sig_NxF * u_NxF) @ down_FxD
    return y_NxD.reshape(x_BxLxD.shape), (x_NxD, g_NxF, u_NxF, sig_NxF, gate_DxF, up_DxF, down_FxD)


def _swiglu_backward(residuals, dy_BxLxD):
    x_NxD, g_NxF, u_NxF, sig_NxF, gate_DxF, up_DxF, down_FxD = residuals
    dy_NxD = dy_BxLxD.reshape(-1, dy_BxLxD.shape[-1])
    silu_NxF = g_NxF * sig_NxF
    dh_NxF = dy_NxD @ down_FxD.T
    d_down = (silu_NxF * u_NxF).T @ dy_NxD
    du_NxF = dh_NxF * silu_NxF
    dg_NxF = dh_NxF * u_NxF * (sig_NxF * (1 + g_NxF * (1 - sig_NxF)))  # silu'(g)
    dx_NxD = dg_NxF @ gate_DxF.T + du_NxF @ up_DxF.T
    return dx_NxD.reshape(dy_BxLxD.shape), x_NxD.T @ dg_NxF, x_NxD.T @ du_NxF, d_down


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def make_lm_head(cfg, padded_vocab: int, dtype, rngs: nnx.Rngs) -> Linear | None:
    """The untied output projection [embed, vocab]; None when the embeddings are tied."""
    if cfg.tie_embeddings:
        return None
    return Linear(cfg.d_model, padded_vocab, logical_axes=("embed", "vocab"), init_std=cfg.init_std, dtype=dtype,
                  rngs=rngs)


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


def hf_shape(shape: tuple[int, ...], kind: str, vocab_size: int) -> tuple[int, ...]:
    """The HF shape of one of our params of `shape` (see the kinds above)."""
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "embedding":
        return (vocab_size,) + tuple(shape[1:])
    if kind == "lm_head":
        return (vocab_size, shape[0])
    return tuple(shape)


def param_to_hf(a, kind: str, vocab_size: int, dtype=np.float32) -> np.ndarray:
    """One of our params in HF layout: a fresh C-contiguous array of `dtype` (the cast and the layout
    change happen in one copy, so a big tensor costs its input plus its output)."""
    a = np.asarray(a)
    if kind == "linear":
        a = a.T
    elif kind == "embedding":
        a = a[:vocab_size]
    elif kind == "lm_head":
        a = a[:, :vocab_size].T
    return np.array(a, dtype, order="C")


def param_from_hf(t, kind: str, padded_vocab: int) -> np.ndarray:
    """One HF tensor (numpy or torch) in our layout, float32; padded vocabulary rows are zeros."""
    a = np.asarray(t.detach().float().numpy() if hasattr(t, "detach") else t, np.float32)
    if kind in ("embedding", "lm_head") and padded_vocab > a.shape[0]:
        a = np.concatenate([a, np.zeros((padded_vocab - a.shape[0],) + a.shape[1:], a.dtype)])
    if kind in ("linear", "lm_head"):
        a = a.T
    return np.ascontiguousarray(a)


def params_to_hf(params: dict, name_map: HFNameMap, vocab_size: int):
    out = {}
    for path, hf_name, kind in name_map:
        a = params
        for key in path:
            a = a[key]
        # float32 first, then a writable copy (torch.from_numpy wants one)
        out[hf_name] = param_to_hf(np.asarray(a, np.float32), kind, vocab_size)
    return out


def params_from_hf(state_dict: dict, name_map: HFNameMap, padded_vocab: int) -> dict:
    params: dict = {}
    for path, hf_name, kind in name_map:
        if hf_name not in state_dict:
            raise KeyError(f"HF state dict has no {hf_name!r} (needed for param {'/'.join(path)})")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = param_from_hf(state_dict[hf_name], kind, padded_vocab)
    return params
