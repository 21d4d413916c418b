"""Typed experiment configuration: YAML files that compose, `key.sub=value` overrides, validation.

An experiment YAML has one mapping per section (model, mesh, optimizer, schedule, data, train,
checkpoint, eval, logging). Composition:

* `base: [a.yaml, b.yaml]` at the top of any file: those files are loaded first (paths relative to
  the file) and this file's keys are merged over them (a "recipe" is such a base file).
* A section given as a string is the path of a YAML file holding that section, e.g.
  `model: ../models/llama-tiny.yaml`.
* `data.mixture` given as a string is the path of a mixture YAML (`domain: weight`, or
  `{weights: ..., stages: [...]}`); it is read into the config so the saved config is self-contained.

Loading reads files and nothing else: no jax, no directories created (STYLE.md: no side effects).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixlm.model_families import family_names


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file, the key and what to do."""


ATTENTION_IMPLS = ("auto", "blocked", "xla", "cudnn", "splash", "pallas_gpu")  # mixlm.models.attention
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")  # mixlm.models.layers


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"  # a registered family (mixlm.model_families): llama | gpt2 | ...
    name: str = ""
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (MHA); 1: MQA; else GQA
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 256
    vocab_size: int = 256  # the tokenizer's vocabulary; the embedding is padded (see vocab_multiple)
    vocab_multiple: int = 128  # pad the embedding rows to a multiple of this (and of the mesh axes splitting vocab)
    max_seq_len: int = 128  # the context length; data.seq_len may not exceed it (raise this to train longer)
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # per-head RMSNorm on q and k (DCLM / Qwen3 style)
    init_std: float = 0.02
    compute_dtype: str = "float32"  # activations / matmuls; params stay float32 (master weights)
    attention: str = "auto"  # auto | blocked | xla | cudnn | splash | pallas_gpu (mixlm.models.attention)
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable: recompute per block
    scan_layers: bool = False  # one compiled block over stacked params [num_layers, ...] (mixlm.models.stack_layers)

    def __post_init__(self):
        _check_bounds("model", self)  # first: a zero head count would divide by zero below
        if self.family not in family_names():
            raise ConfigError(f"model.family must be one of the registered families ({', '.join(family_names())}; "
                              f"mixlm.model_families.register_family adds one), got {self.family!r}")
        if self.d_model % self.num_heads and not self.head_dim:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                "set model.head_dim explicitly"
            )
        if self.kv_heads and self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}"
            )
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.compute_dtype must be float32|bfloat16|float16, got {self.compute_dtype!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention must be {'|'.join(ATTENTION_IMPLS)}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be {'|'.join(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def padded_vocab_size(self, multiple_of: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of lcm(vocab_multiple, multiple_of)."""
        m = math.lcm(max(self.vocab_multiple, 1), max(multiple_of, 1))
        return -(-self.vocab_size // m) * m


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all devices left over
    tensor: int = 1
    rules: dict = field(default_factory=dict)  # {logical axis: [mesh axes]} over mixlm.sharding.DEFAULT_RULES
    strict: bool = False  # a weight above 1M elements that cannot be sharded is an error, not a warning

    def __post_init__(self):
        for name, axes in self.rules.items():
            listed = [] if axes is None else [axes] if isinstance(axes, str) else axes
            if not isinstance(listed, list) or any(a not in ("data", "fsdp", "tensor") for a in listed):
                raise ConfigError(f"mesh.rules.{name}: expected a list of mesh axes (data, fsdp, tensor), got {_short(axes)}")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases never decay
    clip_norm: float = 1.0  # 0 disables clipping
    moments_dtype: str = "float32"  # float32 | bfloat16: dtype of AdamW's first moment (mu); nu stays float32

    def __post_init__(self):
        if self.moments_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"optimizer.moments_dtype must be float32|bfloat16, got {self.moments_dtype!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"  # cosine | constant | linear | wsd
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps == 0
    min_lr: float = 0.0  # floor of cosine / linear / wsd decay
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying at the end

    def __post_init__(self):
        if self.kind not in ("cosine", "constant", "linear", "wsd"):
            raise ConfigError(f"schedule.kind must be cosine|constant|linear|wsd, got {self.kind!r}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # synthetic (in-memory token source) | prepared (ArrayRecord domains)
    prepared_dir: str = ""  # folder with one sub-folder per prepared domain
    mixture: dict = field(default_factory=dict)  # {domain: weight} or {weights: {...}, stages: [...]}
    mixture_index: int = 0  # k >= 1: the k-th mixture of a `random:` spec in mixture (mixlm.data.random_mixtures)
    seq_len: int = 128
    packing: str = "concat"  # concat (concatenate-then-split) | first_fit (segment ids + positions)
    max_epochs: float = 0.0  # 0: unlimited; else the per-domain repetition limit (RegMix MAXIMUM_USAGE)
    seed: int = 0
    num_workers: int = 0  # grain worker processes per host (0: in the main process)
    tokenizer: str = ""  # HF tokenizer folder or hub name (for prepare / eval / export)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all hosts
    grad_accum_steps: int = 1  # micro-batches per step (each global_batch_size / grad_accum_steps)
    seed: int = 0
    z_loss: float = 0.0  # weight of log(Z)^2; 0 disables
    output_dir: str = "runs/default"
    # Multi-process runs: a process that sends no heartbeat for this long is dead, and the coordination
    # service then stops every other process (jax.distributed.initialize(heartbeat_timeout_seconds=...)).
    heartbeat_timeout_s: int = 100


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step permanently (0: none)
    async_save: bool = True
    init_from: str = ""  # params-only initialisation from this checkpoint folder (fresh optimizer)
    save_at_end: bool = True
    verify: bool = True  # record a crc32 of every checkpoint file at save, check it before a restore


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # run the eval loop every N steps (0: only at the end)
    batches: int = 4  # held-out batches per domain
    tasks: list = field(default_factory=list)  # lm-eval tasks run on the live model
    domains: list = field(default_factory=list)  # prepared domains evaluated but never trained on (a target)
    limit: int = 0


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: from the device table / a matmul probe
    wandb: bool = False  # also log to Weights & Biases (needs `wandb`; WANDB_MODE=offline works without an account)
    wandb_project: str = "mixlm"


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> ExperimentConfig:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
_SECTION_TYPES = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
}


def _number(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)  # ints exactly: 2147483647, not 2.14748e+09


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric field: low <= v (low < v when low_open), v <= high (v < high when
    high_open); `also` lists values allowed outside it (e.g. -1 = fill); `why` ends the error message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    why: str = ""

    def allows(self, v) -> bool:
        if v in self.also:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.low is not None and not (v > self.low if self.low_open else v >= self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {low}"
        else:
            text = f"{'<' if self.high_open else '<='} {high}"
        text += "".join(f" or {a}" for a in self.also)
        return text + (f" ({self.why})" if self.why else "")


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1  # any integer field: numpy and jax hold integers as int64 at most

# Every bounded numeric field, checked up front (before jax or any device is touched) by `validate`. An integer
# field with no upper bound here is still bounded by INT64_MAX.
FIELD_BOUNDS: dict[str, Bound] = {
    "model.num_layers": Bound(1),
    "model.d_model": Bound(1),
    "model.num_heads": Bound(1),
    "model.num_kv_heads": Bound(0, why="0 means num_heads"),
    "model.head_dim": Bound(0, why="0 means d_model // num_heads"),
    "model.mlp_dim": Bound(1),
    "model.vocab_size": Bound(1, INT32_MAX, why="token ids are int32"),
    "model.vocab_multiple": Bound(0),
    "model.max_seq_len": Bound(1, INT32_MAX, why="positions are int32"),
    "model.rope_base": Bound(0, low_open=True),
    "model.norm_eps": Bound(0),
    "model.init_std": Bound(0),
    "mesh.data": Bound(1, also=(-1,), why="-1 fills the devices left over"),
    "mesh.fsdp": Bound(1, also=(-1,), why="-1 fills the devices left over"),
    "mesh.tensor": Bound(1, also=(-1,), why="-1 fills the devices left over"),
    "optimizer.lr": Bound(0, why="a negative learning rate trains by gradient ascent"),
    "optimizer.b1": Bound(0, 1, high_open=True),
    "optimizer.b2": Bound(0, 1, high_open=True),
    "optimizer.eps": Bound(0, low_open=True, why="Adam divides by sqrt(v) + eps; 0 gives NaN where a gradient is 0"),
    "optimizer.weight_decay": Bound(0),
    "optimizer.clip_norm": Bound(0, why="0 disables clipping"),
    "schedule.warmup_steps": Bound(0, INT32_MAX, why="optax counts steps in int32"),
    "schedule.warmup_fraction": Bound(0, 1),
    "schedule.min_lr": Bound(0),
    "schedule.decay_fraction": Bound(0, 1),
    "data.mixture_index": Bound(0, why="0: data.mixture as written; k: the k-th mixture of a `random:` spec"),
    "data.seq_len": Bound(1, INT32_MAX, why="positions are int32"),
    "data.seed": Bound(0, INT64_MAX, why="numpy seeds are non-negative"),
    "data.max_epochs": Bound(0, why="0 means unlimited"),
    "data.num_workers": Bound(0),
    "train.steps": Bound(1, INT32_MAX, why="the number of optimizer steps to run; optax counts them in int32"),
    "train.global_batch_size": Bound(1, INT32_MAX, why="sequences per optimizer step over all hosts; "
                                                       "steps x global_batch_size row indices are int64"),
    "train.grad_accum_steps": Bound(1, why="1 means no accumulation"),
    "train.z_loss": Bound(0),
    "train.seed": Bound(0, 2**32 - 1, why="jax.random.key keeps 32 bits, so a larger seed repeats a smaller one"),
    "train.heartbeat_timeout_s": Bound(1, why="seconds"),
    "checkpoint.every": Bound(0, why="0 saves only at the end"),
    "checkpoint.keep_last": Bound(0, why="0 keeps all"),
    "checkpoint.keep_every": Bound(0, why="0 keeps none permanently"),
    "eval.every": Bound(0, why="0 evaluates only at the end"),
    "eval.batches": Bound(0, why="0 disables the validation loss"),
    "eval.limit": Bound(0, why="0 means no limit"),
    "logging.every": Bound(1, why="log every N steps"),
    "logging.peak_flops": Bound(0, why="0 looks the device up"),
}
DATA_SOURCES = ("synthetic", "prepared")
PACKINGS = ("concat", "first_fit")


def _check_bounds(section: str, values: Any) -> None:
    for key, bound in FIELD_BOUNDS.items():
        sec, name = key.split(".")
        if sec == section and not bound.allows(getattr(values, name)):
            raise ConfigError(f"{key}={getattr(values, name)!r} is out of range: must be {bound.describe()}")
    for f in dataclasses.fields(values):  # every other integer: what numpy and jax can hold
        v = getattr(values, f.name)
        if isinstance(v, int) and not isinstance(v, bool) and not -INT64_MAX - 1 <= v <= INT64_MAX:
            raise ConfigError(f"{section}.{f.name}={v!r} is out of range: must fit in int64, <= {INT64_MAX} "
                              "(numpy and jax hold integers as int64)")


def validate(cfg: ExperimentConfig, origin: dict | None = None) -> None:
    """Raises a one-line ConfigError for a value no run can use: a field outside `FIELD_BOUNDS`, an unknown
    data source or packing, data.seq_len beyond model.max_seq_len, a global batch that grad_accum_steps does
    not divide. `origin` ('section.key' -> file or override) prefixes the message with where the value came
    from. Needs no jax; `validate_for_mesh` adds the rules that need the mesh."""
    origin = origin or {}

    def fail(key: str, message: str):
        where = origin.get(key)
        raise ConfigError(f"{where}: {message}" if where else message)

    for section in _SECTION_TYPES:
        try:
            _check_bounds(section, getattr(cfg, section))
        except ConfigError as e:
            fail(str(e).split("=", 1)[0], str(e))
    m, d, t = cfg.model, cfg.data, cfg.train
    filled = [f"mesh.{a}" for a in ("data", "fsdp", "tensor") if getattr(cfg.mesh, a) == -1]
    if len(filled) > 1:
        blamed = max(filled, key=lambda k: str(origin.get(k, "")).startswith("override"))
        fail(blamed, f"mesh: at most one axis may be -1, got data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} "
                     f"tensor={cfg.mesh.tensor}")
    if d.source not in DATA_SOURCES:
        fail("data.source", f"data.source={d.source!r} is not known; use one of {', '.join(DATA_SOURCES)}")
    if d.packing not in PACKINGS:
        fail("data.packing", f"data.packing={d.packing!r} is not known; use one of {', '.join(PACKINGS)}")
    if d.seq_len > m.max_seq_len:
        # No silent extrapolation: gpt2 has max_seq_len learned positions; for RoPE models (llama) raising
        # model.max_seq_len changes no parameter, only the context length the export records.
        fail("data.seq_len", f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
                             "lower data.seq_len or raise model.max_seq_len (RoPE models: no new parameters; "
                             "gpt2: more learned positions)")
    if t.global_batch_size % t.grad_accum_steps:
        fail("train.grad_accum_steps", f"train.grad_accum_steps={t.grad_accum_steps} does not divide "
                                       f"train.global_batch_size={t.global_batch_size}; use a divisor of it")
    if cfg.schedule.kind != "constant" and cfg.schedule.min_lr > cfg.optimizer.lr:
        fail("schedule.min_lr", f"schedule.min_lr={cfg.schedule.min_lr:g} is above optimizer.lr="
                                f"{cfg.optimizer.lr:g}, so the {cfg.schedule.kind} decay would rise; lower it")
    for key, what in (("tasks", "an lm-eval task or tag name"), ("domains", "a prepared domain name")):
        for i, entry in enumerate(getattr(cfg.eval, key)):
            if not isinstance(entry, str) or not entry.strip():
                fail(f"eval.{key}", f"eval.{key}[{i}]: expected {what} (a string), got {_short(entry)}; "
                                    f"write eval.{key} as a list of names")


# The per-host batch as a data source hands it over: int32 inputs and targets and a float32 loss mask per token.
BATCH_BYTES_PER_TOKEN = 12
GIB = 1 << 30


def this_host_memory_bytes() -> int:
    """This host's physical memory in bytes, or the cgroup v2 limit of its container / job when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def mesh_memory_bytes(devices: Iterable, host_memory_bytes: int) -> int | None:
    """The memory of a mesh's `devices` (jax Devices) together: CPU devices share their host's
    `host_memory_bytes` (counted once per process); accelerators report memory_stats()['bytes_limit'], taken
    from the first that answers, times the device count. None when none answers."""
    devices = list(devices)
    if devices and all(d.platform == "cpu" for d in devices):
        return host_memory_bytes * len({d.process_index for d in devices})
    for device in devices:
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except (RuntimeError, ValueError, NotImplementedError):  # another process's device, or no stats
            continue
        if limit:
            return int(limit) * len(devices)
    return None


def min_param_count(model: ModelConfig) -> tuple[int, int]:
    """(embedding, blocks): a lower bound on the model's parameters from its sizes alone, no jax: the token
    embedding (and the LM head when untied) and per layer the q, k, v, o projections and two MLP matrices;
    biases, norms and a third MLP matrix are left out. mixlm.models.param_counts is the exact count."""
    m = model
    embedding = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    per_layer = m.d_model * m.dim_per_head * 2 * (m.num_heads + m.kv_heads) + 2 * m.d_model * m.mlp_dim
    return embedding, m.num_layers * per_layer


def validate_for_mesh(cfg: ExperimentConfig, data_parallel: int, process_count: int = 1, *,
                      host_memory_bytes: int | None = None, devices: Iterable = ()) -> None:
    """`validate(cfg)` plus the batch rules that need the mesh, as plain ints (no jax here): the global batch
    must split evenly over the `data_parallel` devices that share the batch rows (the mesh axes of the
    'batch' rule, data x fsdp by default) and over `process_count` hosts, and each host's rows over
    train.grad_accum_steps micro-batches. Then sizes no host or device can hold: each host's batch of tokens
    against `host_memory_bytes` (default this_host_memory_bytes(); 0 skips it: mixlm plan sizes runs for other
    machines), and with `devices` (the mesh's jax Devices) the training state of min_param_count against
    their memory together (mesh_memory_bytes). mixlm.train.train calls it right after making the mesh, before
    anything is built, allocated or compiled. Raises a one-line ConfigError."""
    validate(cfg)
    gbs, k = cfg.train.global_batch_size, cfg.train.grad_accum_steps
    if gbs % data_parallel:
        nearest = -(-gbs // data_parallel) * data_parallel
        raise ConfigError(
            f"train.global_batch_size={gbs} is not divisible by the data-parallel size {data_parallel} (the mesh "
            f"axes the batch rows are split over, data x fsdp by default); use a multiple of it, e.g. {nearest}"
        )
    if gbs % process_count:
        raise ConfigError(f"train.global_batch_size={gbs} is not divisible by the {process_count} processes; "
                          f"use a multiple of {math.lcm(process_count, data_parallel)} (resuming a run, which keeps its "
                          "global batch: run on a process count that divides it)")
    host_batch = gbs // process_count
    if host_batch % k:
        raise ConfigError(f"train.grad_accum_steps={k} does not divide the per-host batch {host_batch} "
                          f"(train.global_batch_size={gbs} over {process_count} processes); "
                          f"use a global batch that is a multiple of {process_count * k} (or, resuming on more processes, "
                          "a smaller train.grad_accum_steps: it may change on resume)")
    if host_memory_bytes == 0:
        return
    host_memory = host_memory_bytes or this_host_memory_bytes()
    tokens = host_batch * cfg.data.seq_len
    if tokens * BATCH_BYTES_PER_TOKEN > host_memory:
        raise ConfigError(
            f"train.global_batch_size={gbs} x data.seq_len={cfg.data.seq_len} is {tokens:,} tokens per step on each "
            f"of the {process_count} host(s): {tokens * BATCH_BYTES_PER_TOKEN / GIB:,.1f} GiB for its int32 inputs "
            f"and targets and float32 loss mask alone, more than the host's {host_memory / GIB:,.1f} GiB of memory; "
            "lower train.global_batch_size (train.grad_accum_steps does not shrink what a host loads per step)")
    devices = list(devices)
    memory = mesh_memory_bytes(devices, host_memory)
    embedding, blocks = min_param_count(cfg.model)
    per_param = 12 + (2 if cfg.optimizer.moments_dtype == "bfloat16" else 4)  # fp32 params, grads, nu; mu
    if memory is not None and (embedding + blocks) * per_param > memory:
        m = cfg.model
        raise ConfigError(
            f"the model has at least {embedding + blocks:,} parameters ({embedding:,} in the embedding: "
            f"model.vocab_size={m.vocab_size} x model.d_model={m.d_model}{'' if m.tie_embeddings else ' x 2 (untied)'}; "
            f"{blocks:,} in model.num_layers={m.num_layers} blocks) and training holds {per_param} bytes of each "
            f"(fp32 params and gradients, AdamW moments): {(embedding + blocks) * per_param / GIB:,.1f} GiB, more "
            f"than the {memory / GIB:,.1f} GiB of the {len(devices)} devices together; make the model smaller "
            "or use more devices")


# Names other codebases use for our keys (HF, nanoGPT, MaxText, Levanter): suggested before spelling matches.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",), "peak_lr": ("lr",), "max_lr": ("lr",), "base_lr": ("lr",),
    "wd": ("weight_decay",), "beta1": ("b1",), "beta2": ("b2",), "adam_beta1": ("b1",), "adam_beta2": ("b2",),
    "epsilon": ("eps",), "adam_eps": ("eps",), "adam_epsilon": ("eps",),
    "grad_clip": ("clip_norm",), "max_grad_norm": ("clip_norm",), "gradient_clipping": ("clip_norm",),
    "batch_size": ("global_batch_size",), "train_batch_size": ("global_batch_size",),
    "per_device_batch_size": ("global_batch_size",),
    "gradient_accumulation_steps": ("grad_accum_steps",), "accumulation_steps": ("grad_accum_steps",),
    "num_steps": ("steps",), "max_steps": ("steps",), "train_steps": ("steps",), "total_steps": ("steps",),
    "max_iters": ("steps",), "iterations": ("steps",),
    "warmup": ("warmup_steps", "warmup_fraction"), "num_warmup_steps": ("warmup_steps",),
    "warmup_ratio": ("warmup_fraction",), "lr_schedule": ("kind",), "scheduler": ("kind",),
    "min_learning_rate": ("min_lr",), "final_lr": ("min_lr",), "end_lr": ("min_lr",),
    "layers": ("num_layers",), "n_layer": ("num_layers",), "n_layers": ("num_layers",),
    "num_hidden_layers": ("num_layers",), "depth": ("num_layers",),
    "hidden_size": ("d_model",), "hidden_dim": ("d_model",), "n_embd": ("d_model",), "emb_dim": ("d_model",),
    "dim": ("d_model",), "width": ("d_model",), "embed_dim": ("d_model",),
    "n_head": ("num_heads",), "n_heads": ("num_heads",), "heads": ("num_heads",),
    "num_attention_heads": ("num_heads",), "num_key_value_heads": ("num_kv_heads",), "n_kv_heads": ("num_kv_heads",),
    "intermediate_size": ("mlp_dim",), "ffn_dim": ("mlp_dim",), "d_ff": ("mlp_dim",), "n_inner": ("mlp_dim",),
    "vocab": ("vocab_size",), "n_vocab": ("vocab_size",),
    "context_length": ("max_seq_len", "seq_len"), "max_position_embeddings": ("max_seq_len",),
    "n_positions": ("max_seq_len",), "block_size": ("seq_len", "max_seq_len"), "sequence_length": ("seq_len",),
    "max_length": ("seq_len", "max_seq_len"), "seq_length": ("seq_len",),
    "tie_word_embeddings": ("tie_embeddings",), "rope_theta": ("rope_base",), "rms_norm_eps": ("norm_eps",),
    "layer_norm_epsilon": ("norm_eps",), "dtype": ("compute_dtype",), "precision": ("compute_dtype",),
    "random_seed": ("seed",), "out_dir": ("output_dir",), "output_path": ("output_dir",),
    "save_every": ("every",), "eval_every": ("every",), "log_every": ("every",), "eval_interval": ("every",),
    "data_dir": ("prepared_dir",), "dataset_dir": ("prepared_dir",), "weights": ("mixture",),
    "mixture_weights": ("mixture",), "domain_weights": ("mixture",),
}


def _closest(name: str, options) -> str:
    """' Closest valid keys: a, b.' for a misspelled or foreign key: known synonyms first (SYNONYMS), then
    keys containing the name or contained in it, then spelling (difflib); ' Valid keys: ...' when none."""
    options = list(options)
    lowered = name.lower().replace("-", "_")
    close = [k for k in SYNONYMS.get(lowered, ()) if k in options]
    close += [k for k in options if len(lowered) >= 3 and (lowered in k or (len(k) >= 3 and k in lowered))]
    close += difflib.get_close_matches(lowered, options, n=3, cutoff=0.4)
    close = list(dict.fromkeys(close))[:3]
    return f" Closest valid keys: {', '.join(close)}." if close else f" Valid keys: {', '.join(options)}."


# A config holds a few hundred values, but YAML aliases (`*name`) repeat what their anchor holds, so a 1 KB file
# of nested aliases can stand for billions of values (an alias bomb). Past this many values, counted with every
# alias expanded, a document is refused while it is parsed, before anything copies or writes it.
YAML_VALUE_LIMIT = 100_000
CONFIG_FILE_BYTES_LIMIT = 10 << 20  # a config file is a few KB; this stops a read of /dev/zero or a stray dump


class _YamlRefused(yaml.YAMLError):
    """A document refused by _CountingLoader; the message says why."""


class _CountingLoader(yaml.SafeLoader):
    """yaml.SafeLoader that gives every node its size with aliases expanded (`expanded`, merge keys included)
    as it is composed, and refuses a document past YAML_VALUE_LIMIT or an alias inside its own anchor."""

    def compose_node(self, parent, index):
        alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        node = super().compose_node(parent, index)
        if alias is not None:  # the anchored node, counted when it was composed, unless the alias sits inside it
            if not hasattr(node, "expanded"):
                raise _YamlRefused(f"the alias *{alias.anchor} at line {alias.start_mark.line + 1} sits inside the "
                                   "value it refers to (a recursive value); write the value out instead")
            return node
        if isinstance(node, yaml.SequenceNode):
            node.expanded = 1 + sum(child.expanded for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            node.expanded = 1 + sum(k.expanded + v.expanded for k, v in node.value)
        else:
            node.expanded = 1
        if node.expanded > YAML_VALUE_LIMIT:
            raise _YamlRefused(f"more than {YAML_VALUE_LIMIT:,} values once its aliases (*name) are expanded (the "
                               f"value at line {node.start_mark.line + 1} alone holds {node.expanded:,}); a config "
                               "needs a few hundred: write the values out or use fewer aliases")
        return node


def load_yaml(text: str, where: str) -> Any:
    """One YAML document -> plain Python values (yaml.SafeLoader's), with a bound on its size: `where` (a file
    or an override) starts the one-line ConfigError for invalid YAML, an alias bomb (more than
    YAML_VALUE_LIMIT values once aliases are expanded), a recursive alias, or nesting too deep to parse."""
    try:
        return yaml.load(text, Loader=_CountingLoader)
    except _YamlRefused as e:
        raise ConfigError(f"{where}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: refused: values nested too deeply to parse; a config nests a few levels") from None


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_BYTES_LIMIT + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the path of a YAML file") from None
    except OSError as e:  # a symlink loop, no permission: one line, not a traceback
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e}); give the path of a YAML file") from None
    if len(data) > CONFIG_FILE_BYTES_LIMIT:
        raise ConfigError(f"{path}: larger than {CONFIG_FILE_BYTES_LIMIT >> 20} MB, which no config is; "
                          "give the path of a YAML config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); give the path of a YAML config") from None
    return load_yaml(text, str(path)) or {}


def _resolve(path: Path, named_by: str = "") -> Path:
    """`path` made absolute with symlinks followed; a symlink loop is a one-line ConfigError naming the file
    that named the path (`named_by`, e.g. "`base:` in exp.yaml")."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: Python 3.11's "Symlink loop from ..."
        via = f" ({named_by})" if named_by else ""
        raise ConfigError(f"{path}{via}: cannot follow the path ({e}); point it at a YAML file") from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "mixture":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_tree(path: Path, stack: tuple = ()) -> tuple[dict, dict]:
    """Returns (raw nested dict, origin: 'section.key' -> file that set it)."""
    path = _resolve(path)
    if path in stack:
        raise ConfigError(f"{path}: circular `base:` include via {' -> '.join(map(str, stack))}")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    merged: dict = {}
    origin: dict = {}
    bases = raw.pop("base", []) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: `base:` must be a file path or a list of them, got {_short(bases)}")
    for b in bases:
        sub, sub_origin = _load_tree(_resolve(path.parent / b, f"`base:` in {path}"), stack + (path,))
        merged = _deep_merge(merged, sub)
        origin.update(sub_origin)
    for section, value in raw.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{path}: unknown section {section!r}.{_closest(section, _SECTION_TYPES)}")
        section_file = path
        if isinstance(value, str):  # the section lives in its own file
            section_file = _resolve(path.parent / value, f"section {section!r} in {path}")
            value = _read_yaml(section_file)
            if not isinstance(value, dict):
                raise ConfigError(f"{section_file}: expected a mapping for section {section!r}")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping or a file path")
        if section == "data" and isinstance(value.get("mixture"), str):
            mix_path = path.parent / value["mixture"]
            value = dict(value, mixture=_read_yaml(mix_path))
            origin["data.mixture"] = str(mix_path)
        merged[section] = _deep_merge(merged.get(section, {}), value)
        for key in value:
            if key != "mixture" or "data.mixture" not in origin or section != "data":
                origin[f"{section}.{key}"] = str(section_file)
    return merged, origin


def _short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error line stays one short line whatever the value holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks `value` against the dataclass field type `tp` (ints widen to floats)."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}.get(tp, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {_short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")


def _build_section(section: str, values: dict, origin: dict) -> Any:
    cls = _SECTION_TYPES[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{origin.get(f'{section}.{key}', '<defaults>')}: {section}.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} in section {section!r}.{_closest(key, fields)}")
        kwargs[key] = _coerce(value, fields[key].type, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        files = sorted({v for k, v in origin.items() if k.startswith(section + ".")})
        raise ConfigError(f"{', '.join(files) or '<defaults>'}: {e}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """'optimizer.lr=1e-3' -> ('optimizer', 'lr', 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {_short(text, 200)}: expected section.key=value, e.g. optimizer.lr=1e-3")
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {_short(text, 200)}: expected exactly section.key on the left, e.g. train.steps=100")
    section, key = parts
    if section not in _SECTION_TYPES:
        raise ConfigError(f"override {_short(text, 200)}: unknown section {section!r}.{_closest(section, _SECTION_TYPES)}")
    value = load_yaml(raw_value, f"override {_short(text, 200)}: value") if raw_value.strip() else ""
    if isinstance(value, str) and _looks_float(value):  # YAML 1.1 reads "1e-3" as a string
        value = float(value)
    return section, key, value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _fix_yaml_floats(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "mixture":
            out[k] = _fix_yaml_floats(v)
        elif isinstance(v, str) and _looks_float(v) and not v.strip().isdigit():
            out[k] = float(v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Loads an experiment YAML (or defaults when `path` is None) and applies `section.key=value` overrides."""
    tree, origin = _load_tree(Path(path)) if path else ({}, {})
    tree = {s: _fix_yaml_floats(v) if isinstance(v, dict) else v for s, v in tree.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        tree.setdefault(section, {})
        if key == "mixture" and section == "data" and isinstance(value, str):
            mix_path = Path(value)
            value = _read_yaml(mix_path)
        tree[section] = dict(tree[section], **{key: value})
        origin[f"{section}.{key}"] = f"override {_short(text, 200)}"
    from mixlm.data.random_mixtures import resolve_random_mixture  # imports mixlm.config itself

    tree["data"] = resolve_random_mixture(tree.get("data", {}), origin)  # a `random:` spec -> one mixture
    sections = {name: _build_section(name, tree.get(name, {}), origin) for name in _SECTION_TYPES}
    cfg = ExperimentConfig(**sections)
    validate(cfg, origin)
    return cfg


def config_from_dict(tree: dict) -> ExperimentConfig:
    """Rebuilds a config from `ExperimentConfig.to_dict()` output (e.g. a saved config.yaml)."""
    origin: dict = {}
    for s in tree:
        if s not in _SECTION_TYPES:
            raise ConfigError(f"<dict>: unknown section {s!r}.{_closest(s, _SECTION_TYPES)}")
    return ExperimentConfig(**{n: _build_section(n, tree.get(n, {}), origin) for n in _SECTION_TYPES})


def _is_experiment(raw: dict) -> bool:
    return "base" in raw or any(key in _SECTION_TYPES for key in raw)


def is_experiment_file(path: str | Path) -> bool:
    """True for an experiment YAML (a `base:` or a section key), False for a model YAML (model fields only)."""
    raw = _read_yaml(Path(path))
    return isinstance(raw, dict) and _is_experiment(raw)


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """A model YAML on its own (configs/models/*.yaml: the fields of the `model` section) with `model.key=value`
    overrides, or the model of an experiment YAML (then any override applies, as in load_config)."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of model fields")
    if _is_experiment(raw):
        return load_config(path, overrides).model
    origin = {f"model.{k}": str(path) for k in raw}
    raw = _fix_yaml_floats(raw)
    for text in overrides:
        section, key, value = parse_override(text)
        if section != "model":
            raise ConfigError(f"override {_short(text, 200)}: {path} is a model YAML, which takes model.* overrides only")
        raw[key] = value
        origin[f"model.{key}"] = f"override {_short(text, 200)}"
    return _build_section("model", raw, origin)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Writes the resolved config (every field, mixture inlined) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_diff(a: ExperimentConfig, b: ExperimentConfig, ignore: tuple = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for the resume-mismatch refusal)."""
    da, db = a.to_dict(), b.to_dict()
    diffs = []
    for s in _SECTION_TYPES:
        for k in sorted(set(da[s]) | set(db[s])):
            key = f"{s}.{k}"
            if key not in ignore and da[s].get(k) != db[s].get(k):
                diffs.append(key)
    return diffs
