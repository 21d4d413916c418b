"""`mixlm plan CONFIG --compile-for TARGET`: the config's real train step (mixlm.train.build_setup: its attention,
remat, scan, grad accumulation, mesh rules, compute dtype) compiled by the TPU or GPU compiler for a slice or
host that is not here (mixlm.compiled.targets), beside the analytic plan (mixlm.plan) of the same mesh.

    report = compile_plan(cfg, "v5p-32")
    print(report.to_text())

The compiled column is the target compiler's own per-device memory (`memory_analysis()`: arguments, outputs,
aliased, temp). It fits when the compiler accepted it (the TPU compiler refuses a program over its HBM) and
its peak is within the usable memory. A config that does not fit gets the analytic planner's fixes compiled in
turn until one fits: that one is proven. The TPU compiler's step-time estimate (mixlm.compiled.estimate, blind
spots corrected) gives tokens/s, days and MFU; the GPU compiler has no cost model, so GPU targets report those
at an assumed MFU, as the analytic plan does.

`model.attention: auto` is resolved for the target, not for this CPU: splash on TPU; on GPU the Pallas (Triton)
flash kernel stands in for cuDNN's, which cannot be traced without a GPU (both keep O(L) statistics per row,
never the L x L probabilities, so the memory holds; fp32 compute uses xla, as auto does).
"""

from __future__ import annotations

import dataclasses
import warnings

from mixlm.compiled.step import CompiledStep, compile_train_step, estimate_train_step, with_overrides
from mixlm.compiled.targets import CompileTarget, compile_only_devices, resolve_target
from mixlm.config import ExperimentConfig
from mixlm.plan import Plan, adam_moment_itemsize, device_kind, fitting_changes, make_plan, model_remat

MAX_FIX_COMPILES = 4  # suggestions compiled before giving up (each compile of a 1B model takes minutes here)


def for_target(cfg: ExperimentConfig, target: CompileTarget) -> tuple[ExperimentConfig, str]:
    """`cfg` with model.attention 'auto' resolved for the target's platform, and a note saying so ('' if kept)."""
    if cfg.model.attention != "auto":
        return cfg, ""
    if target.platform == "tpu":
        impl, why = "splash", "auto -> splash on TPU"
    elif cfg.model.compute_dtype == "float32":
        impl, why = "xla", "auto -> xla on GPU for float32 compute"
    else:
        impl, why = "pallas_gpu", ("auto -> cudnn on a GPU; compiled here with the Pallas (Triton) flash kernel, "
                                   "since cuDNN cannot be traced without a GPU: both keep per-row statistics, "
                                   "not L x L probabilities, so the memory holds")
    return cfg.replace(model=dataclasses.replace(cfg.model, attention=impl)), why


@dataclasses.dataclass
class CompilePlan:
    """The analytic plan and the compiled steps (as configured, then each fix tried) for one target."""

    target: CompileTarget
    plan: Plan  # the analytic plan on the same mesh
    cfg: ExperimentConfig  # as compiled (attention resolved)
    steps: list[CompiledStep]  # [as configured, fix 1, fix 2, ...]
    notes: list[str]
    analytic_totals: dict = dataclasses.field(default_factory=dict)  # step.overrides -> the analytic total

    @property
    def configured(self) -> CompiledStep:
        return self.steps[0]

    @property
    def usable_bytes(self) -> int:
        return self.plan.device.memory_bytes if self.target.platform == "tpu" else self.plan.device.usable_bytes

    @property
    def fits(self) -> bool:
        return self.configured.fits(self.usable_bytes)

    @property
    def proven(self) -> CompiledStep | None:
        """The first compiled fix that fits (None when the config fits as it is, or nothing tried fits)."""
        return next((s for s in self.steps[1:] if s.fits(self.usable_bytes)), None)

    def timing(self, step: CompiledStep) -> dict:
        """tokens/s, days and MFU of `step`: the compiler's corrected estimate, or (GPU) the plan's assumed MFU."""
        p = self.plan
        flops_per_token = p.flops_per_token
        peak = p.device.peak_flops * self.target.chips
        if step.estimate is not None:
            tokens_per_s = step.tokens_per_s()
            source = "the TPU compiler's estimate (performance model, not a measurement)"
        else:
            tokens_per_s = p.mfu * peak / flops_per_token
            why = step.no_estimate or "the GPU compiler has no cost model"
            source = f"assumed {p.mfu:.0%} MFU ({why})"
        days = p.train_tokens / tokens_per_s / 86400 if tokens_per_s else float("inf")
        return {"tokens_per_s": tokens_per_s, "days": days, "mfu": tokens_per_s * flops_per_token / peak,
                "source": source}

    def to_dict(self) -> dict:
        out = {"target": dataclasses.asdict(self.target), "plan": self.plan.to_dict(), "fits": self.fits,
               "usable_bytes": self.usable_bytes, "notes": self.notes, "steps": []}
        for step in self.steps:
            row = dataclasses.asdict(step)
            row.update(peak=step.peak, fits=step.fits(self.usable_bytes),
                       analytic_total=self.analytic_totals.get(step.overrides),
                       estimate_corrected_seconds=step.estimate.corrected_seconds if step.estimate else None,
                       estimate_corrected_flops=step.estimate.corrected_flops if step.estimate else None,
                       **({} if step.memory is None else {"timing": self.timing(step)}))
            out["steps"].append(row)
        out["proven"] = list(self.proven.overrides) if self.proven else None
        return out

    def to_text(self) -> str:
        from mixlm.compiled.report import render

        return render(self)


def compile_plan(cfg: ExperimentConfig, target_name: str, *, mfu: float = 0.4, name: str = "",
                 try_fixes: bool = True) -> CompilePlan:
    """Compiles `cfg`'s train step for `target_name` (mixlm.compiled.targets), beside the analytic plan on the
    same mesh; when it does not fit, compiles the analytic planner's fixes until one fits."""
    target = resolve_target(target_name)
    device_kind(target.device_kind)
    devices = compile_only_devices(target)
    cfg, attention_note = for_target(cfg, target)
    plan = make_plan(cfg, devices=devices, device_kind_name=target.device_kind, mfu=mfu, compile=False, name=name)
    report = CompilePlan(target, plan, cfg, [compile_train_step(cfg, devices)],
                         [attention_note] if attention_note else [], {(): plan.analytic.total})
    if report.fits or not try_fixes:
        return report
    for overrides in candidate_fixes(cfg, plan, devices)[:MAX_FIX_COMPILES]:
        report.analytic_totals[tuple(overrides)] = make_plan(
            with_overrides(cfg, overrides), devices=devices, device_kind_name=target.device_kind, compile=False
        ).analytic.total
        step = compile_train_step(cfg, devices, overrides, estimate=False)  # the estimate's compiles: proven only
        if step.fits(report.usable_bytes):
            step = estimate_train_step(cfg, devices, step)
        report.steps.append(step)
        if step.fits(report.usable_bytes):
            break
    return report


def candidate_fixes(cfg: ExperimentConfig, plan: Plan, devices) -> list[list[str]]:
    """The analytic planner's fitting changes (least intrusive first), then each with twice the micro-batches
    (where the batch allows), for when the compiler needs more than the analytic model says."""
    from mixlm.sharding import ShardingFallbackWarning, make_mesh
    from mixlm.train import build_setup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardingFallbackWarning)  # build_setup's cache: make_plan built it
        setup = build_setup(cfg.replace(mesh=dataclasses.replace(cfg.mesh, strict=False)),
                            make_mesh(cfg.mesh, devices))
    changes = [c for c, _ in fitting_changes(cfg, setup.layout, setup.abstract_state.params, setup.logical_axes,
                                             adam_moment_itemsize(setup.abstract_state.opt_state), plan.device)]
    shards = setup.layout.axis_size("batch")
    doubled = []
    for change in changes:
        settings = dict(c.split("=", 1) for c in change)
        k = 2 * int(settings.get("train.grad_accum_steps", cfg.train.grad_accum_steps))
        rows = cfg.train.global_batch_size
        if rows % k == 0 and (rows // k) % shards == 0:
            remat = settings.get("model.remat", model_remat(cfg))
            doubled.append(([f"model.remat={remat}"] if remat != model_remat(cfg) else [])
                           + [f"train.grad_accum_steps={k}"])
    seen, out = set(), []
    for change in changes + doubled:
        if tuple(change) not in seen:
            seen.add(tuple(change))
            out.append(change)
    return out


__all__ = ["CompilePlan", "candidate_fixes", "compile_plan", "for_target"]
