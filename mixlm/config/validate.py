"""What a config must satisfy before anything runs: every numeric key in its range (`FIELD_BOUNDS`), the
cross-key rules (`validate`), and the rules that need the mesh and the machine (`validate_for_mesh`: batch
divisibility, sizes no host or device can hold). Plain ints, no jax.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from mixlm import storage
from mixlm.config.schema import (
    DATA_SOURCES,
    PACKINGS,
    SECTION_TYPES,
    ExperimentConfig,
    ModelConfig,
    check_bounds,
    short_repr,
)
from mixlm.errors import ConfigError


def validate(cfg: ExperimentConfig, origin: dict | None = None) -> None:
    """Raises a one-line ConfigError for a value no run can use: a field outside `FIELD_BOUNDS`, an unknown
    data source or packing, data.seq_len beyond model.max_seq_len, a global batch that grad_accum_steps does
    not divide. `origin` ('section.key' -> file or override) prefixes the message with where the value came
    from. Needs no jax; `validate_for_mesh` adds the rules that need the mesh."""
    origin = origin or {}

    def fail(key: str, message: str):
        where = origin.get(key)
        raise ConfigError(f"{where}: {message}" if where else message)

    for section in SECTION_TYPES:
        try:
            check_bounds(section, getattr(cfg, section))
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
    # Where the run reads and writes: a local path, gs:// or s3:// (hdfs://x, or gs:/x, which would become a local
    # folder named `gs:`, are refused here, before anything is written).
    for key, value in (("train.output_dir", t.output_dir), ("data.prepared_dir", d.prepared_dir),
                       ("checkpoint.init_from", cfg.checkpoint.init_from), ("data.tokenizer", d.tokenizer)):
        try:
            storage.check_location(value, key)
        except ConfigError as e:
            fail(key, str(e))
    for key, what in (("tasks", "an lm-eval task or tag name"), ("domains", "a prepared domain name")):
        for i, entry in enumerate(getattr(cfg.eval, key)):
            if not isinstance(entry, str) or not entry.strip():
                fail(f"eval.{key}", f"eval.{key}[{i}]: expected {what} (a string), got {short_repr(entry)}; "
                                    f"write eval.{key} as a list of names")
    if cfg.mixing.kind != "static":
        _validate_mixing(cfg, fail)


def _validate_mixing(cfg: ExperimentConfig, fail) -> None:
    """The online mixing strategy must build from mixing.* and have what it measures."""
    from mixlm.mixing.online import strategy_from_config  # numpy only; it imports nothing of mixlm.config

    try:
        strategy = strategy_from_config(cfg.mixing)
    except ConfigError as e:
        fail("mixing.options", str(e))
    if cfg.data.source != "prepared":
        fail("mixing.kind", f"mixing.kind={cfg.mixing.kind} mixes domains: it needs data.source=prepared (the "
                            "synthetic source has one domain)")
    if strategy.kind == "aioli" and cfg.eval.batches < 1:
        fail("eval.batches", "mixing.kind=aioli measures each domain's validation loss after every probe: set "
                             "eval.batches >= 1")


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
