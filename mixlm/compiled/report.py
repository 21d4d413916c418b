"""The text of `mixlm plan CONFIG --compile-for TARGET` (a mixlm.compiled.plan.CompilePlan): per-device memory,
analytic beside compiled, whether it fits, the fixes compiled, and the step time as the compiler estimates it."""

from __future__ import annotations

import re

from mixlm.plan import GIB


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:,.2f} GiB"


def _step_label(step) -> str:
    return " ".join(step.overrides) or "as configured"


def timing_lines(report, step, indent: str = "  ") -> list[str]:
    """The step time of `step` (corrections shown), tokens/s, days and MFU."""
    p, t = report.plan, report.timing(step)
    lines = []
    if step.estimate is not None:
        lines.append(f"{indent}{step.estimate.describe()}")
    per_chip = t["tokens_per_s"] / report.target.chips
    lines.append(f"{indent}-> {t['tokens_per_s']:,.0f} tokens/s ({per_chip:,.0f} per chip), MFU {t['mfu']:.0%} "
                 f"({p.flops_per_token:.4g} model FLOPs/token, {p.device.peak_flops / 1e12:,.0f} TFLOP/s per chip); "
                 f"{p.steps:,} steps x {p.tokens_per_step:,} tokens = {p.train_tokens / 1e9:,.2f}B tokens -> "
                 f"{t['days']:,.2f} days [{t['source']}]")
    return lines


def render(report) -> str:
    p, a, target, step = report.plan, report.plan.analytic, report.target, report.configured
    c = step.memory
    compiler = "TPU compiler, libtpu" if target.platform == "tpu" else "GPU compiler, CUDA plugin"
    lines = [
        (f"mixlm plan: {p.name} compiled for {target.describe()}; {p.device.memory_bytes / GIB:.0f} GiB and "
         f"{p.device.peak_flops / 1e12:,.0f} TFLOP/s dense bf16 per chip; mesh {p.mesh_shape}"),
        (f"batch {p.global_batch_size} x {p.seq_len} tokens/step in {p.grad_accum_steps} micro-batch(es); compute "
         f"{report.cfg.model.compute_dtype}, remat {p.remat}, attention {report.cfg.model.attention}, scan_layers "
         f"{'yes' if report.cfg.model.scan_layers else 'no'}"),
        "",
        f"{'per device':<40}{'analytic (' + p.device.name + ')':>20}  {'compiled (' + compiler + ')':>34}",
    ]

    def row(label: str, analytic, compiled) -> str:
        right = compiled if isinstance(compiled, str) else gib(compiled)
        return f"{label:<40}{gib(analytic):>20}  {right:>34}"

    refused = "refused" if c is None else None
    needed = re.search(r"temporaries \(([\d.]+\w?)\)", step.refusal or "")
    lines += [
        row("params (fp32 master)", a.params, refused or c.params),
        row("optimizer state (AdamW mu, nu)", a.optimizer, refused or c.optimizer),
        row("batch", None, refused or c.batch),
        row("gradients (fp32)", a.gradients, refused or "in temp"),
        row("saved activations", a.activations, refused or "in temp"),
        row("loss chunk + LM-head gradient", a.loss_workspace, refused or "in temp"),
        row("temp (grads + activations + scratch)", None,
            (f"{needed.group(1)} needed, refused" if needed else refused) if c is None else c.temp),
        row("outputs not donated", None, refused or (c.outputs - c.aliased)),
        row("total (compiled: peak)", a.total, refused or c.peak),
    ]
    if c is not None:
        lines.append(f"{'analytic / compiled peak':<40}{'':>20}  {a.total / c.peak:>33.2f}x")
    usable = report.usable_bytes
    rule = ("the compiler accepts the program and its peak is within the HBM" if target.platform == "tpu"
            else f"compiled peak within {usable / GIB:.1f} GiB usable (90%)")
    verdict = "yes" if report.fits else "NO"
    reason = f" ({step.refusal})" if step.refusal else "" if c is None else f" (compiled peak {gib(c.peak)})"
    lines += ["", f"fits {p.device.name} ({rule}): {verdict}{reason}; compiled in {step.compile_seconds:,.0f} s"]
    for fix in report.steps[1:]:
        outcome = (f"refused ({fix.refusal})" if fix.memory is None else
                   f"compiled peak {gib(fix.peak)}: {'fits' if fix.fits(usable) else 'does not fit'}")
        proven = " -- proven" if fix is report.proven else ""
        analytic = report.analytic_totals.get(fix.overrides)
        lines.append(f"  fix compiled: {_step_label(fix)}: {outcome} (analytic {gib(analytic)}; "
                     f"{fix.compile_seconds:,.0f} s){proven}")
    if not report.fits and len(report.steps) > 1 and report.proven is None:
        lines.append("  none of the fixes tried fits: use more chips or tensor parallelism (mesh.tensor)")
    timed = [s for s in (step if report.fits else None, report.proven) if s is not None]
    if timed:
        lines.append("step time:")
    for s in timed:
        lines.append(f" {_step_label(s)}:")
        lines += timing_lines(report, s)
    lines.append("replicated weights: " + ("; ".join(p.replicated) if p.replicated else "none"))
    lines += [f"note: {n}" for n in report.notes]
    lines.append("note: analytic = mixlm.plan's count for the accelerator; compiled = the target compiler's "
                 "memory_analysis() of the real train step on compile-only devices, nothing allocated")
    return "\n".join(lines)


__all__ = ["render", "timing_lines"]
