"""`mixlm tokenizer train`: a byte-level BPE on chosen domains, saved as a HF tokenizer folder.

    mixlm tokenizer train --out data/tokenizer --vocab-size 8192 \
        --domain arithmetic=data/raw/arithmetic.jsonl --domain prose=data/raw/prose.jsonl
"""

from __future__ import annotations

import argparse
import sys

from mixlm.commands.engine_options import add_engine_arguments, add_workers_argument, engine_from_args
from mixlm.commands.prepare import parse_domains
from mixlm.data.tokenizer import train_tokenizer
from mixlm.engine import EngineError
from mixlm.errors import PrepareError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="train a byte-level BPE and save a HF tokenizer folder")
    train.add_argument("--out", required=True, help="tokenizer folder to write")
    train.add_argument("--vocab-size", type=int, default=8192, help="tokens, specials included")
    train.add_argument("--min-frequency", type=int, default=2, help="a pair merges only if seen this often")
    train.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="training text (same sources as `mixlm prepare`); repeatable",
    )
    train.add_argument("--domains-file", help="YAML mapping domain: source(s)")
    train.add_argument("--text-field", default="text", help="field holding the text in jsonl / parquet / hf / tfds")
    train.add_argument("--max-docs-per-domain", type=int, default=0, help="0: every document")
    train.add_argument("--no-progress", action="store_true", help="no progress bar and summary on stderr")
    add_engine_arguments(train, workers=False)
    add_workers_argument(train, ", each reading one input file ahead of the trainer")


def run(args: argparse.Namespace) -> int:
    try:
        domains = parse_domains(args.domain, args.domains_file)
        with engine_from_args(args, progress=False) as engine:
            out = train_tokenizer(
                domains,
                args.out,
                vocab_size=args.vocab_size,
                min_frequency=args.min_frequency,
                text_field=args.text_field,
                max_docs_per_domain=args.max_docs_per_domain,
                progress=not args.no_progress,
                engine=engine,
            )
    except (PrepareError, EngineError) as e:
        print(f"mixlm tokenizer train: error: {e}", file=sys.stderr)
        return 1
    if args.no_progress:
        print(f"tokenizer written to {out}")
    return 0
