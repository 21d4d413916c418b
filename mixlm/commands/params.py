"""`mixlm params CONFIG`: exact parameter counts and training FLOPs/token of a model, via eval_shape
(nothing is allocated, so a 3B config is counted in about a second). CONFIG is a model YAML
(configs/models/*.yaml) or an experiment YAML."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model YAML (configs/models/*.yaml) or experiment YAML")
    parser.add_argument(
        "--vocab-multiple-of",
        type=int,
        default=1,
        help="also pad the embedding rows to a multiple of this (e.g. the mesh size)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=0, help="sequence length for FLOPs/token (default: max_seq_len)"
    )


def run(args: argparse.Namespace) -> int:
    import jax

    from mixlm.config import load_model_config
    from mixlm.models import abstract_params, flops_per_token, param_counts

    cfg = load_model_config(args.config)
    total, non_embedding = param_counts(cfg)
    padded_vocab = cfg.padded_vocab_size(args.vocab_multiple_of)
    _, shapes, _ = abstract_params(cfg, args.vocab_multiple_of)
    padded_total = sum(int(s.size) for s in jax.tree.leaves(shapes))
    seq_len = args.seq_len or cfg.max_seq_len
    flops = flops_per_token(cfg, seq_len)
    rows = [
        (
            "model",
            f"{cfg.name or args.config} ({cfg.family}, {cfg.num_layers} layers, d_model {cfg.d_model})",
        ),
        ("total params", f"{total:,}"),
        ("non-embedding", f"{non_embedding:,}"),
        ("embedding", f"{total - non_embedding:,}" + (" (tied)" if cfg.tie_embeddings else "")),
        ("vocab", f"{cfg.vocab_size:,} -> {padded_vocab:,} padded rows"),
        ("padded total", f"{padded_total:,} (as allocated)"),
        ("flops/token", f"{flops:,.0f} ({flops:.3e}; training, seq_len {seq_len}, causal)"),
    ]
    for key, value in rows:
        print(f"{key:<15} {value}")
    return 0
