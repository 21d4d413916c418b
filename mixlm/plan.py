"""Memory and time of a training config on a target accelerator, worked out without allocating anything
(`mixlm plan`).

Two columns of per-device bytes:

    analytic   for the accelerator: fp32 params / their shards, AdamW's two moments, fp32 gradients, and the
               activations saved for the backward pass per token per layer from the model's shapes, its
               compute dtype and `model.remat` (flash attention assumed unless `model.attention` is xla/blocked),
               and one chunk of the chunked cross-entropy with its LM-head gradient
    compiled   `memory_analysis()` of the real train step (mixlm.train.build_setup) lowered with abstract
               arguments on a mesh of N fake CPU devices: exact for the shardings, but the buffer assignment
               is XLA:CPU's (its attention path, fusion and scheduling), not the accelerator's

plus whether the analytic total fits the device's memory, FLOPs/token, tokens/s and days to train at a stated
MFU against the device's dense bf16 peak, and the weights the mesh would replicate.

    with_fake_devices(n) is None  ->  rerun in a subprocess with fake_device_env(n) (the CLI does this)
    p = make_plan(cfg, devices=jax.devices()[:8], device_kind_name="h100", mfu=0.4)
    print(p.to_text())
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence

from mixlm.config import ExperimentConfig, validate_for_mesh
from mixlm.errors import ConfigError
from mixlm.metrics import PEAK_FLOPS_BY_DEVICE

GIB = 1 << 30
# Share of a device's memory a plan may fill: the rest is XLA workspace, collective buffers and fragmentation.
USABLE_FRACTION = 0.9

# Memory per device (GiB). Sources: NVIDIA H100 SXM datasheet (80 GB HBM3), H200 product page (141 GB HBM3e),
# A100 datasheet (80 GB HBM2e; 40 GB HBM2 for the first model; the A800 is an A100 with slower NVLink), Google
# Cloud TPU system-architecture pages: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB HBM per chip.
DEVICE_MEMORY_GIB = {
    "h100": 80,
    "h200": 141,
    "a100": 80,
    "a100-40": 40,
    "v5p": 95,
    "v5e": 16,
    "v4": 32,
    "v6e": 32,
}

TPU_KINDS = ("v4", "v5e", "v5p", "v6e")

# Which attention paths keep the L x L probabilities for the backward pass (per token: heads x L values).
DENSE_ATTENTION = ("xla", "blocked")


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_bytes: int
    peak_flops: float  # dense bf16 FLOP/s of one device (mixlm.metrics.PEAK_FLOPS_BY_DEVICE)

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * USABLE_FRACTION)

    @property
    def is_tpu(self) -> bool:
        return self.name in TPU_KINDS


def device_kind(name: str) -> DeviceKind:
    """The memory and peak of a device kind named in DEVICE_MEMORY_GIB (h100, a100-40, v5p, ...)."""
    key = name.lower()
    if key not in DEVICE_MEMORY_GIB:
        raise ConfigError(f"--device-kind {name!r}: expected one of {', '.join(DEVICE_MEMORY_GIB)}")
    peak = next((p for sub, p in PEAK_FLOPS_BY_DEVICE if sub in key), 0.0)
    return DeviceKind(key, DEVICE_MEMORY_GIB[key] * GIB, peak)


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device."""

    params: int
    optimizer: int
    gradients: int
    activations: int
    loss_workspace: int = 0  # one chunk of the chunked cross-entropy and its LM-head gradient

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.loss_workspace


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes from the compiled train step's memory_analysis() (XLA:CPU's buffer assignment)."""

    params: int  # the step's parameter arguments, from its input shardings
    optimizer: int
    batch: int
    arguments: int  # params + optimizer + batch (+ the step counter)
    outputs: int
    aliased: int  # outputs written into donated arguments (the new state)
    temp: int  # gradients + saved activations + scratch

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temp


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    device: DeviceKind
    num_devices: int
    mesh_shape: dict
    global_batch_size: int
    seq_len: int
    grad_accum_steps: int
    tokens_per_device: int  # per micro-batch
    compute_dtype: str
    remat: str
    attention: str
    analytic: MemoryBreakdown
    compiled: CompiledMemory | None
    flops_per_token: float
    mfu: float
    steps: int
    replicated: list[str]
    suggestions: list[str]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.analytic.total <= self.device.usable_bytes

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def train_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def tokens_per_s(self) -> float:
        return self.mfu * self.device.peak_flops * self.num_devices / self.flops_per_token

    @property
    def days(self) -> float:
        return self.train_tokens / self.tokens_per_s / 86400 if self.tokens_per_s else math.inf

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(fits=self.fits, tokens_per_step=self.tokens_per_step, train_tokens=self.train_tokens,
                   tokens_per_s=self.tokens_per_s, days=self.days, analytic_total=self.analytic.total,
                   usable_bytes=self.device.usable_bytes,
                   compiled_peak=self.compiled.peak if self.compiled else None)
        return out

    def to_text(self) -> str:
        d, a, c = self.device, self.analytic, self.compiled
        lines = [
            (f"mixlm plan: {self.name} on {self.num_devices} x {d.name} ({d.memory_bytes / GIB:.0f} GiB, "
            f"{d.peak_flops / 1e12:,.0f} TFLOP/s dense bf16), mesh {self.mesh_shape}"),
            (f"batch {self.global_batch_size} x {self.seq_len} tokens/step in {self.grad_accum_steps} micro-batch(es): "
            f"{self.tokens_per_device:,} tokens per device per micro-batch; compute {self.compute_dtype}, "
            f"remat {self.remat}, attention {self.attention}"),
            "",
            f"{'per device':<38}{'analytic (' + d.name + ')':>18}" + (f"{'compiled (CPU backend)':>26}" if c else ""),
        ]

        def row(label: str, analytic: int | None, compiled: int | str | None = None) -> str:
            left = f"{analytic / GIB:,.2f} GiB" if analytic is not None else "-"
            right = compiled if isinstance(compiled, str) else f"{compiled / GIB:,.2f} GiB" if compiled is not None else "-"
            return f"{label:<38}{left:>18}" + (f"{right:>26}" if c else "")

        lines += [
            row("params (fp32 master)", a.params, c and c.params),
            row("optimizer state (AdamW mu, nu)", a.optimizer, c and c.optimizer),
            row("gradients (fp32)", a.gradients, c and "in temp"),
            row("saved activations", a.activations, c and "in temp"),
            row("loss chunk + LM-head gradient", a.loss_workspace, c and "in temp"),
        ]
        if c:
            lines += [row("batch", None, c.batch), row("temp (grads + activations + scratch)", None, c.temp)]
        lines += [
            row("total (compiled: peak)" if c else "total", a.total, c and c.peak),
            "",
            (f"fits {d.name} ({d.usable_bytes / GIB:.1f} GiB usable = {USABLE_FRACTION:.0%} of "
            f"{d.memory_bytes / GIB:.0f} GiB): {'yes' if self.fits else 'NO'} (analytic total "
            f"{a.total / GIB:,.2f} GiB)"),
        ]
        lines += [f"  to fit: {s}" for s in self.suggestions]
        lines += [
            f"flops/token {self.flops_per_token:.4g} (training, causal attention; mixlm.models.flops_per_token)",
            (f"at {self.mfu:.0%} MFU: {self.tokens_per_s:,.0f} tokens/s ({self.tokens_per_s / self.num_devices:,.0f} "
            f"per device); {self.steps:,} steps x {self.tokens_per_step:,} tokens = {self.train_tokens / 1e9:,.2f}B "
            f"tokens -> {self.days:,.2f} days"),
            "replicated weights: " + ("; ".join(self.replicated) if self.replicated else "none"),
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def shard_bytes(shape: Sequence[int], itemsize: int, spec, mesh_shape: Mapping[str, int]) -> int:
    """Bytes of one device's shard of an array of `shape` split by PartitionSpec `spec`."""
    n = math.prod(shape) * itemsize
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n //= mesh_shape[axis]
    return n


def param_elements_per_device(layout, param_shapes, logical_axes) -> int:
    """Elements of one device's shards of every parameter under `layout` (replicated ones count whole)."""
    import jax

    from mixlm.sharding import is_logical_axes

    flat_axes = dict(jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_logical_axes)[0])
    return sum(shard_bytes(leaf.shape, 1, layout.spec(flat_axes[path], leaf.shape), layout.mesh.shape)
               for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes)[0])


def _divides(n: int, k: int) -> int:
    """k if it splits n evenly (the sharding then applies), else 1 (the dimension stays whole)."""
    return k if k > 1 and n % k == 0 else 1


def activation_bytes_per_token(cfg: ExperimentConfig, layout, *, remat: str, attention: str,
                               tpu: bool = False) -> float:
    """Bytes one token keeps on its device for the backward pass, all layers plus embedding and LM head: the
    residuals JAX's autodiff saves (counted with jax.ad_checkpoint's saved_residuals on a regmix-1b block:
    104.5 KB per token per layer with splash; this formula gives 103.5 KB).

    Per layer, with compute dtype bytes c, widths split by the tensor axes where they divide:
        none           c * (n_D D  [norm outputs; llama: both, their scaled copy and the MLP input, n_D = 4;
                                    gpt2: 2]
                            + (H + 2K) Dh [q, k, v] + 2 H Dh [the scaled q the kernel reads, its output]
                              (splash on TPU: Dh padded to a multiple of 128, the lanes of its tiles)
                            + n_F F  [llama: gate, up, sigmoid(gate), 3; gpt2: GELU's tanh-form terms, 6])
                       + n32 D  [the norms' float32 copies: RMSNorm's input and normalised value, both norms,
                                 16; LayerNorm's also the centred value, 24; half without a float32 input copy]
                       + (8 + c) (H + K) Dh  [qk-norm: q and k in float32, normalised, and in compute dtype]
                       + 4 H  [softmax statistics]
                       (+ (4 + c + 1) H L for attention paths that materialise the probabilities: float32,
                        their compute-dtype copy and the mask)
        dots_*         c * ((H + 2K) Dh + 2 D + 2 F [1 F ungated]): the matmul outputs only; the rest of one
                       layer's `none` activations live while it is recomputed
        full           c * D: the block input; one layer's `none` activations live while it is recomputed
    On TPU with scan_layers, c * D more per layer: the TPU compiler's memory analysis (the temp figure it refuses
    a program by) counts the scan's stacked block inputs twice over its own buffer assignment — measured on
    metarater-3.3b at remat=full, v5p-64: 4 and 8 layers give temp 22.13 and 27.16 GiB, buffer assignment 17.14
    and 19.67 GiB, a layer's stacked input 0.625 GiB (benchmarks/results/plan_tpu_seed_configs_notes.md).
    Outside the layers: the embedding output and final norm (3 c D + n32 D / 2) and the chunked loss's gradient
    of the hidden states, formed in its forward pass (c D); the logits themselves live one chunk at a time
    (loss_workspace_bytes). The counts are those of jax.ad_checkpoint's saved_residuals on a block of
    regmix-1b (104.5 KB per token per layer; this formula 103.5), dclm-1b (145.8; 144.5) and gpt2-70m (44.1;
    44.1). `tpu`: whether the target is a TPU (targets_tpu)."""
    m = cfg.model
    c = _itemsize(m.compute_dtype)
    d, f, h, k, dh = m.d_model, m.mlp_dim, m.num_heads, m.kv_heads, m.dim_per_head
    tp_heads = _divides(h, layout.axis_size("heads"))
    tp_kv = _divides(k, layout.axis_size("kv_heads"))
    tp_mlp = _divides(f, layout.axis_size("mlp"))
    gated_mlp = m.family != "gpt2"
    n_d, n_f, n32 = (4, 3, 16) if gated_mlp else (2, 6, 24)
    norms32 = n32 * d if c < 4 else n32 * d / 2  # a float32 compute dtype needs no float32 copy of the input
    q, kv = h * dh / tp_heads, k * dh / tp_kv
    # A Pallas kernel's operands keep its [.., L, Dh] layout, and a TPU tiles the minor dimension in 128 lanes
    lanes = -(-dh // 128) * 128 if attention == "splash" and tpu else dh
    q_att, kv_att = q * lanes / dh, kv * lanes / dh
    full_layer = (c * (n_d * d + q_att + 2 * kv_att + 2 * q_att + n_f * f / tp_mlp) + norms32
                  + 4 * h / tp_heads)
    if m.qk_norm:
        full_layer += (8 + c) * (q + kv)
    if attention in DENSE_ATTENTION:
        full_layer += ((4 + c + 1) if c < 4 else 5) * h * cfg.data.seq_len / tp_heads
    if remat == "full":
        layers = m.num_layers * c * d + full_layer
    elif remat.startswith("dots"):
        dots_layer = c * (q_att + 2 * kv_att + 2 * d + (2 if gated_mlp else 1) * f / tp_mlp)
        layers = m.num_layers * dots_layer + max(full_layer - dots_layer, 0)
    else:
        layers = m.num_layers * full_layer
    if m.scan_layers and tpu:
        layers += m.num_layers * c * d
    return layers + 4 * c * d + norms32 / 2


def targets_tpu(layout, device: DeviceKind) -> bool:
    """Whether the plan is for a TPU: the device kind names one, or the layout's devices are TPUs (compile-only
    ones from --compile-for)."""
    return device.is_tpu or layout.mesh.devices.flat[0].platform == "tpu"


def loss_workspace_bytes(cfg: ExperimentConfig, layout, grad_accum_steps: int) -> int:
    """Bytes the chunked cross-entropy (mixlm.models.forward.loss_sums) holds on a device whatever the batch:
    one chunk's float32 logits and their gradient in the compute dtype (the softmax fuses into it; a one-chip
    regmix-1m step compiled for v5p agreed), and the float32 running gradient of the LM head
    [D, V_pad / vocab shards]."""
    from mixlm.models import forward

    m = cfg.model
    v_pad = m.padded_vocab_size(layout.axis_size("vocab"))
    vocab = v_pad // _divides(v_pad, layout.axis_size("vocab"))
    rows = cfg.train.global_batch_size // grad_accum_steps
    chunk = forward.loss_chunk_len_for(rows, cfg.data.seq_len, v_pad, layout)
    chunk_elements = rows // _divides(rows, layout.axis_size("batch")) * chunk * vocab
    return chunk_elements * (4 + _itemsize(m.compute_dtype)) + 4 * m.d_model * vocab


def _itemsize(dtype_name: str) -> int:
    import numpy as np

    return 2 if dtype_name in ("bfloat16", "float16") else np.dtype(dtype_name).itemsize


def analytic_memory(cfg: ExperimentConfig, layout, param_shapes, logical_axes, *, moment_itemsize: int = 4,
                    remat: str | None = None, grad_accum_steps: int | None = None,
                    tpu: bool = False) -> MemoryBreakdown:
    """Per-device bytes on the accelerator (see the module docstring); `remat` and `grad_accum_steps` default
    to the config's and can be varied to ask what would fit; `tpu`: whether the target is a TPU (targets_tpu)."""
    remat = model_remat(cfg) if remat is None else remat
    k = cfg.train.grad_accum_steps if grad_accum_steps is None else grad_accum_steps
    elements = param_elements_per_device(layout, param_shapes, logical_axes)
    params = 4 * elements  # fp32 master weights
    tokens = tokens_per_device(cfg, layout, k)
    per_token = activation_bytes_per_token(cfg, layout, remat=remat, attention=model_attention(cfg), tpu=tpu)
    return MemoryBreakdown(
        params=params,
        optimizer=2 * elements * moment_itemsize,
        gradients=params * (2 if k > 1 else 1),  # with accumulation: the running sum and one micro-batch's grads
        activations=int(tokens * per_token),
        loss_workspace=loss_workspace_bytes(cfg, layout, k),
    )


def tokens_per_device(cfg: ExperimentConfig, layout, grad_accum_steps: int) -> int:
    rows = cfg.train.global_batch_size // grad_accum_steps
    return rows // _divides(rows, layout.axis_size("batch")) * cfg.data.seq_len


def model_remat(cfg: ExperimentConfig) -> str:
    return getattr(cfg.model, "remat", "none") or "none"


def model_attention(cfg: ExperimentConfig) -> str:
    return getattr(cfg.model, "attention", "auto") or "auto"


def adam_moment_itemsize(opt_state) -> int:
    """Bytes per element of AdamW's first moment in this optimizer state (fp32 unless bf16 moments)."""
    import jax
    import optax

    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(node, optax.ScaleByAdamState):
            leaves = jax.tree.leaves(node.mu)
            if leaves:
                return leaves[0].dtype.itemsize
    return 4


def abstract_batch(cfg: ExperimentConfig, layout) -> dict:
    """ShapeDtypeStructs of one global train batch, sharded as mixlm.train feeds it."""
    import jax
    import jax.numpy as jnp

    shape, sharding = (cfg.train.global_batch_size, cfg.data.seq_len), layout.batch_sharding(2)
    keys = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
    if cfg.data.packing != "concat":
        keys.update(segment_ids=jnp.int32, positions=jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in keys.items()}


def compiled_memory(setup, batch) -> CompiledMemory:
    """Lowers and compiles setup.train_step for abstract (state, batch): no array is allocated."""
    compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
    return memory_of(compiled, setup.abstract_state, batch)


def per_device_bytes(abstract) -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs that carry their shardings."""
    import jax

    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract))


def memory_of(compiled, abstract_state, batch) -> CompiledMemory:
    """CompiledMemory of a compiled train step whose state and batch are these ShapeDtypeStructs (with the
    shardings they were lowered with)."""
    stats = compiled.memory_analysis()
    return CompiledMemory(
        params=per_device_bytes(abstract_state.params),
        optimizer=per_device_bytes(abstract_state.opt_state),
        batch=per_device_bytes(batch),
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
    )


def _divisors(n: int) -> list[int]:
    """The divisors of n >= 1, ascending (trial division to sqrt(n): 46k steps for a batch of 2**31)."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return small + [n // k for k in reversed(small) if k * k != n]


def _fitting_micro_batches(cfg, layout, param_shapes, logical_axes, moment_itemsize, device, remat) -> int | None:
    """The fewest train.grad_accum_steps (dividing the batch over its shards) at which `remat` fits."""
    rows, shards = cfg.train.global_batch_size, layout.axis_size("batch")
    for k in _divisors(rows):
        if (rows // k) % shards:
            continue
        mem = analytic_memory(cfg, layout, param_shapes, logical_axes, moment_itemsize=moment_itemsize,
                              remat=remat, grad_accum_steps=k, tpu=targets_tpu(layout, device))
        if mem.total <= device.usable_bytes:
            return k
    return None


def fitting_changes(cfg, layout, param_shapes, logical_axes, moment_itemsize, device
                    ) -> list[tuple[list[str], MemoryBreakdown]]:
    """(overrides, analytic memory) of the changes that make the plan fit, least intrusive first: for the
    configured remat, then dots_saveable, then full, the fewest micro-batches at which it fits."""
    out = []
    for remat in dict.fromkeys([model_remat(cfg), "dots_saveable", "full"]):
        k = _fitting_micro_batches(cfg, layout, param_shapes, logical_axes, moment_itemsize, device, remat)
        if k is None:
            continue
        mem = analytic_memory(cfg, layout, param_shapes, logical_axes, moment_itemsize=moment_itemsize,
                              remat=remat, grad_accum_steps=k, tpu=targets_tpu(layout, device))
        changes = ([f"model.remat={remat}"] if remat != model_remat(cfg) else []) + (
            [f"train.grad_accum_steps={k}"] if k != cfg.train.grad_accum_steps else [])
        if changes:
            out.append((changes, mem))
    return out


def suggestions(cfg, layout, param_shapes, logical_axes, moment_itemsize, device) -> list[str]:
    """What would make the plan fit: more micro-batches, rematerialisation, or nothing that the batch allows."""
    out = [f"{' '.join(changes)} ({mem.total / GIB:,.2f} GiB)"
           for changes, mem in fitting_changes(cfg, layout, param_shapes, logical_axes, moment_itemsize, device)]
    return out or ["no micro-batching or remat setting fits: use more devices or tensor parallelism (mesh.tensor)"]


def make_plan(cfg: ExperimentConfig, *, devices: Sequence, device_kind_name: str = "h100", mfu: float = 0.4,
              compile: bool = True, name: str = "") -> Plan:
    """The plan of `cfg` on a mesh over `devices` (fake CPU devices standing in for the target) for a target of
    `device_kind_name`. `compile=False` skips the compiled column (the analytic one needs no compilation)."""
    from mixlm import models
    from mixlm.sharding import DEFAULT_RULES, Layout, ShardingFallbackWarning, make_mesh
    from mixlm.train import build_setup

    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: expected a fraction in (0, 1], e.g. 0.4")
    device = device_kind(device_kind_name)
    strict = cfg.mesh.strict
    cfg = cfg.replace(mesh=dataclasses.replace(cfg.mesh, strict=False))  # report replicated weights, don't refuse
    mesh = make_mesh(cfg.mesh, devices)
    layout = Layout(mesh, DEFAULT_RULES.with_overrides(cfg.mesh.rules))
    validate_for_mesh(cfg, layout.axis_size("batch"), 1, host_memory_bytes=0)  # sized for the target, not this host
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardingFallbackWarning)  # listed in the plan instead
        setup = build_setup(cfg, mesh)
    param_shapes, logical_axes = setup.abstract_state.params, setup.logical_axes
    replicated = setup.layout.fallbacks(param_shapes, logical_axes)
    moment_itemsize = adam_moment_itemsize(setup.abstract_state.opt_state)
    analytic = analytic_memory(cfg, setup.layout, param_shapes, logical_axes, moment_itemsize=moment_itemsize,
                               tpu=targets_tpu(setup.layout, device))
    compiled = compiled_memory(setup, abstract_batch(cfg, setup.layout)) if compile else None
    notes = [
        ("analytic = for the accelerator; compiled = XLA:CPU's buffer assignment of the same train step on "
        f"{len(devices)} fake CPU devices (its CPU attention path and fusion, {cfg.model.compute_dtype} as "
        "configured): exact for the shardings, not for the accelerator's temp memory"),
        ("analytic activations keep one compute-dtype copy of each saved tensor (what fusion leaves); the unfused "
         "jaxpr of today's blocks saves more (e.g. fp32 copies inside RMSNorm)"),
    ]
    if model_attention(cfg) in DENSE_ATTENTION:
        notes.append(f"model.attention={model_attention(cfg)} keeps L x L probabilities per head (counted)")
    if strict and replicated:
        notes.append("mesh.strict is set: `mixlm train` refuses this mesh because of the replicated weights")
    if device.name.startswith(("h", "a")):
        notes.append("JAX reserves 75% of GPU memory by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 to get "
                     "the usable memory assumed here")
    analytic_fits = analytic.total <= device.usable_bytes
    return Plan(
        name=name or cfg.model.name or cfg.model.family, device=device, num_devices=len(devices),
        mesh_shape=dict(mesh.shape), global_batch_size=cfg.train.global_batch_size, seq_len=cfg.data.seq_len,
        grad_accum_steps=cfg.train.grad_accum_steps,
        tokens_per_device=tokens_per_device(cfg, setup.layout, cfg.train.grad_accum_steps),
        compute_dtype=cfg.model.compute_dtype, remat=model_remat(cfg), attention=model_attention(cfg),
        analytic=analytic, compiled=compiled,
        flops_per_token=models.flops_per_token(cfg.model, cfg.data.seq_len, causal=True), mfu=mfu,
        steps=cfg.train.steps, replicated=replicated,
        suggestions=[] if analytic_fits else suggestions(cfg, setup.layout, param_shapes, logical_axes,
                                                         moment_itemsize, device),
        notes=notes,
    )


# --- fake devices --------------------------------------------------------------------------------------------

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_fake_devices(n: int) -> list | None:
    """The first `n` devices of this process when it runs on CPU only (JAX_PLATFORMS=cpu) and has at least
    `n` of them, else None: then plan in a subprocess with fake_device_env(n). Never initialises a GPU or TPU
    backend (that would reserve device memory)."""
    import jax

    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if platforms.strip().lower() != "cpu":
        return None
    devices = jax.devices()
    return list(devices[:n]) if len(devices) >= n else None


def fake_device_env(n: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) for a process with `n` fake CPU devices and no accelerator backend."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([f"{DEVICE_COUNT_FLAG}={n}", *flags])
    env["JAX_PLATFORMS"] = "cpu"
    return env


__all__ = ["DEVICE_MEMORY_GIB", "USABLE_FRACTION", "CompiledMemory", "DeviceKind", "MemoryBreakdown", "Plan",
           "activation_bytes_per_token", "analytic_memory", "compiled_memory", "device_kind", "fake_device_env",
           "make_plan", "param_elements_per_device", "with_fake_devices"]
