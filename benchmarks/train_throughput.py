"""Training throughput on this host: mixlm (JAX) against transformers' LlamaForCausalLM + torch AdamW.

Same model (configs/models/llama-bench-20m.yaml: vocab 8192, d 512, 8 layers, 8 heads, SwiGLU 1408),
seq 512, batch 8, fp32, AdamW, in one process. Both are compiled / warmed up once, then timed in alternating
runs of --steps steps (mixlm, torch, mixlm, torch, ...), so a change in the host's load falls on both.
Prints a Markdown table (median and min-max over the runs of tokens/s, MFU against a matmul peak measured in
the same process, and of the per-pair ratio mixlm / PyTorch) and writes it to benchmarks/results/.

    make bench            # or: .venv/bin/python benchmarks/train_throughput.py --steps 5 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent


from machine import describe_machine as machine  # benchmarks/machine.py


def mixlm_runner(model_cfg, seq_len: int, batch: int) -> Callable[[int], float]:
    """Builds and compiles mixlm's train step; returns run(steps) -> tokens/s over that many timed steps."""
    import jax

    from mixlm.config import load_config
    from mixlm.data.synthetic import SyntheticSource
    from mixlm.sharding import make_mesh, to_global_batch
    from mixlm.train import build_setup

    cfg = load_config(None, [f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", f"train.global_batch_size={batch}",
                             "train.steps=1000000", "optimizer.lr=3e-4", "schedule.kind=constant"])
    cfg = cfg.replace(model=model_cfg)
    mesh = make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    src = SyntheticSource(vocab_size=model_cfg.vocab_size, seq_len=seq_len, batch_size=batch, seed=0)
    data = [to_global_batch(src.next_batch(), mesh) for _ in range(2)]
    holder = {"state": setup.init_state(jax.random.key(0))}
    holder["state"], m = setup.train_step(holder["state"], data[0])  # compile
    jax.block_until_ready(m)

    def run(steps: int) -> float:
        t = time.perf_counter()
        for i in range(steps):
            holder["state"], m = setup.train_step(holder["state"], data[i % 2])
        jax.block_until_ready(m)
        return steps * batch * seq_len / (time.perf_counter() - t)

    return run


def torch_runner(model_cfg, seq_len: int, batch: int) -> Callable[[int], float]:
    """Builds transformers' Llama + torch AdamW and takes one warm-up step; returns run(steps) -> tokens/s."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model, intermediate_size=model_cfg.mlp_dim,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.kv_heads, max_position_embeddings=seq_len, rms_norm_eps=model_cfg.norm_eps,
        rope_theta=model_cfg.rope_base, tie_word_embeddings=model_cfg.tie_embeddings, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1))

    def step():
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()

    def run(steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch * seq_len / (time.perf_counter() - t)

    return run


def alternate(runners: dict[str, Callable[[int], float]], runs: int, steps: int) -> dict[str, list[float]]:
    """tokens/s of each runner over `runs` rounds, the runners taking turns within each round."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(runs):
        for name, run in runners.items():
            rates[name].append(run(steps))
            print(f"round {r + 1}/{runs} {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    return rates


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """'median (min-max)' of `values`, each formatted with `fmt` and followed by `unit`."""
    return f"{statistics.median(values):{fmt}}{unit} ({min(values):{fmt}}-{max(values):{fmt}}{unit})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "configs/models/llama-bench-20m.yaml"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--runs", type=int, default=5, help="alternating runs of each (mixlm, torch, mixlm, ...)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput_cpu.md"))
    args = ap.parse_args()
    if args.runs < 1 or args.steps < 1:
        ap.error(f"--runs {args.runs} --steps {args.steps}: both must be >= 1")

    from mixlm import models
    from mixlm.config import load_model_config
    from mixlm.metrics import measure_matmul_peak

    command = " ".join([".venv/bin/python benchmarks/train_throughput.py", *map(shlex.quote, sys.argv[1:])])
    model_cfg = load_model_config(args.model)
    load_before = os.getloadavg()
    peak = measure_matmul_peak(n=2048)
    fpt = models.flops_per_token(model_cfg, args.seq_len, causal=True)
    total, non_emb = models.param_counts(model_cfg)
    mixlm_name, torch_name = "mixlm (JAX, fp32)", "transformers LlamaForCausalLM + torch AdamW (fp32, sdpa)"
    runners = {
        mixlm_name: mixlm_runner(model_cfg, args.seq_len, args.batch),
        torch_name: torch_runner(model_cfg, args.seq_len, args.batch),
    }
    rates = alternate(runners, args.runs, args.steps)
    ratios = [m / t for m, t in zip(rates[mixlm_name], rates[torch_name])]
    load_after = os.getloadavg()

    lines = [
        f"# Training throughput — {Path(args.model).stem}",
        "",
        (f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: "
         f"`{command}`."),
        (f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.1f}' for x in load_before)}, at end "
         f"{', '.join(f'{x:.1f}' for x in load_after)}."),
        (f"Model: {total:,} params ({non_emb:,} non-embedding), seq {args.seq_len}, batch {args.batch}, "
         f"{fpt / 1e6:.1f} MFLOP/token for training (6 x matmul params + causal attention)."),
        f"Peak: jitted fp32 2048x2048 matmul measured in this process: {peak / 1e9:.1f} GFLOP/s.",
        (f"{args.runs} alternating runs of {args.steps} timed steps each (mixlm, torch, mixlm, torch, ...; both "
         "compiled or warmed up before the first): median (min-max) over the runs; the ratio is taken per pair of "
         "consecutive runs."),
        "",
        "| run | tokens/s | MFU (vs measured peak) | ratio vs PyTorch |",
        "|---|---:|---:|---:|",
    ]
    for name, values in rates.items():
        ratio = spread(ratios, ".2f") if name == mixlm_name else "1.00"
        mfu = [100 * v * fpt / peak for v in values]
        lines.append(f"| {name} | {spread(values, ',.0f')} | {spread(mfu, '.1f', '%')} | {ratio} |")
    notes = "benchmarks/results/train_throughput_notes.md"
    lines += ["", f"Analysis of where the time goes (hand-written, not by this script): {notes}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
