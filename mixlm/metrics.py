"""Throughput and MFU, and where metrics go: console progress bar, metrics.jsonl, TensorBoard.

MFU = achieved model FLOP/s / (peak FLOP/s per device × devices). Model FLOPs per token come from the
model's `flops_per_token` (6 × matmul params + causal attention, see mixlm.models). Peaks are per
device, dense bf16 (the compute dtype of accelerator runs); on CPU the peak is a fp32 matmul measured
in the same process (this 2-core machine: ≈105–135 GFLOP/s), or `logging.peak_flops` when set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device, keyed by a substring of `device.device_kind` (lower case).
PEAK_FLOPS_BY_DEVICE = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
)

_measured_cpu_peak: float | None = None


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """Best observed fp32 FLOP/s of a jitted n×n matmul on the default device (cached per process)."""
    global _measured_cpu_peak
    if _measured_cpu_peak is not None:
        return _measured_cpu_peak
    device = jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _measured_cpu_peak = 2 * n**3 / best
    return _measured_cpu_peak


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if override > 0:
        return override, "logging.peak_flops"
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS_BY_DEVICE:
        if key in kind:
            return peak, f"table ({device.device_kind}, dense bf16)"
    if device.platform == "cpu":
        # Fake CPU devices share the same cores: the whole host is one device's worth of peak.
        return measure_matmul_peak() / jax.local_device_count(), "measured fp32 matmul / local devices"
    return 0.0, f"unknown device {device.device_kind!r}: set logging.peak_flops"


class MetricsLog:
    """Writes metric dicts to metrics.jsonl and TensorBoard (process 0 only) and to a tqdm bar."""

    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, jsonl: bool, tensorboard: bool,
                 progress: bool):
        self.is_main = jax.process_index() == 0
        # Kept open for the run (closed in close()): one line per logged step.
        self._jsonl = open(out_dir / "metrics.jsonl", "a") if (jsonl and self.is_main) else None  # noqa: SIM115
        self._tb = None
        if tensorboard and self.is_main:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        self._bar = None
        if progress and self.is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: (float(v) if not isinstance(v, (str, dict)) else v) for k, v in metrics.items()}}
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in row.items():
                if isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None and "loss" in row:
            self._bar.set_postfix_str(
                f"loss {row['loss']:.4f} lr {row.get('lr', 0):.2e} tok/s {row.get('tokens_per_s', 0):,.0f} "
                f"mfu {100 * row.get('mfu', 0):.1f}%"
            )

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
