"""The TPU compiler's step-time estimate of a compiled train step, corrected for what its cost model cannot see.

`compiled.cost_analysis()` is XLA's per-device count of the optimised program: `flops` and `optimal_seconds`
(its performance model's step time). Its blind spots, measured on v5p compiles of mixlm's train step:

    a loop body is counted once       scan_layers, grad accumulation and the chunked loss run their body n
                                      times; the count has it once (a scanned 2-layer d 256 llama: 2.88e9 flops
                                      against 4.92e9 unrolled)
    XLA's own loops, too              at d 2048 over 16 chips the SPMD partitioner turns FSDP matmuls into
                                      windowed-einsum (collective matmul) loops, counted once per loop: the
                                      count fell to 75% of the program (unrolled) and to a third of a layer
                                      (scanned: the backward layer loop vanished from it)
    Pallas kernels carry no flops     splash attention (and pallas_gpu) are custom calls

So the estimate comes from a program the count can see: when the compiler's flops differ from the step's
jaxpr counted with every loop body once (dot_general 2 x out x contracted, plus one flop per element of
elementwise arithmetic and reductions, as XLA counts) by more than ESTIMATE_MATCH, the step is compiled again
with collective matmuls off (ESTIMATE_OPTIONS; the same math, its communication not overlapped, so the time
errs long) and that count is checked the same way. Then, shown beside the compiler's numbers:

    loops        the jaxpr counted with every scan run its length (nested loops multiply) instead of once
    kernels      the attention flops of mixlm.models.flops_per_token (causal, forward + backward) for every
                 token of the step, when the attention is a Pallas kernel

and the corrected step time assumes the work the count missed runs at the rate the model gave the rest:
seconds x (loops + kernels) / (the program counted once).

    est = estimate(compiled, jaxpr, num_devices=16, kernel_flops=...)
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
    """One device's step as the TPU compiler's cost model sees it, and the corrections (flops per device)."""

    flops: float  # cost_analysis()['flops']
    seconds: float  # cost_analysis()['optimal_seconds']
    bytes_accessed: float
    counted_once: float  # the jaxpr's flops with each loop body once: what `flops` should be
    as_run: float  # the jaxpr's flops with every loop run its trip count
    kernel_flops: float  # attention inside Pallas kernels
    collective_matmuls_off: bool = False  # the estimate is of the recompile with ESTIMATE_OPTIONS

    @property
    def loop_flops(self) -> float:
        """Flops in loop iterations beyond each body's first."""
        return self.as_run - self.counted_once

    @property
    def corrected_flops(self) -> float:
        return self.as_run + self.kernel_flops

    @property
    def corrected_seconds(self) -> float:
        return self.seconds * self.corrected_flops / self.counted_once if self.counted_once else self.seconds

    def describe(self) -> str:
        """One line: the compiler's numbers and each correction."""
        off = " (recompiled with collective matmuls off)" if self.collective_matmuls_off else ""
        return (f"compiler{off}: {self.flops:.3e} flops/device (jaxpr, loop bodies once: {self.counted_once:.3e}), "
                f"{self.seconds * 1e3:,.2f} ms; + loop bodies x trip counts {self.loop_flops:.3e}; + attention in "
                f"Pallas kernels {self.kernel_flops:.3e} -> {self.corrected_flops:.3e} flops, "
                f"{self.corrected_seconds * 1e3:,.2f} ms/step")


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
    return abs(float(cost.get("flops", 0.0)) - counted_once) <= ESTIMATE_MATCH * counted_once


def estimate(compiled, lowered, jaxpr, *, num_devices: int, kernel_flops: float) -> CompilerEstimate | None:
    """The compiler's estimate of `compiled` (None without a cost model), recompiled from `lowered` with
    ESTIMATE_OPTIONS when its count misses part of the program, with the loop correction from the step's
    `jaxpr` (global shapes, split over `num_devices`) and `kernel_flops` (per device) added."""
    cost = cost_numbers(compiled)
    if cost is None:
        return None
    counted = jaxpr_flops(jaxpr)
    once, as_run = counted.bodies_once / num_devices, counted.as_run / num_devices
    off = not counts_match(cost, once)
    if off:
        cost = cost_numbers(lowered.compile(compiler_options=ESTIMATE_OPTIONS))
    return CompilerEstimate(flops=float(cost.get("flops", 0.0)), seconds=float(cost["optimal_seconds"]),
                            bytes_accessed=float(cost.get("bytes accessed", 0.0)), counted_once=once,
                            as_run=as_run, kernel_flops=kernel_flops, collective_matmuls_off=off)


__all__ = ["ESTIMATE_OPTIONS", "CompilerEstimate", "JaxprFlops", "cost_numbers", "counts_match", "estimate",
           "jaxpr_flops"]
