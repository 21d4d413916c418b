"""One train step (a run's, or a swarm's) compiled for compile-only devices (mixlm.compiled.targets): the target
compiler's per-device memory and, where it has a cost model (TPU), its step time with the blind spots
corrected (mixlm.compiled.estimate says how).

    step = compile_train_step(cfg, devices)              # cfg's model.attention already resolved for the target
    step.memory.peak, step.estimate.corrected_seconds
    swarm = compile_swarm_step(cfg, 16, devices)         # 16 proxies in one step (a swarm: mixlm.setup)

Nothing is allocated: the state and batch are ShapeDtypeStructs carrying their shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mixlm.compiled.estimate import (
    ESTIMATE_OPTIONS,
    CompilerEstimate,
    cost_numbers,
    counts_match,
    jaxpr_flops,
)
from mixlm.config import ConfigError, ExperimentConfig, parse_override
from mixlm.models import forward
from mixlm.plan import CompiledMemory, abstract_batch, memory_of

PALLAS_ATTENTION = ("splash", "pallas_gpu")


def with_overrides(cfg: ExperimentConfig, overrides) -> ExperimentConfig:
    """`cfg` with `section.key=value` overrides applied (the same parsing as the command line)."""
    for text in overrides:
        section, key, value = parse_override(text)
        part = getattr(cfg, section)
        if key not in {f.name for f in dataclasses.fields(part)}:
            raise ConfigError(f"override {text!r}: {section} has no key {key!r}")
        cfg = cfg.replace(**{section: dataclasses.replace(part, **{key: value})})
    return cfg


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One compile of a train step for the target: its memory, time to compile and the compiler's estimate."""

    overrides: tuple[str, ...]  # changes from the planned config (() = as configured)
    memory: CompiledMemory | None  # None when the compiler refused the program
    compile_seconds: float  # the memory compile (the estimate's compiles not included)
    estimate: CompilerEstimate | None  # None on GPU (no cost model) or when refused
    tokens_per_step: int  # all devices, all micro-batches (all members for a swarm)
    refusal: str = ""  # the compiler's reason, one line
    compiler_cost: dict | None = None  # the compiler's flops and optimal_seconds of the step as compiled
    no_estimate: str = ""  # why a compiler with a cost model gave no usable estimate

    @property
    def peak(self) -> int | None:
        return self.memory.peak if self.memory else None

    def fits(self, usable_bytes: int) -> bool:
        return self.memory is not None and self.memory.peak <= usable_bytes

    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step / self.estimate.corrected_seconds if self.estimate else None


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A train step ready to compile: the jitted step a run uses, a way to jit it afresh (traced again, e.g.
    under forward.loss_chunk_budget), its abstract arguments, and what the estimate needs to know of it."""

    jitted: Callable
    fresh: Callable[[], Callable]  # a new jax.jit of the step (no trace cache) taking fresh_args
    args: tuple
    fresh_args: tuple
    state: object  # the abstract state among args
    batch: dict  # the abstract batch among args
    micro_batches: int
    chunk_len: int  # loss chunk, positions
    loss_rows: int  # rows of one micro-batch per device, the vocabulary's columns per device: the chunk budget
    loss_vocab: int


def _fresh_jit(step_fn: Callable) -> Callable:
    """jax.jit of a new function object around `step_fn`: jit caches traces per function, so this one is
    traced again (under whatever forward.loss_chunk_budget is in force)."""
    return jax.jit(lambda *args: step_fn(*args), donate_argnums=(0,))


def _loss_shape(cfg: ExperimentConfig, layout, rows: int) -> tuple[int, int, int]:
    """(chunk_len, rows per device, vocab columns per device) of the chunked loss of a `rows`-row micro-batch."""
    v_pad = cfg.model.padded_vocab_size(layout.axis_size("vocab"))
    chunk = forward.loss_chunk_len_for(rows, cfg.data.seq_len, v_pad, layout)
    local_rows = rows // layout.axis_size("batch") if rows % layout.axis_size("batch") == 0 else rows
    local_vocab = v_pad // layout.axis_size("vocab") if v_pad % layout.axis_size("vocab") == 0 else v_pad
    return chunk, local_rows, local_vocab


def train_program(cfg: ExperimentConfig, devices) -> StepProgram:
    from mixlm.sharding import ShardingFallbackWarning, make_mesh
    from mixlm.train import build_setup

    cfg = cfg.replace(mesh=dataclasses.replace(cfg.mesh, strict=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardingFallbackWarning)  # the analytic plan lists them
        setup = build_setup(cfg, make_mesh(cfg.mesh, devices))
    batch = abstract_batch(cfg, setup.layout)
    k = cfg.train.grad_accum_steps

    args = (setup.abstract_state, batch)
    return StepProgram(setup.train_step, lambda: _fresh_jit(setup.train_step.__wrapped__), args, args,
                       setup.abstract_state, batch, k, *_loss_shape(cfg, setup.layout, cfg.train.global_batch_size // k))


def swarm_program(cfg: ExperimentConfig, members: int, devices) -> StepProgram:
    """The swarm step as a sweep trains it (mixlm.setup.build_setup with `members`, over members_mesh: members
    over the `data` axis, vmap of the member step, the failed-member mask included)."""
    from mixlm.members import member_mesh
    from mixlm.setup import build_setup

    setup = build_setup(cfg, member_mesh(members, cfg, devices), members=members, member_map="vmap")
    member_batch = abstract_batch(cfg, setup.layout)
    batch = {k: jax.ShapeDtypeStruct((members, *v.shape), v.dtype, sharding=setup.batch_sharding(v.ndim + 1))
             for k, v in member_batch.items()}
    alive = jax.ShapeDtypeStruct((members,), jnp.bool_, sharding=setup.member_sharding)
    k = cfg.train.grad_accum_steps
    args = (setup.abstract_state, alive, batch)
    return StepProgram(setup.train_step, lambda: _fresh_jit(setup.train_step.__wrapped__), args, args,
                       setup.abstract_state, batch, k,
                       *_loss_shape(cfg, setup.layout, cfg.train.global_batch_size // k))


def _lower(program: StepProgram, fresh: bool = False):
    """The step lowered: the run's jitted step, or (fresh) a new jit of it traced now."""
    return program.fresh().lower(*program.fresh_args) if fresh else program.jitted.lower(*program.args)


def _refusal(error: Exception) -> str:
    """The compiler's out-of-memory message in one line, or '' for any other error (re-raised)."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text and "Ran out of memory" not in text:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next((ln for ln in lines if re.search(r"exceed|Ran out of memory|Used .* of .*", ln)), lines[0])
    return key[:300]


def attention_kernel_flops(cfg: ExperimentConfig, tokens: int) -> float:
    """The attention FLOPs of `tokens` (causal, forward + backward, mixlm.models.flops_per_token's attention
    term) when the attention is a Pallas kernel, whose custom calls the compiler counts as 0; else 0."""
    if cfg.model.attention not in PALLAS_ATTENTION:
        return 0.0
    m = cfg.model
    return 6.0 * cfg.data.seq_len * m.num_layers * m.num_heads * m.dim_per_head * tokens


_timed_cache: dict = {}  # the small timing programs, shared by steps that differ only in depth or scan


def _timed(build: Callable[[ExperimentConfig], StepProgram], cfg: ExperimentConfig, num_devices: int,
           budget: int | None = None, key: tuple = ()) -> tuple[dict, bool]:
    """(cost_analysis, whether its count is its jaxpr's) of a fresh compile of `cfg`'s step with
    ESTIMATE_OPTIONS, its loss chunked to `budget` bytes when given. `key` names the program's devices and
    kind (run or swarm of K) for the cache."""
    from mixlm.train import program_key

    cache_key = (key, program_key(cfg), cfg.train.global_batch_size, cfg.data.seq_len, budget)
    if cache_key in _timed_cache:
        return _timed_cache[cache_key]
    _timed_cache[cache_key] = _compile_timed(build(cfg), num_devices, budget)
    return _timed_cache[cache_key]


def _compile_timed(program: StepProgram, num_devices: int, budget: int | None) -> tuple[dict, bool]:
    budgeted = forward.loss_chunk_budget(budget) if budget else contextlib.nullcontext()
    with budgeted:
        once = jaxpr_flops(jax.make_jaxpr(program.fresh())(*program.fresh_args)).bodies_once / num_devices
        cost = cost_numbers(program.fresh().lower(*program.fresh_args).compile(compiler_options=ESTIMATE_OPTIONS))
    return cost, counts_match(cost, once)


def _estimate(build: Callable[[ExperimentConfig], StepProgram], cfg: ExperimentConfig, step: CompiledStep,
              num_devices: int, key: tuple) -> CompiledStep:
    """`step` with the compiler's step time put together from small programs it counts whole
    (mixlm.compiled.estimate): one micro-batch, unrolled, with 1 and 2 layers, and with 1 layer and loss
    chunks twice as long. Unchanged without a cost model (GPU) or a compiled step."""
    cost = step.compiler_cost
    if cost is None or step.memory is None:
        return step
    program = build(cfg)  # build_setup's cache: nothing is compiled again
    k = program.micro_batches
    one_micro_batch = cfg.replace(
        model=dataclasses.replace(cfg.model, scan_layers=False, num_layers=1),
        train=dataclasses.replace(cfg.train, grad_accum_steps=1, global_batch_size=cfg.train.global_batch_size // k))
    one, whole_one = _timed(build, one_micro_batch, num_devices, key=key)
    two, whole_two = _timed(build, one_micro_batch.replace(
        model=dataclasses.replace(one_micro_batch.model, num_layers=2)), num_devices, key=key)
    t1, t2 = float(one["optimal_seconds"]), float(two["optimal_seconds"])
    chunk_seconds, whole_chunk = 0.0, True
    length = cfg.data.seq_len
    timed = [t1, t2]
    if program.chunk_len < length and length % (2 * program.chunk_len) == 0:
        budget = program.loss_rows * 2 * program.chunk_len * program.loss_vocab * 4
        doubled, whole_chunk = _timed(build, one_micro_batch, num_devices, budget, key=key)
        timed.append(float(doubled["optimal_seconds"]))
        chunk_seconds = max(timed[-1] - t1, 0.0)
    if min(timed) <= 0:  # measured: gpt2-70m on v5e-8, -17.0 s for one layer (v5p: 1.6 ms)
        return dataclasses.replace(step, no_estimate=(
            f"the TPU compiler's cost model gave {min(timed):.3g} s for a {one_micro_batch.model.num_layers}- or "
            "2-layer step: no estimate"))
    layer_seconds = max(t2 - t1, 0.0)
    as_run = jaxpr_flops(jax.make_jaxpr(program.fresh())(*program.fresh_args)).as_run / num_devices
    return dataclasses.replace(step, estimate=CompilerEstimate(
        seconds=float(cost["optimal_seconds"]), as_compiled_flops=float(cost.get("flops", 0.0)), as_run=as_run,
        base_seconds=max(t1 - layer_seconds, 0.0), layer_seconds=layer_seconds,
        layer_flops=float(two.get("flops", 0.0)) - float(one.get("flops", 0.0)), layers=cfg.model.num_layers,
        chunk_seconds=chunk_seconds, loss_chunks=length // program.chunk_len, micro_batches=k,
        kernel_flops=attention_kernel_flops(cfg, step.tokens_per_step) / num_devices,
        counts_whole=whole_one and whole_two and whole_chunk))


class CompilerError(RuntimeError):
    """The target's compiler (or Mosaic, for a Pallas kernel) failed on the step for a reason other than memory."""


def _compile(build: Callable[[ExperimentConfig], StepProgram], cfg: ExperimentConfig, overrides,
             tokens_per_step: int) -> CompiledStep:
    program = build(cfg)
    started = time.perf_counter()
    try:
        compiled = _lower(program).compile()
    except Exception as e:  # JaxRuntimeError from XLA, MosaicError from a Pallas kernel; anything else is ours
        if not (isinstance(e, jax.errors.JaxRuntimeError) or type(e).__name__ == "MosaicError"):
            raise
        reason = _refusal(e)
        if not reason:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise CompilerError(f"{type(e).__name__}: {first[:300]}") from e
        return CompiledStep(tuple(overrides), None, time.perf_counter() - started, None, tokens_per_step, reason)
    seconds = time.perf_counter() - started
    cost = cost_numbers(compiled)
    return CompiledStep(tuple(overrides), memory_of(compiled, program.state, program.batch), seconds, None,
                        tokens_per_step, compiler_cost=None if cost is None else {
                            "flops": float(cost.get("flops", 0.0)), "optimal_seconds": float(cost["optimal_seconds"])})


def _run(cfg: ExperimentConfig, devices, overrides):
    cfg = with_overrides(cfg, overrides)
    return (cfg, lambda c: train_program(c, devices), cfg.train.global_batch_size * cfg.data.seq_len,
            ("run", devices[0].device_kind, *map(str, devices)))


def _swarm(cfg: ExperimentConfig, members: int, devices, overrides):
    cfg = with_overrides(cfg, overrides)
    return (cfg, lambda c: swarm_program(c, members, devices),
            members * cfg.train.global_batch_size * cfg.data.seq_len,
            ("swarm", members, devices[0].device_kind, *map(str, devices)))


def compile_train_step(cfg: ExperimentConfig, devices, overrides=(), *, estimate: bool = True) -> CompiledStep:
    """The train step of `cfg` (with `overrides`) on a mesh over compile-only `devices`, compiled; with the
    compiler's estimate unless `estimate=False` (it takes 2 or 3 more compiles of 1- and 2-layer programs)."""
    cfg, build, tokens, key = _run(cfg, devices, overrides)
    step = _compile(build, cfg, overrides, tokens)
    return _estimate(build, cfg, step, len(devices), key) if estimate else step


def estimate_train_step(cfg: ExperimentConfig, devices, step: CompiledStep) -> CompiledStep:
    """`step` (compile_train_step(..., estimate=False) of cfg with step.overrides) with the compiler's estimate."""
    cfg, build, _, key = _run(cfg, devices, step.overrides)
    return _estimate(build, cfg, step, len(devices), key)


def compile_swarm_step(cfg: ExperimentConfig, members: int, devices, overrides=(), *,
                       estimate: bool = True) -> CompiledStep:
    """A swarm of `members` copies of `cfg` (build_setup with members: vmap of the member step, members over the `data`
    axis of swarm_mesh) compiled on compile-only `devices`; micro-batches from the member's
    train.grad_accum_steps. Memory and estimate are per device for the whole swarm step."""
    cfg, build, tokens, key = _swarm(cfg, members, devices, overrides)
    step = _compile(build, cfg, overrides, tokens)
    return _estimate(build, cfg, step, len(devices), key) if estimate else step


def estimate_swarm_step(cfg: ExperimentConfig, members: int, devices, step: CompiledStep) -> CompiledStep:
    """`step` (compile_swarm_step(..., estimate=False)) with the compiler's estimate."""
    cfg, build, _, key = _swarm(cfg, members, devices, step.overrides)
    return _estimate(build, cfg, step, len(devices), key)


__all__ = ["PALLAS_ATTENTION", "CompiledStep", "CompilerError", "StepProgram", "attention_kernel_flops", "compile_swarm_step",
           "compile_train_step", "estimate_swarm_step", "estimate_train_step", "swarm_program", "train_program",
           "with_overrides"]
