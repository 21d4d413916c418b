"""mixlm export CKPT_DIR OUT_DIR [--step N] [--dtype float32|bfloat16] [--verify]: an Orbax checkpoint as a
transformers folder (LlamaForCausalLM / Qwen3ForCausalLM / GPT2LMHeadModel) with the tokenizer and a model
card; --verify compares its logits with our Flax model's before OUT_DIR is put in place.

Exit codes: 0 written; 1 --verify failed (nothing written to OUT_DIR); 2 usage, config or export error (no such
step, a model transformers cannot hold, OUT_DIR exists); 4 the checkpoint's files are damaged (a param does not
read back or holds NaN/inf; the message names the step), as `mixlm train` exits 4 for an unusable checkpoint."""

from __future__ import annotations

import argparse
import json
import sys


class VerifyFailed(Exception):
    """--verify: the exported model's logits differ from ours; the folder is not put in place."""


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size); a plain number is bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """Model-card options shared with `mixlm release`."""
    parser.add_argument("--name", default="", help="model name in the card (default: the folder name)")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card (default apache-2.0)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id trained on (repeatable)")
    parser.add_argument("--hardware", default="", help="e.g. '64 x TPU v5e' (default: the checkpoint's mesh)")
    parser.add_argument("--train-hours", type=float, default=0.0, help="wall-clock training time for the card")
    parser.add_argument("--eval-results", default="", help="JSON of eval scores (mixlm eval / lm-eval output)")


def card_options(args: argparse.Namespace, default_name: str = ""):
    from mixlm.errors import ExportError
    from mixlm.hf.provenance import CardOptions

    results = None
    if args.eval_results:
        try:
            with open(args.eval_results) as f:
                results = json.load(f)
            from mixlm.model_card import eval_scores_from_json

            eval_scores_from_json(results)  # fail now, naming the file, not halfway through
        except (OSError, ValueError) as e:
            raise ExportError(f"--eval-results {args.eval_results}: {e}") from None
    return CardOptions(name=args.name or default_name, license=args.license, datasets=list(args.dataset),
                       hardware=args.hardware, train_seconds=args.train_hours * 3600 or None,
                       eval_results=results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run output folder, its checkpoints/ folder, or one step folder")
    parser.add_argument("out_dir", help="the transformers folder to write (must not exist unless --overwrite)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights dtype in the safetensors files (default float32)")
    parser.add_argument("--tokenizer", default="", help="HF tokenizer folder or hub name (default: data.tokenizer)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits of our Flax model and the exported model before OUT_DIR is put in "
                             "place; fail above 1e-4 (OUT_DIR is then left as it was)")
    parser.add_argument("--max-shard-size", default="5GB", help="split safetensors above this (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_card_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixlm.checkpoint import CheckpointError
    from mixlm.errors import ExportError
    from mixlm.hf.export import export_hf
    from mixlm.hf.param_readers import open_checkpoint
    from mixlm.hf.verify import verify_export

    def verify(folder: Path) -> None:  # runs on the finished hidden folder, before it becomes OUT_DIR
        report = verify_export(source, folder)
        print(report.summary())
        if not report.passed:
            raise VerifyFailed(report.summary())

    from mixlm import storage
    from mixlm.errors import ConfigError

    storage.check_location(args.checkpoint, "CHECKPOINT")
    for what, value in (("OUT_DIR", args.out_dir), ("--tokenizer", args.tokenizer or "")):
        storage.check_location(value, what)
        if storage.is_remote(value):  # the checkpoint may be on a bucket; what transformers reads may not
            raise ConfigError(f"{what} {value}: mixlm export writes (and reads its tokenizer from) a local folder, "
                              "as transformers does; export to a local disk, then copy the folder to the bucket")
    try:
        source = open_checkpoint(args.checkpoint, step=args.step)
        unverified = ("; it has no file list (the run stopped right after saving it), so each param is checked "
                      "against the value sums saved with it as it is read" if not source.verified else "")
        print(f"exporting {source.description} (step {source.step}, "
              f"{source.cfg.model.name or source.cfg.model.family}){unverified}")
        result = export_hf(source, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer or None,
                           max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                           card=card_options(args, Path(args.out_dir).name), log=print,
                           check=verify if args.verify else None)
        print(f"wrote {result.out_dir}: {result.architecture}, {result.num_params:,} params, "
              f"{result.weight_bytes / 1e9:.2f} GB {args.dtype}, {result.seconds:.1f} s; files: "
              + ", ".join(result.files))
    except VerifyFailed:
        kept = "left as it was" if Path(args.out_dir).exists() else "not written"
        print(f"mixlm export: the exported model's logits differ from ours (see the verify line above): "
              f"{args.out_dir} {kept}. Report it with the command you ran", file=sys.stderr)
        return 1
    except CheckpointError as e:  # damaged files in the step: the message names it and what to do
        print(f"mixlm export: {e}", file=sys.stderr)
        return 4
    except ExportError as e:
        print(f"mixlm export: {e}", file=sys.stderr)
        return 2
    return 0
