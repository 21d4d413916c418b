"""The experiment config's schema: one frozen dataclass per section (model, mesh, optimizer, schedule, data,
train, checkpoint, eval, logging, mixing) with every key's default, and the helpers that name keys in error lines.

The YAML that fills it is read by mixlm.config.load; the ranges it must respect are mixlm.config.validate's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from mixlm.errors import ConfigError
from mixlm.model_families import family_names


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
    "mixing.every": Bound(0, why="0 takes the strategy's default"),
    "mixing.warmup_steps": Bound(0),
}
DATA_SOURCES = ("synthetic", "prepared")
PACKINGS = ("concat", "first_fit")


def check_bounds(section: str, values: Any) -> None:
    for key, bound in FIELD_BOUNDS.items():
        sec, name = key.split(".")
        if sec == section and not bound.allows(getattr(values, name)):
            raise ConfigError(f"{key}={getattr(values, name)!r} is out of range: must be {bound.describe()}")
    for f in dataclasses.fields(values):  # every other integer: what numpy and jax can hold
        v = getattr(values, f.name)
        if isinstance(v, int) and not isinstance(v, bool) and not -INT64_MAX - 1 <= v <= INT64_MAX:
            raise ConfigError(f"{section}.{f.name}={v!r} is out of range: must fit in int64, <= {INT64_MAX} "
                              "(numpy and jax hold integers as int64)")



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
        check_bounds("model", self)  # first: a zero head count would divide by zero below
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
                raise ConfigError(f"mesh.rules.{name}: expected a list of mesh axes (data, fsdp, tensor), got {short_repr(axes)}")


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
    mixture_index: int = 0  # k >= 1: the k-th mixture of a `random:` spec in mixture (mixlm.mixing.random_mixtures, resolved by mixlm.run_config)
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


MIXING_KINDS = ("static", "doremi", "ado", "odm", "aioli")  # mixlm.mixing.online.STRATEGIES


@dataclass(frozen=True)
class MixingConfig:
    """Online mixing (mixlm.mixing.online): the strategy that changes the mixture while training."""

    kind: str = "static"  # static (data.mixture as configured) | doremi | ado | odm | aioli
    every: int = 0  # steps between updates; 0: the strategy's default (doremi, odm 1; ado 10; aioli 2x its probes)
    warmup_steps: int = 0  # no update before this step
    apply: str = ""  # sampling | objective (per-domain loss weights); "": the strategy's own (doremi: objective)
    options: dict = field(default_factory=dict)  # the strategy's parameters, e.g. {step_size: 1.0, reference: runs/ref}

    def __post_init__(self):
        if self.kind not in MIXING_KINDS:
            raise ConfigError(f"mixing.kind={self.kind!r} is not known; use one of {', '.join(MIXING_KINDS)}")
        if self.apply not in ("", "sampling", "objective"):
            raise ConfigError(f"mixing.apply={self.apply!r}: expected sampling or objective (or leave it empty)")


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
    mixing: MixingConfig = field(default_factory=MixingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> ExperimentConfig:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
SECTION_TYPES = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
    "mixing": MixingConfig,
}



def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error line stays one short line whatever the value holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


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


def closest_keys(name: str, options) -> str:
    """' Closest valid keys: a, b.' for a misspelled or foreign key: known synonyms first (SYNONYMS), then
    keys containing the name or contained in it, then spelling (difflib); ' Valid keys: ...' when none."""
    options = list(options)
    lowered = name.lower().replace("-", "_")
    close = [k for k in SYNONYMS.get(lowered, ()) if k in options]
    close += [k for k in options if len(lowered) >= 3 and (lowered in k or (len(k) >= 3 and k in lowered))]
    close += difflib.get_close_matches(lowered, options, n=3, cutoff=0.4)
    close = list(dict.fromkeys(close))[:3]
    return f" Closest valid keys: {', '.join(close)}." if close else f" Valid keys: {', '.join(options)}."
