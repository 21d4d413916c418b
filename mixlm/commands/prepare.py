"""`mixlm prepare`: tokenize raw documents per domain into shuffled ArrayRecord shards + manifests.

    mixlm prepare --out data/prepared --tokenizer data/tokenizer \
        --domain arithmetic=data/raw/arithmetic.jsonl --domain code=data/raw/code/ \
        --domain wiki='hf:wikitext?config=wikitext-103-raw-v1&split=train' --workers 8
    mixlm prepare ... --engine ray --ray-address HEAD:6379     # the same bytes, on a Ray cluster

Sources: see mixlm/data/inputs.py (files, folders, hf:..., tfds:...; `?text_field=...` per source).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixlm.commands.engine_options import add_engine_arguments, add_workers_argument, engine_from_args
from mixlm.config import read_yaml_file
from mixlm.data.prepare import PreparedFolderLockedError, PrepareOptions, prepare_domains
from mixlm.engine import EngineError
from mixlm.errors import PrepareError, ShardError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: one sub-folder per domain")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder or hub name")
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="a domain and one source (file, folder, hf:NAME, tfds:NAME); repeat per source",
    )
    parser.add_argument("--domains-file", help="YAML mapping domain: source (or a list of sources)")
    parser.add_argument(
        "--text-field", default="text", help="field holding the text in jsonl / parquet / hf / tfds"
    )
    parser.add_argument(
        "--bos", action="store_true", help="prepend the tokenizer's bos token to each document"
    )
    parser.add_argument("--no-eos", action="store_true", help="do not append the eos token")
    parser.add_argument("--seed", type=int, default=0, help="shuffle / validation-split seed")
    parser.add_argument("--validation-fraction", type=float, default=0.01)
    parser.add_argument(
        "--validation-docs", type=int, default=0, help="> 0: hold out exactly this many documents"
    )
    parser.add_argument("--shard-tokens", type=int, default=50_000_000, help="target train tokens per shard")
    add_engine_arguments(parser, workers=False)
    add_workers_argument(parser, ", each tokenizing one input file and writing one shard at a time")
    parser.add_argument("--batch-docs", type=int, default=256, help="documents per tokenizer call")
    parser.add_argument("--chunk-docs", type=int, default=50_000, help="documents per resumable chunk")
    parser.add_argument(
        "--strict", action="store_true", help="malformed input is an error (default: counted)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace domains prepared with other inputs")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the tokenized chunks in <domain>/.work"
    )
    parser.add_argument(
        "--max-document-chars",
        type=int,
        default=PrepareOptions.max_document_chars,
        help="longest text tokenized whole: a longer document is tokenized in pieces when the tokenizer "
        "allows (byte-level BPE), else refused naming it (whole, a fast tokenizer takes ~170 bytes of memory "
        "per character)",
    )


def parse_domains(pairs: list[str], domains_file: str | None) -> dict[str, list[str]]:
    domains: dict[str, list[str]] = {}
    if domains_file:
        raw = read_yaml_file(Path(domains_file)) or {}
        if not isinstance(raw, dict):
            raise PrepareError(f"{domains_file}: expected a mapping of domain: source(s)")
        for name, src in raw.items():
            domains.setdefault(str(name), []).extend([src] if isinstance(src, str) else list(src))
    for pair in pairs:
        name, sep, src = pair.partition("=")
        if not sep or not name or not src:
            raise PrepareError(f"--domain {pair!r}: expected NAME=SOURCE, e.g. --domain code=data/raw/code/")
        domains.setdefault(name, []).append(src)
    if not domains:
        raise PrepareError("no domains: pass --domain NAME=SOURCE (repeatable) or --domains-file FILE")
    return domains


def run(args: argparse.Namespace) -> int:
    from mixlm import storage
    from mixlm.errors import ConfigError

    storage.check_location(args.out, "--out")
    if storage.is_remote(args.out):
        raise ConfigError(f"--out {args.out}: mixlm prepare writes to a local folder only; prepare there, then copy "
                          "the folder to the bucket (gcloud storage cp -r / aws s3 sync): training, sweeps and eval "
                          "read data.prepared_dir=gs://... or s3://... directly")
    options = PrepareOptions(
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        append_eos=not args.no_eos,
        prepend_bos=args.bos,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        validation_docs=args.validation_docs,
        shard_tokens=args.shard_tokens,
        workers=args.workers or 1,
        batch_docs=args.batch_docs,
        chunk_docs=args.chunk_docs,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        keep_work=args.keep_work,
        max_document_chars=args.max_document_chars,
    )
    domains = parse_domains(args.domain, args.domains_file)
    try:
        with engine_from_args(args, progress=options.progress) as engine:
            prepare_domains(domains, args.out, options, engine)
    except PreparedFolderLockedError as e:  # another prepare writes there: a usage error, as for train
        print(f"mixlm prepare: error: {e}", file=sys.stderr)
        return 2
    except (PrepareError, ShardError, EngineError) as e:
        print(f"mixlm prepare: error: {e}", file=sys.stderr)
        return 1
    return 0
