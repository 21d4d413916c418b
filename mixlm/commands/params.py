"""`mixlm params CONFIG [section.key=value ...]`: exact parameter counts and training FLOPs/token of a model, via
eval_shape (nothing is allocated, so a 3B config is counted in about a second). CONFIG is a model YAML
(configs/models/*.yaml, model.* overrides) or an experiment YAML, whose vocabulary is resolved as `mixlm train`
resolves it: from the prepared data's tokenizer unless model.vocab_size is set (mixlm.data.model_vocab)."""

from __future__ import annotations

import argparse

from mixlm.cli import add_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model YAML (configs/models/*.yaml) or experiment YAML")
    add_overrides_argument(parser, "model.num_layers=4 data.prepared_dir=data/prepared")
    parser.add_argument(
        "--vocab-multiple-of",
        type=int,
        default=1,
        help="also pad the embedding rows to a multiple of this (e.g. the mesh size)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=0, help="sequence length for FLOPs/token (default: max_seq_len)"
    )


def vocab_source(cfg, explicit: bool) -> str:
    """Where an experiment's model.vocab_size comes from, as `mixlm train` would take it (resolve_vocab)."""
    from mixlm.data.model_vocab import prepared_tokenizer

    if explicit:
        return "set by the config"
    if cfg.data.source != "prepared":
        return "the default: model.vocab_size is not set"
    record = prepared_tokenizer(cfg)
    if record is not None:
        return f"from the tokenizer of the prepared data in {cfg.data.prepared_dir}"
    where = (f"no prepared domain with a tokenizer is readable in data.prepared_dir={cfg.data.prepared_dir!r}"
             if cfg.data.prepared_dir else "data.prepared_dir is not set")
    return (f"the config's placeholder: train takes it from the prepared data's tokenizer, but {where}; "
            "pass data.prepared_dir=... or model.vocab_size=...")


def run(args: argparse.Namespace) -> int:
    import jax

    from mixlm.config import is_experiment_file, load_config_and_origin, load_model_config
    from mixlm.errors import ConfigError
    from mixlm.models import abstract_params, flops_per_token, param_counts
    from mixlm.run_config import resolve

    if args.vocab_multiple_of < 1:
        raise ConfigError(f"--vocab-multiple-of {args.vocab_multiple_of}: expected at least 1")
    source = ""
    if is_experiment_file(args.config):
        experiment, origin = load_config_and_origin(args.config, args.overrides)
        experiment = resolve(experiment, origin)
        cfg, source = experiment.model, vocab_source(experiment, "model.vocab_size" in origin)
    else:
        cfg = load_model_config(args.config, args.overrides)
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
        ("vocab", f"{cfg.vocab_size:,} -> {padded_vocab:,} padded rows" + (f" ({source})" if source else "")),
        ("padded total", f"{padded_total:,} (as allocated)"),
        ("flops/token", f"{flops:,.0f} ({flops:.3e}; training, seq_len {seq_len}, causal)"),
    ]
    for key, value in rows:
        print(f"{key:<15} {value}")
    return 0
