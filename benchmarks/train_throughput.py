"""Training throughput on this host: mixlm (JAX) against transformers' LlamaForCausalLM + torch AdamW.

Same model (configs/models/llama-bench-20m.yaml: vocab 8192, d 512, 8 layers, 8 heads, SwiGLU 1408),
seq 512, batch 8, fp32, AdamW, in one process. Prints a Markdown table (tokens/s, MFU against a matmul
peak measured in the same process, ratio mixlm / PyTorch) and writes it to benchmarks/results/.

    make bench            # or: .venv/bin/python benchmarks/train_throughput.py --steps 6
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent


from machine import describe_machine as machine  # benchmarks/machine.py


def bench_mixlm(model_cfg, seq_len: int, batch: int, steps: int) -> float:
    import jax

    from mixlm.config import load_config
    from mixlm.data.synthetic import SyntheticSource
    from mixlm.sharding import make_mesh, to_global_batch
    from mixlm.train import build_setup

    cfg = load_config(None, [f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", f"train.global_batch_size={batch}",
                             f"train.steps={steps + 2}", "optimizer.lr=3e-4", "schedule.kind=constant"])
    cfg = cfg.replace(model=model_cfg)
    mesh = make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state = setup.init_state(jax.random.key(0))
    src = SyntheticSource(vocab_size=model_cfg.vocab_size, seq_len=seq_len, batch_size=batch, seed=0)
    data = [to_global_batch(src.next_batch(), mesh) for _ in range(2)]
    state, m = setup.train_step(state, data[0])  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    for i in range(steps):
        state, m = setup.train_step(state, data[i % 2])
    jax.block_until_ready(m)
    return steps * batch * seq_len / (time.perf_counter() - t)


def bench_torch(model_cfg, seq_len: int, batch: int, steps: int) -> float:
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
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq_len / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "configs/models/llama-bench-20m.yaml"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput_cpu.md"))
    args = ap.parse_args()

    from mixlm import models
    from mixlm.config import load_model_config
    from mixlm.metrics import measure_matmul_peak

    model_cfg = load_model_config(args.model)
    peak = measure_matmul_peak(n=2048)
    fpt = models.flops_per_token(model_cfg, args.seq_len, causal=True)
    total, non_emb = models.param_counts(model_cfg)
    mixlm_tps = bench_mixlm(model_cfg, args.seq_len, args.batch, args.steps)
    torch_tps = bench_torch(model_cfg, args.seq_len, args.batch, args.steps)

    rows = [
        ("mixlm (JAX, fp32)", mixlm_tps),
        ("transformers LlamaForCausalLM + torch AdamW (fp32, sdpa)", torch_tps),
    ]
    lines = [
        f"# Training throughput — {Path(args.model).stem}",
        "",
        (f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: "
         f"`.venv/bin/python benchmarks/train_throughput.py --steps {args.steps}`."),
        (f"Model: {total:,} params ({non_emb:,} non-embedding), seq {args.seq_len}, batch {args.batch}, "
         f"{fpt / 1e6:.1f} MFLOP/token for training (6 x matmul params + causal attention)."),
        f"Peak: jitted fp32 2048x2048 matmul measured in this process: {peak / 1e9:.1f} GFLOP/s.",
        "",
        "| run | tokens/s | MFU (vs measured peak) | ratio vs PyTorch |",
        "|---|---:|---:|---:|",
    ]
    for name, tps in rows:
        lines.append(f"| {name} | {tps:,.0f} | {100 * tps * fpt / peak:.1f}% | {tps / torch_tps:.2f} |")
    notes = "benchmarks/results/train_throughput_notes.md"
    lines += ["", f"Analysis of where the time goes (hand-written, not by this script): {notes}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
