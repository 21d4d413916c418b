"""Causal self-attention over packed documents: one entry point for every model family, and its kernels.

    out = attend(q, k, v, segment_ids_BxL=seg, impl=cfg.attention, layout=layout, head_major=True)

A token attends to earlier tokens of its own segment (packed documents; segments are contiguous runs of one
id, as the packers write them). GQA when K < H: query head h reads kv head h // (H / K). `impl`
(`model.attention`):

    auto        decided from jax.default_backend() at trace time: blocked on CPU, cudnn on GPU (xla when the
                compute dtype is float32, which cuDNN refuses), splash on TPU
    blocked     exact block-causal jnp on head-major tensors; the CPU path (XLA:CPU has no fused attention)
    xla         jax.nn.dot_product_attention(implementation='xla'); segments as a dense [B, 1, L, L] mask (XLA
                computes the L x L scores anyway: a reference, not a kernel)
    cudnn       cuDNN flash attention; segments as per-row segment offsets and lengths (cuDNN's packed
                layout, Hopper or newer), no mask; GQA native. Traces only on a machine with a GPU.
    splash      Pallas TPU splash attention, causal mask + SegmentIds, GQA native; shard_map over batch (and
                heads when the tensor axis splits them) under `layout`
    pallas_gpu  Pallas (Triton) flash attention with segment ids in the kernel; shard_map like splash. The
                kernel has no GQA, so K/V are repeated to H heads inside each shard.

The Pallas kernels lower to their interpret mode on CPU and to the real kernel for TPU / CUDA
(`jax.lax.platform_dependent`), so the same model runs in CPU parity tests and exports for accelerators.
Shapes: B batch, L length, H query heads, K kv heads, Dh head dim; `head_major` says whether q, k, v and
the output are [B, H, L, Dh] (True) or [B, L, H, Dh]. `takes_head_major(impl)` is the layout each
implementation wants, so the model can project straight into it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixlm.config import ATTENTION_IMPLS

HEAD_MAJOR_IMPLS = ("blocked", "splash")  # take [B, H, L, Dh]; the others take [B, L, H, Dh]


def resolve_impl(impl: str | None, dtype=jnp.float32) -> str:
    """The implementation `impl` ('auto' or None: by jax.default_backend() and the compute dtype) runs as."""
    impl = impl or "auto"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return "blocked"


def takes_head_major(impl: str) -> bool:
    """Whether the (resolved) implementation takes [B, H, L, Dh] rather than [B, L, H, Dh]."""
    return impl in HEAD_MAJOR_IMPLS


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    impl: str | None = "auto",
    layout=None,
    head_major: bool = False,
) -> jax.Array:
    """Causal attention of q [B, H, L, Dh] with k, v [B, K, L, Dh] (head_major) or q [B, L, H, Dh] with k, v
    [B, L, K, Dh]; returns q's shape. `layout` (mixlm.sharding.Layout) is the mesh the Pallas kernels are
    shard_mapped over (None: called as they are, e.g. on one device)."""
    impl = resolve_impl(impl, q.dtype)
    if head_major != takes_head_major(impl):  # the models project straight into the right layout; others pay
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        out = _IMPLS[impl](q, k, v, segment_ids_BxL, layout)
        return out.transpose(0, 2, 1, 3)
    return _IMPLS[impl](q, k, v, segment_ids_BxL, layout)


# --- blocked (CPU) ------------------------------------------------------------------------------------------


def blocked_causal_attention_heads(
    q_BxHxLxDh: jax.Array,
    k_BxKxLxDh: jax.Array,
    v_BxKxLxDh: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    block: int = 128,
) -> jax.Array:
    """Exact causal attention on head-major tensors, computed per block of queries: query block i
    only scores keys [0, (i+1)·block), so the upper triangle is never computed (≈ half the work and
    memory of the full L×L path, forward and backward). GQA when K < H. Softmax in float32.
    Returns [B, H, L, Dh]."""
    batch, heads, length, head_dim = q_BxHxLxDh.shape
    kv_heads = k_BxKxLxDh.shape[1]
    groups = heads // kv_heads
    if length % block:
        block = length
    scale = 1.0 / float(head_dim) ** 0.5
    q_BxKxGxLxDh = (q_BxHxLxDh * scale).reshape(batch, kv_heads, groups, length, head_dim)
    positions = jnp.arange(length)
    outs = []
    for start in range(0, length, block):
        end = start + block
        scores_BxKxGxQxT = jnp.einsum(
            "bkgqd,bktd->bkgqt", q_BxKxGxLxDh[:, :, :, start:end], k_BxKxLxDh[:, :, :end],
            preferred_element_type=jnp.float32,
        )
        allowed = (positions[start:end, None] >= positions[None, :end])[None, None, None]
        if segment_ids_BxL is not None:
            same_BxQxT = segment_ids_BxL[:, start:end, None] == segment_ids_BxL[:, None, :end]
            allowed = allowed & same_BxQxT[:, None, None]
        scores_BxKxGxQxT = jnp.where(allowed, scores_BxKxGxQxT, -1e30)
        probs = jax.nn.softmax(scores_BxKxGxQxT, axis=-1).astype(v_BxKxLxDh.dtype)
        outs.append(jnp.einsum("bkgqt,bktd->bkgqd", probs, v_BxKxLxDh[:, :, :end]))
    return jnp.concatenate(outs, axis=3).reshape(batch, heads, length, head_dim)


def _blocked(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL, layout):
    return blocked_causal_attention_heads(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL=segment_ids_BxL)


# --- jax.nn.dot_product_attention: xla, cudnn ------------------------------------------------------------


def _xla(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, layout):
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        mask_Bx1xLxL = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask=mask_Bx1xLxL, is_causal=True, implementation="xla"
    )


def cudnn_segment_layout(segment_ids_BxL: jax.Array, max_segments: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed-layout description of each row: (lengths [B, M], offsets [B, M + 1]), int32, one entry
    per contiguous run of a segment id (M = max_segments, default L: any packing fits), -1 after the last."""
    batch, length = segment_ids_BxL.shape
    m = max_segments or length
    starts_BxL = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1
    )

    def one_row(starts_L):
        begin_M1 = jnp.nonzero(starts_L, size=m + 1, fill_value=length)[0]  # run starts, then L
        lengths_M = jnp.diff(begin_M1)  # positive for each run, 0 after the last
        offsets_M1 = jnp.where(jnp.arange(m + 1) < jnp.sum(starts_L), begin_M1, -1)
        return jnp.where(lengths_M > 0, lengths_M, -1).astype(jnp.int32), offsets_M1.astype(jnp.int32)

    return jax.vmap(one_row)(starts_BxL)


def _cudnn(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, layout):
    if segment_ids_BxL is None:
        return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, is_causal=True,
                                            implementation="cudnn")
    # jax.nn.dot_product_attention has no segment ids; its cuDNN backend takes packed segments directly.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    lengths_BxM, offsets_BxM1 = cudnn_segment_layout(segment_ids_BxL)
    return cudnn_attention(
        q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, None, None, lengths_BxM, lengths_BxM, offsets_BxM1, offsets_BxM1,
        scale=1.0 / float(q_BxLxHxDh.shape[-1]) ** 0.5, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )


# --- Pallas kernels: splash (TPU), pallas_gpu (Triton) ---------------------------------------------------


def _shard_map_kernel(kernel, layout, q, k, v, segment_ids_BxL, *, heads_axis: int):
    """kernel(q, k, v[, segment_ids_BxL]) on each device's rows (and heads, when the rule table splits both q's
    and kv's heads over the same mesh axes), the length whole. Without a layout: the kernel as it is."""
    operands = (q, k, v) if segment_ids_BxL is None else (q, k, v, segment_ids_BxL)
    if layout is None:
        return kernel(*operands)
    batch, heads, kv_heads = q.shape[0], q.shape[heads_axis], k.shape[heads_axis]
    batch_axes, q_heads_axes = layout.spec(("batch", "heads"), (batch, heads))
    _, kv_heads_axes = layout.spec(("batch", "kv_heads"), (batch, kv_heads))
    heads_axes = q_heads_axes if q_heads_axes == kv_heads_axes else None  # a GQA group stays on one shard
    entries = [batch_axes, None, None, None]
    entries[heads_axis] = heads_axes
    qkv_spec = P(*entries)
    in_specs = (qkv_spec,) * 3 + ((P(batch_axes, None),) if segment_ids_BxL is not None else ())
    return jax.shard_map(kernel, mesh=layout.mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(
        *operands
    )


def _interpret_on_cpu(run):
    """run(..., interpret=True) when lowered for CPU, run(..., interpret=False) (the real kernel) otherwise."""

    def call(*args):
        return jax.lax.platform_dependent(
            *args, cpu=functools.partial(run, interpret=True), default=functools.partial(run, interpret=False)
        )

    return call


def splash_block_size(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (splash tiles the sequence in blocks of 128 lanes)."""
    for block in (512, 256, 128):
        if length % block == 0:
            return block
    raise ValueError(f"model.attention=splash needs a sequence length that is a multiple of 128, got {length}")


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # cached across traces: its mask tables must be concrete arrays
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_rows(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL=None, *, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    heads, length, head_dim = q_BxHxLxDh.shape[1:]
    kernel = _splash_kernel(heads, length, splash_block_size(length), interpret)
    q_BxHxLxDh = q_BxHxLxDh * jnp.asarray(1.0 / float(head_dim) ** 0.5, q_BxHxLxDh.dtype)  # splash does not scale
    if segment_ids_BxL is None:
        return jax.vmap(kernel)(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL
    )


def _splash(q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh, segment_ids_BxL, layout):
    return _shard_map_kernel(_interpret_on_cpu(_splash_rows), layout, q_BxHxLxDh, k_BxKxLxDh, v_BxKxLxDh,
                             segment_ids_BxL, heads_axis=1)


def _pallas_gpu_rows(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL=None, *, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    groups = q_BxLxHxDh.shape[2] // k_BxLxKxDh.shape[2]
    if groups > 1:  # the kernel reads kv head h for query head h
        k_BxLxKxDh, v_BxLxKxDh = (jnp.repeat(x, groups, axis=2) for x in (k_BxLxKxDh, v_BxLxKxDh))
    return gpu_attention.mha(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL,
                             sm_scale=1.0 / float(q_BxLxHxDh.shape[-1]) ** 0.5, causal=True, interpret=interpret)


def _pallas_gpu(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, layout):
    return _shard_map_kernel(_interpret_on_cpu(_pallas_gpu_rows), layout, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh,
                             segment_ids_BxL, heads_axis=2)


_IMPLS = {"blocked": _blocked, "xla": _xla, "cudnn": _cudnn, "splash": _splash, "pallas_gpu": _pallas_gpu}

__all__ = ["HEAD_MAJOR_IMPLS", "attend", "blocked_causal_attention_heads", "cudnn_segment_layout", "resolve_impl",
           "splash_block_size", "takes_head_major"]
