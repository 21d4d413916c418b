"""Training MFU on one accelerator: mixlm (JAX) across attention implementations and remat policies, against the
same model's training step in PyTorch (transformers LlamaForCausalLM, SDPA, AdamW), in one run of <= 8 minutes.

    .venv/bin/python benchmarks/accelerator_mfu.py                 # on one H100 / H200 (or a TPU chip)
    .venv/bin/python benchmarks/accelerator_mfu.py --cpu-smoke --out /tmp/x   # tiny, 2 steps, fp32 (tests)

Grid (accelerator): regmix-1b at ctx 2048 and metarater-1.3b at ctx 1024, bf16 compute with float32 master
weights and AdamW moments, scanned layers, remat none | dots_saveable | full, and every attention
implementation that applies on the backend (GPU: cudnn, xla, pallas_gpu; TPU: splash, xla). Ordered by
importance (the default kernel first), so the time budget (--total-budget-s, default 450 s) cuts the tail; a
row that did not run says why.

Each configuration runs in its own subprocess with a timeout (--config-timeout-s): one OOM, compile failure
or hang costs that row only, device memory starts empty, and `peak_bytes_in_use` (device memory_stats) is that
configuration's own peak. The parent never initialises an accelerator. MFU is reported against the device's
dense bf16 peak (mixlm.metrics.PEAK_FLOPS_BY_DEVICE: 989 TFLOP/s for H100/H200) and against a bf16 matmul peak
measured in the same run (8192^3 on the device). FLOPs per token: mixlm.models.flops_per_token (6 x matmul
params + causal attention), the same count for both frameworks.

Writes the Markdown table to <out>/accelerator_mfu_<device>.md (or to --out when it ends in .md) with the
machine and the command, and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "
REMATS = ("none", "dots_saveable", "full")
ATTENTION_BY_BACKEND = {"gpu": ("cudnn", "xla", "pallas_gpu"), "tpu": ("splash", "xla"), "cpu": ("blocked", "xla")}
# (model config, seq_len, global batch): ~16k tokens per step on one device for both models.
ACCELERATOR_MODELS = (("regmix-1b", 2048, 8), ("metarater-1.3b", 1024, 16))
SMOKE_MODEL = {"family": "llama", "name": "tiny-smoke", "num_layers": 2, "d_model": 64, "num_heads": 4,
               "num_kv_heads": 2, "mlp_dim": 128, "vocab_size": 256, "max_seq_len": 64}
SMOKE_SEQ, SMOKE_BATCH = 64, 2


# ---- children: one measurement each, run as `accelerator_mfu.py --child SPEC_JSON` --------------------------


def _model_config(spec: dict):
    import dataclasses

    from mixlm.config import ModelConfig, load_model_config

    if spec["model"] == SMOKE_MODEL["name"]:
        model = ModelConfig(**SMOKE_MODEL)
    else:
        model = load_model_config(ROOT / "configs" / "models" / f"{spec['model']}.yaml")
    return dataclasses.replace(model, max_seq_len=spec["seq_len"], compute_dtype=spec["dtype"],
                               attention=spec.get("attention", "auto"), remat=spec.get("remat", "none"),
                               scan_layers=spec.get("scan_layers", True))


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def child_peak(spec: dict) -> dict:
    """The backend, the device, the machine line and the best matmul FLOP/s of one device in spec['dtype']."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe_machine  # benchmarks/machine.py

    from mixlm.metrics import PEAK_FLOPS_BY_DEVICE

    device = jax.devices()[0]
    backend = jax.default_backend()
    dtype = jnp.dtype(spec["dtype"] if backend != "cpu" else "float32")
    n = spec.get("n") or (8192 if backend != "cpu" else 1024)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(10 if backend != "cpu" else 3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    kind = device.device_kind
    table_peak = next((p for key, p in PEAK_FLOPS_BY_DEVICE if key in kind.lower()), None)
    return {"backend": backend, "device_kind": kind, "machine": describe_machine(), "matmul_n": n,
            "matmul_dtype": str(dtype), "measured_peak": 2 * n**3 / best, "table_peak": table_peak}


def _timed_steps(step, steps: int, budget_s: float) -> list[float]:
    """Seconds of each timed call of `step()` (which blocks), `steps` of them or fewer when budget_s runs out."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and (not times or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def child_jax(spec: dict) -> dict:
    """One mixlm training configuration: compile (first step), then timed steps."""
    import jax

    from mixlm import models
    from mixlm.config import load_config
    from mixlm.data.synthetic import SyntheticSource
    from mixlm.sharding import make_mesh, to_global_batch
    from mixlm.train import build_setup

    model = _model_config(spec)
    seq, batch = spec["seq_len"], spec["batch"]
    cfg = load_config(None, [f"data.seq_len={seq}", f"train.global_batch_size={batch}",
                             f"train.steps={spec['steps'] + 1}", "optimizer.lr=3e-4", "schedule.kind=constant",
                             "logging.progress=false", "logging.tensorboard=false"]).replace(model=model)
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    setup = build_setup(cfg, mesh)
    state = setup.init_state(jax.random.key(0))
    src = SyntheticSource(vocab_size=model.vocab_size, seq_len=seq, batch_size=batch, seed=0)
    data = [to_global_batch(src.next_batch(), mesh) for _ in range(2)]
    holder = {"state": state, "i": 0}

    def step():
        holder["state"], metrics = setup.train_step(holder["state"], data[holder["i"] % 2])
        holder["i"] += 1
        jax.block_until_ready(metrics)
        return metrics

    metrics = step()  # compiles
    compile_s = time.perf_counter() - t0
    times = _timed_steps(step, spec["steps"], spec["budget_s"])
    step_s = sum(times) / len(times)
    return {"step_s": step_s, "steps": len(times), "compile_s": compile_s, "tokens_per_s": batch * seq / step_s,
            "flops_per_token": models.flops_per_token(model, seq, causal=True),
            "peak_bytes": _device_peak_bytes(), "loss": float(metrics["loss"]),
            "attention_resolved": _resolved_attention(model)}


def _resolved_attention(model) -> str:
    import jax.numpy as jnp

    from mixlm.models import attention

    return attention.resolve_impl(model.attention, jnp.dtype(model.compute_dtype))


def child_torch(spec: dict) -> dict:
    """The same model's training step in PyTorch: transformers LlamaForCausalLM (SDPA), float32 master weights
    under bf16 autocast on an accelerator (mixlm's recipe), torch AdamW (fused on CUDA), grad clipping 1.0."""
    import torch
    from transformers import LlamaForCausalLM

    from mixlm import models
    from mixlm.models import llama

    model_cfg = _model_config(spec)
    seq, batch = spec["seq_len"], spec["batch"]
    on_gpu = spec["backend"] == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"this torch ({torch.__version__}) has no CUDA; install a CUDA build to compare")
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    hf_cfg = llama.hf_config(model_cfg, attn_implementation="sdpa")  # the config mixlm exports this model with
    t0 = time.perf_counter()
    model = LlamaForCausalLM(hf_cfg).float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if on_gpu else {}))
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq), device=device)
    autocast_dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else None

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return loss

    loss = step()
    warm_s = time.perf_counter() - t0
    times = _timed_steps(step, spec["steps"], spec["budget_s"])
    step_s = sum(times) / len(times)
    return {"step_s": step_s, "steps": len(times), "compile_s": warm_s, "tokens_per_s": batch * seq / step_s,
            "flops_per_token": models.flops_per_token(model_cfg, seq, causal=True),
            "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else None, "loss": float(loss),
            "attention_resolved": "sdpa"}


CHILDREN = {"peak": child_peak, "jax": child_jax, "torch": child_torch}


def run_child(spec: dict, timeout_s: float, env: dict) -> dict:
    """Runs one child; {'status': 'ok', ...results} or {'status': why it failed} (OOM, timeout, error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1), env=env, cwd=ROOT,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout_s:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {"status": "ok", **json.loads(line[len(RESULT_PREFIX):])}
    text = proc.stderr + proc.stdout
    if re.search(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory", text, re.IGNORECASE):
        return {"status": "OOM"}
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
    return {"status": f"failed: {last[0][:160]}"}


# ---- the parent: grid, budget, table ----------------------------------------------------------------------


def plan(args, backend: str) -> list[dict]:
    """The configurations in the order they run (most important first)."""
    attentions = args.attention.split(",") if args.attention else ATTENTION_BY_BACKEND.get(backend, ("xla",))
    remats = args.remat.split(",") if args.remat else REMATS
    if args.cpu_smoke:
        models_ = ((SMOKE_MODEL["name"], SMOKE_SEQ, SMOKE_BATCH),)
    else:
        models_ = tuple(m for m in ACCELERATOR_MODELS if not args.models or m[0] in args.models.split(","))
    dtype = "float32" if args.cpu_smoke else "bfloat16"
    specs = []
    for model, seq, batch in models_:
        base = {"model": model, "seq_len": seq, "batch": args.batch or batch, "dtype": dtype, "steps": args.steps,
                "budget_s": args.step_budget_s, "scan_layers": not args.no_scan, "backend": backend}
        if not args.skip_torch:
            specs.append({**base, "kind": "torch"})
        default, others = attentions[0], attentions[1:]
        specs += [{**base, "kind": "jax", "attention": default, "remat": r} for r in remats]
        specs += [{**base, "kind": "jax", "attention": a, "remat": r} for a in others for r in remats]
    # all models' default-kernel rows before any model's other kernels
    return sorted(specs, key=lambda s: (s["kind"] == "jax" and s["attention"] != attentions[0],))


def _fmt(x, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def render(peak: dict, rows: list[tuple[dict, dict]], command: str, seconds: float) -> str:
    measured, table = peak.get("measured_peak"), peak.get("table_peak")
    dtype = rows[0][0]["dtype"] if rows else "?"
    autocast_note = " under bf16 autocast" if dtype == "bfloat16" else ""
    layers_note = "scanned layers" if not rows or rows[0][0]["scan_layers"] else "a Python loop over the layers"
    torch_tps = {s["model"]: r["tokens_per_s"] for s, r in rows if s["kind"] == "torch" and r["status"] == "ok"}
    lines = [
        f"# Training MFU on one {peak.get('device_kind', '?')} — mixlm (JAX) vs PyTorch",
        "",
        f"Machine: {peak.get('machine', '?')}. Date: {time.strftime('%Y-%m-%d')}. Wall time: {seconds:.0f} s.",
        f"Command: `{command}`.",
        (f"Peaks: table {_fmt(table and table / 1e12, '.0f', 'n/a')} TFLOP/s (mixlm.metrics.PEAK_FLOPS_BY_DEVICE, "
         f"dense bf16); measured {peak.get('matmul_dtype', '?')} {peak.get('matmul_n', '?')}^3 matmul in this run: "
         f"{_fmt(measured and measured / 1e12, '.1f', '?')} TFLOP/s."),
        ("FLOPs/token: mixlm.models.flops_per_token (6 x matmul params + causal attention), the same for both "
         f"frameworks. Compute dtype {dtype}. mixlm: {layers_note}, float32 master weights and AdamW moments, one "
         f"device. PyTorch: transformers LlamaForCausalLM (SDPA), float32 weights{autocast_note}, "
         "AdamW (fused on CUDA), eager."),
        "",
        ("| model | seq x batch | framework | attention | remat | step (ms) | tokens/s | MFU (table peak) | "
         "MFU (measured peak) | peak memory (GiB) | compile/warm-up (s) | vs PyTorch | status |"),
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for spec, r in rows:
        ok = r["status"] == "ok"
        flops = r.get("tokens_per_s", 0) * r.get("flops_per_token", 0) if ok else None
        framework = "PyTorch" if spec["kind"] == "torch" else "mixlm"
        attention = r.get("attention_resolved", spec.get("attention", "sdpa")) if ok else spec.get("attention", "sdpa")
        ratio = r["tokens_per_s"] / torch_tps[spec["model"]] if ok and spec["model"] in torch_tps else None
        lines.append(
            f"| {spec['model']} | {spec['seq_len']} x {spec['batch']} | {framework} | {attention} | "
            f"{spec.get('remat', 'none') if framework == 'mixlm' else 'none'} | "
            f"{_fmt(ok and r['step_s'] * 1e3, '.1f') if ok else '—'} | {_fmt(r.get('tokens_per_s') if ok else None, ',.0f')} | "
            f"{_fmt(flops / table * 100 if ok and table else None, '.1f')}{'%' if ok and table else ''} | "
            f"{_fmt(flops / measured * 100 if ok and measured else None, '.1f')}{'%' if ok and measured else ''} | "
            f"{_fmt(r.get('peak_bytes') / 2**30 if ok and r.get('peak_bytes') else None, '.1f')} | "
            f"{_fmt(r.get('compile_s') if ok else None, '.1f')} | {_fmt(ratio, '.2f')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 steps, fp32 (automatic on CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="folder for accelerator_mfu_<device>.md, or a .md file path")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per configuration (default 10; smoke 2)")
    ap.add_argument("--batch", type=int, default=0, help="global batch per configuration (default per model)")
    ap.add_argument("--models", default="", help="comma list of regmix-1b,metarater-1.3b (default both)")
    ap.add_argument("--attention", default="", help="comma list; the first is the default kernel")
    ap.add_argument("--remat", default="", help="comma list of none,dots_saveable,full")
    ap.add_argument("--no-scan", action="store_true", help="a Python loop over the layers instead of scanned layers (jax.lax.scan)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--total-budget-s", type=float, default=450.0, help="no configuration starts after this")
    ap.add_argument("--config-timeout-s", type=float, default=100.0, help="one configuration's hard limit")
    ap.add_argument("--step-budget-s", type=float, default=20.0, help="timed steps stop after this")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        print(RESULT_PREFIX + json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)
        return 0

    start = time.perf_counter()
    command = "python benchmarks/accelerator_mfu.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # each child owns the device while it runs
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    peak = run_child({"kind": "peak", "dtype": "bfloat16"}, args.config_timeout_s, env)
    if peak["status"] != "ok":
        print(f"could not measure the device: {peak['status']}", file=sys.stderr)
        return 1
    backend = peak["backend"]
    if backend == "cpu" and not args.cpu_smoke:
        print("no accelerator: running the CPU smoke mode (tiny model, 2 steps, fp32)", file=sys.stderr)
        args.cpu_smoke = True
    args.steps = args.steps or (2 if args.cpu_smoke else 10)
    rows = []
    for spec in plan(args, backend):
        left = args.total_budget_s - (time.perf_counter() - start)
        if left < 10:
            rows.append((spec, {"status": "not run (total budget)"}))
            continue
        if spec["kind"] == "torch" and backend not in ("gpu", "cpu"):
            rows.append((spec, {"status": f"not run (no PyTorch step on {backend})"}))
            continue
        result = run_child(spec, min(args.config_timeout_s, left), env)
        rows.append((spec, result))
        print(f"{spec['kind']:5s} {spec['model']} {spec.get('attention', 'sdpa')} {spec.get('remat', '-')}: "
              f"{result['status']} {result.get('tokens_per_s', 0):,.0f} tokens/s", file=sys.stderr, flush=True)
    text = render(peak, rows, command, time.perf_counter() - start)
    print(text)
    out = Path(args.out)
    if out.suffix != ".md":
        slug = re.sub(r"[^a-z0-9]+", "_", peak["device_kind"].lower()).strip("_") or backend
        out = out / f"accelerator_mfu_{'cpu' if backend == 'cpu' else slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
