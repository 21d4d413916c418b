"""The TPU compiler's step-time estimate of a compiled train step, corrected for what its cost model cannot see.

`compiled.cost_analysis()` is XLA's per-device count of the optimised program: `flops` and `optimal_seconds`
(its performance model's step time). Its blind spots, measured on v5p compiles of mixlm's train step:

    a loop body is counted once       scan_layers, grad accumulation and the chunked loss run their body n
                                      times; the count has it once (a scanned 2-layer d 256 llama: 2.88e9 flops
                                      against 4.92e9 unrolled)
    XLA's own loops, too              at d 2048 over 16 chips the SPMD partitioner turns FSDP matmuls into
                                      windowed-einsum (collective matmul) loops, each counted once: the count
                                      fell to 75% of an unrolled step and lost a scanned step's backward layers
    Pallas kernels carry no flops     splash attention (and pallas_gpu) are custom calls

So the step is timed on small programs the count sees whole, compiled with collective matmuls off
(ESTIMATE_OPTIONS: the same math, its communication not overlapped, so the time errs long) and checked against
their jaxpr (`jaxpr_flops`: dot_general 2 x out x contracted plus one flop per element of elementwise
arithmetic and reductions, as XLA counts; within ESTIMATE_MATCH). mixlm.compiled.step compiles them: one
micro-batch of the config, unrolled, with 1 and with 2 layers, and with 1 layer and loss chunks twice as long.

    layer        T(2 layers) - T(1 layer); base = T(1 layer) - layer: embedding, one loss chunk, optimizer
    loss chunk   T(chunks twice as long) - T(1 layer): one chunk's time
    step         micro-batches x (base + layers x layer + (chunks - 1) x chunk) + the attention flops of
                 mixlm.models.flops_per_token in Pallas kernels at the rate of a layer's counted flops; the
                 optimizer update, which runs once, is counted once per micro-batch (small beside one)

Measured on a regmix-1m proxy (512 x 2048 tokens, v5p-8), loops timed by differencing: 199 ms/step, where
scaling the loops' flops at the rate of the rest said 513 ms.
"""

from __future__ import annotations

import dataclasses
import math

# Elementwise / reduction primitives XLA's cost analysis counts as one flop per output (reduction: input)
# element. Transcendentals (exp, log, tanh, ...) are counted apart by XLA, not in `flops`.
ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "max", "min", "neg", "abs", "select_n", "square", "sign",
                         "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "integer_pow", "add_any",
                         "clamp", "rem", "pow"})
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin", "cumsum", "reduce_and",
                        "reduce_or"})
# Calls whose bodies run once per call (their flops count as the body's).
KERNELS = frozenset({"pallas_call", "tpu_custom_call", "triton_kernel_call"})


@dataclasses.dataclass(frozen=True)
class JaxprFlops:
    """Flops of a jaxpr (global shapes): as it runs, and as a cost model that counts each loop body once sees it."""

    as_run: float
    bodies_once: float

    @property
    def hidden_by_loops(self) -> float:
        return self.as_run - self.bodies_once


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ()) or ()))


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * _size(eqn.outvars[0].aval) * math.prod(lhs[d] for d in lhs_contract)
    if name in ELEMENTWISE:
        return float(sum(_size(v.aval) for v in eqn.outvars))
    if name in REDUCTIONS:
        return float(_size(eqn.invars[0].aval))
    return 0.0


def _sub_jaxprs(eqn):
    for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def jaxpr_flops(jaxpr) -> JaxprFlops:
    """Flops of `jaxpr` (a Jaxpr or ClosedJaxpr; shapes are global, so divide by the devices for one device's
    share): scans run `length` times, `cond` its costliest branch, Pallas kernels count 0 (like XLA), a
    shard_map body once per device of its mesh. `while` loops of unknown trip count count once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    as_run = bodies_once = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in KERNELS:
            continue
        subs = [jaxpr_flops(j) for j in _sub_jaxprs(eqn)]
        if not subs:
            f = _eqn_flops(eqn)
            as_run, bodies_once = as_run + f, bodies_once + f
        elif name == "scan":
            as_run += eqn.params["length"] * sum(s.as_run for s in subs)
            bodies_once += sum(s.bodies_once for s in subs)
        elif name == "cond":
            as_run += max(s.as_run for s in subs)
            bodies_once += max(s.bodies_once for s in subs)
        elif name == "shard_map":
            copies = math.prod(eqn.params["mesh"].shape.values())
            as_run += copies * sum(s.as_run for s in subs)
            bodies_once += copies * sum(s.bodies_once for s in subs)
        else:  # pjit, custom_vjp / custom_jvp calls, checkpoint, while (counted once): bodies inline
            as_run += sum(s.as_run for s in subs)
            bodies_once += sum(s.bodies_once for s in subs)
    return JaxprFlops(as_run, bodies_once)


ESTIMATE_MATCH = 0.02  # the compiler's count must be within 2% of the jaxpr's bodies-once count
# Collective matmuls off (their size threshold above any operand), so no matmul hides in an XLA loop.
ESTIMATE_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1 << 20}


@dataclasses.dataclass(frozen=True)
class CompilerEstimate:
    """One device's train step as the TPU compiler's cost model times it (seconds, flops per device)."""

    seconds: float  # optimal_seconds of the step as compiled: its blind spots in it
    as_compiled_flops: float  # its flop count
    as_run: float  # the step's jaxpr flops, every loop at its trip count
    base_seconds: float  # embedding, one loss chunk, optimizer: T(1 layer) - layer_seconds
    layer_seconds: float
    layer_flops: float  # the compiler's count of one layer (forward + backward, remat included)
    layers: int
    chunk_seconds: float  # one loss chunk (0 when the loss is one chunk)
    loss_chunks: int  # per micro-batch
    micro_batches: int
    kernel_flops: float  # attention inside Pallas kernels, per device and step
    counts_whole: bool  # the timed programs' counts matched their jaxprs (ESTIMATE_MATCH)

    @property
    def kernel_seconds(self) -> float:
        return self.kernel_flops * self.layer_seconds / self.layer_flops if self.layer_flops > 0 else 0.0

    @property
    def corrected_flops(self) -> float:
        return self.as_run + self.kernel_flops

    @property
    def corrected_seconds(self) -> float:
        per_micro_batch = (self.base_seconds + self.layers * self.layer_seconds
                           + (self.loss_chunks - 1) * self.chunk_seconds)
        return self.micro_batches * per_micro_batch + self.kernel_seconds

    def describe(self) -> str:
        """One line: the compiler's own numbers and how the step time is put together."""
        whole = "" if self.counts_whole else " (a timed program's count missed part of its jaxpr)"
        return (f"compiler on the step as compiled: {self.seconds * 1e3:,.2f} ms, {self.as_compiled_flops:.3e} "
                f"flops/device (loop bodies once); timed whole{whole}: base {self.base_seconds * 1e3:,.2f} ms + "
                f"{self.layers} layers x {self.layer_seconds * 1e3:,.3f} ms + {self.loss_chunks - 1} loss chunks x "
                f"{self.chunk_seconds * 1e3:,.3f} ms, x {self.micro_batches} micro-batch(es), + Pallas attention "
                f"{self.kernel_flops:.3e} flops at a layer's rate {self.kernel_seconds * 1e3:,.2f} ms -> "
                f"{self.corrected_seconds * 1e3:,.2f} ms/step, {self.corrected_flops:.3e} flops/device")


def cost_numbers(compiled) -> dict | None:
    """compiled.cost_analysis() as one dict (older jax: a list of one), or None where the backend has no cost
    model (the GPU compiler returns None)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "optimal_seconds" not in cost:
        return None
    return cost


def counts_match(cost: dict, counted_once: float) -> bool:
    """Whether the compiler's flops are the jaxpr's bodies-once flops (per device) within ESTIMATE_MATCH."""
    return abs(float(cost.get("flops", 0.0)) - counted_once) <= ESTIMATE_MATCH * counted_once


__all__ = ["ESTIMATE_MATCH", "ESTIMATE_OPTIONS", "CompilerEstimate", "JaxprFlops", "cost_numbers", "counts_match",
           "jaxpr_flops"]
