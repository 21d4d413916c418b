"""Export time and peak memory for a ≥1B-param checkpoint, next to the weights' size.

Writes a params-only Orbax checkpoint of configs/models/regmix-1b.yaml initialised at random (the
mixlm.checkpoint layout, as `mixlm import` writes it: the train loop would need ~13 GB of AdamW state on
this CPU), then exports it in fresh subprocesses, once per dtype. Each subprocess imports everything the
export uses, resets its peak-RSS counter (/proc/self/clear_refs), records that RSS as the interpreter
baseline, exports, and reports VmHWM. The issue's bound: peak ≤ baseline + 1.3 × the weights in the output
dtype. Prints a Markdown table and writes it to benchmarks/results/export.md.

    .venv/bin/python benchmarks/export.py                       # regmix-1b, bfloat16 and float32
    .venv/bin/python benchmarks/export.py --model configs/models/metarater-1.3b.yaml --verify
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from machine import describe_machine as machine  # benchmarks/machine.py


def status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) / 1024


def reset_peak() -> bool:
    """Sets VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- workers (run in subprocesses so each measurement starts from a fresh interpreter) ------------------


def create_checkpoint(model_path: str, run_dir: Path) -> dict:
    import numpy as np

    from mixlm import checkpoint
    from mixlm.config import CheckpointConfig, ExperimentConfig, TrainConfig, load_model_config
    from mixlm.hf.param_readers import flatten_params, unflatten_params
    from mixlm.models import abstract_params

    model = load_model_config(model_path)
    cfg = ExperimentConfig(model=model, train=TrainConfig(output_dir=str(run_dir)))
    _, shapes, _ = abstract_params(model)
    rng = np.random.default_rng(0)
    flat = {}
    for path, s in flatten_params(shapes).items():
        if path[-1] == "scale":
            flat[path] = 1.0 + 0.1 * rng.standard_normal(s.shape, dtype=np.float32)
        else:
            flat[path] = model.init_std * rng.standard_normal(s.shape, dtype=np.float32)
    params = unflatten_params(flat)
    start = time.perf_counter()
    ckpts = checkpoint.RunCheckpoints(run_dir / checkpoint.CHECKPOINT_SUBDIR, CheckpointConfig(async_save=False),
                                      log=lambda _: None)
    ckpts.save(1, {"params": params}, data_state={}, meta=checkpoint.run_metadata(cfg, 1, tokens_seen={}))
    ckpts.close()
    n = sum(int(a.size) for a in flat.values())
    return {"params_stored": n, "save_seconds": time.perf_counter() - start}


def run_export(run_dir: Path, out_dir: Path, dtype: str, verify: bool) -> dict:
    # Everything the export imports, imported before the baseline is taken.
    import jax  # noqa: F401
    import ml_dtypes  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GenerationConfig, GPT2Config, LlamaConfig, Qwen3Config  # noqa: F401 (pulls in torch)

    from mixlm.hf.export import export_hf
    from mixlm.hf.param_readers import open_checkpoint
    from mixlm.hf.verify import verify_export

    exact = reset_peak()
    baseline = status_mb("VmRSS")
    start = time.perf_counter()
    source = open_checkpoint(run_dir)
    result = export_hf(source, out_dir, dtype=dtype, overwrite=True)
    seconds = time.perf_counter() - start
    out = {"dtype": dtype, "seconds": seconds, "baseline_mb": baseline, "peak_mb": status_mb("VmHWM"),
           "peak_is_export_only": exact, "weight_bytes": result.weight_bytes, "num_params": result.num_params,
           "files": result.files,
           "disk_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.suffix == ".safetensors")}
    if verify:
        t = time.perf_counter()
        report = verify_export(source, out_dir)
        out["verify"] = {"max_abs_diff": report.max_abs_diff, "mean_kl": report.mean_kl,
                         "passed": report.passed, "seconds": time.perf_counter() - t}
    return out


def worker(argv: list[str]) -> int:
    kind = argv[0]
    if kind == "create":
        out = create_checkpoint(argv[1], Path(argv[2]))
    else:
        out = run_export(Path(argv[1]), Path(argv[2]), argv[3], argv[4] == "1")
    print("RESULT " + json.dumps(out))
    return 0


def call(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "configs/models/regmix-1b.yaml"))
    parser.add_argument("--workdir", default="/tmp/mixlm-export-bench", help="checkpoint and exports go here")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--verify", action="store_true", help="also run the logits check (needs ~3x fp32 weights of RAM)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and exports")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/export.md"))
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    from mixlm.config import load_model_config
    from mixlm.models import param_counts

    model = load_model_config(args.model)
    total, non_embedding = param_counts(model)
    work = Path(args.workdir)
    run_dir = work / "run"
    if not (run_dir / "checkpoints").is_dir():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t = time.perf_counter()
        created = call(["create", args.model, str(run_dir)])
        print(f"created a random {model.name} checkpoint ({created['params_stored']:,} params stored) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    ckpt_bytes = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())

    rows = []
    for dtype in args.dtypes.split(","):
        r = call(["export", str(run_dir), str(work / f"hf-{dtype}"), dtype, "1" if args.verify else "0"])
        weights_mb = r["weight_bytes"] / 2**20
        bound = r["baseline_mb"] + 1.3 * weights_mb
        rows.append((dtype, r, weights_mb, bound))
        print(f"{dtype}: {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MiB (baseline {r['baseline_mb']:.0f}), "
              f"weights {weights_mb:.0f} MiB, bound {bound:.0f} MiB"
              + (f", verify {r['verify']}" if "verify" in r else ""), flush=True)
        if not args.keep:
            shutil.rmtree(work / f"hf-{dtype}", ignore_errors=True)

    largest = max(model.padded_vocab_size() * model.d_model, model.mlp_dim * model.d_model) * 4 / 2**20
    header = ("| dtype | export time | throughput | weights (output dtype) | baseline RSS | peak RSS | "
              "peak − baseline | in largest fp32 tensors | bound (baseline + 1.3 × weights) | within |")
    lines = [header, "|" + "---|" * 10]
    for dtype, r, weights_mb, bound in rows:
        lines.append(
            f"| {dtype} | {r['seconds']:.1f} s | {r['weight_bytes'] / 2**20 / r['seconds']:.0f} MiB/s | "
            f"{weights_mb:,.0f} MiB | {r['baseline_mb']:,.0f} MiB | {r['peak_mb']:,.0f} MiB | "
            f"{r['peak_mb'] - r['baseline_mb']:,.0f} MiB ({(r['peak_mb'] - r['baseline_mb']) / weights_mb:.2f} × weights) | "
            f"{(r['peak_mb'] - r['baseline_mb']) / largest:.1f} × {largest:,.0f} MiB | "
            f"{bound:,.0f} MiB | {'yes' if r['peak_mb'] <= bound else 'NO'} |")
    verify_lines = [f"- {dtype}: max |logit diff| {r['verify']['max_abs_diff']:.2e}, mean KL "
                    f"{r['verify']['mean_kl']:.2e} ({'OK' if r['verify']['passed'] else 'FAILED'}, "
                    f"{r['verify']['seconds']:.0f} s)" for dtype, r, _, _ in rows if "verify" in r]
    reproduce = ("" if args.model.endswith("regmix-1b.yaml") else f" --model {args.model}") + (
        " --verify" if args.verify else "")
    method = (
        f"Checkpoint: `{model.name}` initialised at random, {total:,} params ({non_embedding:,} non-embedding), "
        f"params only, float32, {ckpt_bytes / 2**30:.2f} GiB on disk (Orbax OCDBT, mixlm.checkpoint layout). "
        "Each export runs in a fresh process: baseline = RSS after importing jax, orbax, transformers' config "
        "classes (which import torch) and mixlm.hf; peak = VmHWM after the export, counted from the "
        "baseline (/proc/self/clear_refs). Export = open the checkpoint, restore each array alone, write "
        "safetensors (+ config, generation config, model card)."
    )
    note = ("Why the peak stays where it does (hand-written analysis, not by this script): "
            "benchmarks/results/export_notes.md.")
    parts = [
        f"# Export of a {total / 1e9:.2f}B-param checkpoint ({model.name})",
        (f"Machine: {machine()}, Python {platform.python_version()}, no accelerator. "
         f"Reproduce: `.venv/bin/python benchmarks/export.py{reproduce}`."),
        method,
        "\n".join(lines),
        note,
    ]
    if verify_lines:
        parts.insert(-1, "Parity check (`--verify`: our Flax model and transformers' on the exported folder, "
                     "2 x 64 random tokens, float32 compute; a separate step that loads both models whole):\n"
                     + "\n".join(verify_lines))
    text = "\n\n".join(parts) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("\n" + text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
