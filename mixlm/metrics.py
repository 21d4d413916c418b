"""Throughput and MFU, and where metrics go: console progress bar, metrics.jsonl, TensorBoard, and optionally
Weights & Biases (`logging.wandb: true`; wandb is imported only then, `WANDB_MODE=offline` needs no account and
writes the run under <output_dir>/wandb/ for a later `wandb sync`).

TensorBoard event files are under <output_dir>/tensorboard/: `tensorboard --logdir <output_dir>` (the
`tensorboard` package is in requirements.txt); `mixlm plot RUN_DIR...` draws the same curves as PNGs.

On an object store (train.output_dir=gs://... or s3://...), which has no append: metrics.jsonl rows are buffered
and the object rewritten whole at most every storage.REMOTE_FLUSH_S (30) seconds, at every checkpoint save
(`flush()`, called by the checkpoint hook) and at close; TensorBoard writes its events to a local temporary
folder that is uploaded to <output_dir>/tensorboard/ at the same times; W&B's offline files go to
storage.cache_root()/wandb/... A run killed without warning (SIGKILL, a lost VM) loses the rows logged in at most
the last 30 s: ceil(30 s / (logging.every x step time)) rows, and none at or before its newest checkpoint. A
resumed run trims metrics.jsonl to that checkpoint and logs the steps after it again, so the resumed log has
every row (tests/test_object_store.py). SIGTERM (preemption) saves a checkpoint, which flushes.

MFU = achieved model FLOP/s / (peak FLOP/s per device × devices). Model FLOPs per token come from the
model's `flops_per_token` (6 × matmul params + causal attention, see mixlm.models). Peaks are per
device, dense bf16 (the compute dtype of accelerator runs); on CPU the peak is a fp32 matmul measured
in the same process (this 2-core machine: ≈105–135 GFLOP/s), or `logging.peak_flops` when set.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mixlm import storage

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


class MetricsWriteError(RuntimeError):
    """metrics.jsonl could not be written (disk full, permissions); the message names the file and what to do."""


class WandbSink:
    """One Weights & Biases run for a training run (process 0 only): numbers logged at their step."""

    def __init__(self, out_dir, *, project: str, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            from mixlm.errors import ConfigError

            raise ConfigError("logging.wandb=true needs the wandb package: `pip install wandb` (or set "
                              "logging.wandb=false)") from None
        name = storage.location(out_dir).name
        local = storage.cache_path(out_dir, "wandb") if storage.is_remote(out_dir) else Path(str(out_dir))
        local.mkdir(parents=True, exist_ok=True)  # wandb writes local files only
        self._wandb = wandb
        self.run = wandb.init(project=project or "mixlm", name=name, dir=str(local), config=config or {})

    def write(self, step: int, row: dict) -> None:
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
        if numbers:
            self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """Writes metric dicts to metrics.jsonl, TensorBoard and (`wandb=True`) Weights & Biases (process 0 only,
    or the process `writer` says: a swarm member's owner) and to a tqdm bar."""

    def __init__(self, out_dir, *, total_steps: int, start_step: int, jsonl: bool, tensorboard: bool,
                 progress: bool, wandb: bool = False, wandb_project: str = "mixlm", run_config: dict | None = None,
                 writer: bool | None = None):
        self.is_main = jax.process_index() == 0 if writer is None else writer
        out_dir = storage.location(out_dir)
        self.path = out_dir / "metrics.jsonl"
        self._remote = storage.is_remote(out_dir)
        self._flushed_at = time.monotonic()
        self._wandb = WandbSink(out_dir, project=wandb_project, config=run_config) if wandb and self.is_main else None
        # Kept open for the run (closed in close()): one line per logged step (buffered on an object store).
        self._jsonl = storage.AppendLog(self.path) if (jsonl and self.is_main) else None
        self._tb = self._tb_local = None
        self._tb_remote = out_dir / "tensorboard"
        if tensorboard and self.is_main:
            from tensorboardX import SummaryWriter

            # tensorboardX appends to local files: on an object store, a local folder uploaded on flush()
            self._tb_local = tempfile.mkdtemp(prefix="mixlm-tensorboard-") if self._remote else None
            self._tb = SummaryWriter(self._tb_local or str(self._tb_remote))
        self._bar = None
        if progress and self.is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: (float(v) if not isinstance(v, (str, dict)) else v) for k, v in metrics.items()}}
        if self._jsonl:
            try:
                self._jsonl.append(json.dumps(row) + "\n")
            except OSError as e:
                self._drop_jsonl()
                raise self._write_error(e, f"at step {step}") from None
        if self._tb:
            for k, v in row.items():
                if isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
        if self._remote and time.monotonic() - self._flushed_at >= storage.REMOTE_FLUSH_S:
            self.flush()
        if self._wandb:
            self._wandb.write(step, row)
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

    def _write_error(self, e: OSError, when: str) -> MetricsWriteError:
        reason = f"{e.strerror or e}" if not e.filename else f"{e.strerror}: {e.filename}"
        return MetricsWriteError(
            f"writing the metrics log {self.path} failed {when} ({reason}); free space there or fix its "
            "permissions, then rerun the same command (it resumes from the newest checkpoint in "
            f"{self.path.parent / 'checkpoints'}, if any)")

    def _drop_jsonl(self) -> None:
        """Closes metrics.jsonl after a failed write (its unwritten rows are dropped: the rerun redoes them)."""
        jsonl, self._jsonl = self._jsonl, None
        jsonl.abandon()

    def flush(self) -> None:
        """Writes what is buffered: on an object store, metrics.jsonl's new rows and the TensorBoard events
        (called at every checkpoint save; on a local disk every row is written as it comes)."""
        self._flushed_at = time.monotonic()
        if self._jsonl:
            try:
                self._jsonl.flush()
            except OSError as e:
                self._drop_jsonl()
                raise self._write_error(e, "on flush") from None
        if self._tb and self._tb_local:
            self._tb.flush()
            storage.copy_tree(self._tb_local, self._tb_remote)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        try:
            if self._jsonl:
                jsonl, self._jsonl = self._jsonl, None
                try:
                    jsonl.close()
                except OSError as e:
                    raise self._write_error(e, "on close") from None
        finally:
            if self._tb:
                self._tb.close()
                if self._tb_local:
                    storage.copy_tree(self._tb_local, self._tb_remote)
                    shutil.rmtree(self._tb_local, ignore_errors=True)
            if self._wandb:
                self._wandb.close()

    @classmethod
    def for_run(cls, out_dir, cfg, *, start_step: int, writer: bool | None = None) -> MetricsLog:
        """The log of a training run from its ExperimentConfig's `logging` section (jsonl, tensorboard,
        progress, wandb, wandb_project); the whole config goes to W&B as the run's config. `writer`: whether
        this process writes it (default: process 0)."""
        lc = cfg.logging
        return cls(out_dir, total_steps=cfg.train.steps, start_step=start_step, jsonl=lc.jsonl,
                   tensorboard=lc.tensorboard, progress=lc.progress, wandb=lc.wandb,
                   wandb_project=lc.wandb_project, run_config=cfg.to_dict(), writer=writer)
