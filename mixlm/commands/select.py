"""`mixlm select`: quality signals → weighted percentile score → the best documents up to a budget.

  mixlm select signals DOCS.jsonl.zst ... --out SIG [--tokenizer TOK] [--rating-columns a,b] [--workers N]
                    [--classifier CLF] [--perplexity LM_DIR] [--model NAME=DIR ...] [--no-rules]
  mixlm select rate DOCS.jsonl.zst ... --model fineweb_edu=DIR [--model NAME=DIR ...] --out SIG4
                    [--config configs/selection/metarater-25.yaml] [--columns NAME=a,b] [--device cuda]
  mixlm select pick --signals SIG [SIG2 ...] --weights W.yaml (--budget 2B | --top-fraction 0.1)
                    --out SEL [--random-out RND --seed 0] [--plot] [--prepare-out PREP --tokenizer TOK]
  mixlm select pick --signals SIG --mode dsir-resample --signal dsir_books --budget 2M --seed 0 --out SEL
  mixlm select dsir DOCS.jsonl.zst ... --target books=BOOKS.jsonl [--target wiki=WIKI.jsonl] --out SIG3
                    [--buckets 10000] [--raw SAMPLE.jsonl]   (or --model SIG3/dsir_model.npz: score alike)
  mixlm select classifier train --pos POS.jsonl --neg NEG.jsonl --out CLF [--backend sklearn|fasttext]
                    [--preset dclm] [--fasttext-option bucket=100000]
  mixlm select classifier score DOCS.jsonl.zst ... --model CLF --out SIG2
  mixlm select weightings --signals a,b,c --n 64 --seed 0 --out WDIR     (Meta-rater rater weightings)
  mixlm select metarater --signals SIG --raters a,b:low,c --n 64 --budget 2M --base PROXY.yaml
                    --tokenizer TOK --heldout REF.jsonl --out MDIR      (learned rater weights → MDIR/weights.yaml)
  mixlm select run configs/selection/dclm-baseline.yaml --input DOCS.jsonl.zst ... --out OUT
                    [--pos POS.jsonl --neg NEG.jsonl | --model CLF]  (a chain of stages; OUT/report.json)
  mixlm select dedup DOCS.jsonl.zst ... --method exact|minhash|bloom --out OUT [--threshold 0.8 --ngram 5 ...]
  mixlm select list                                                       (the rule-based signals)

Every verb that reads documents (signals, rate, classifier score, dsir, pick, run, dedup) takes --engine local
(--workers N processes on this host) or --engine ray [--ray-address HOST:PORT] (tasks on a Ray cluster): the same
output bytes either way. A second job writing the same --out folder is refused.

`signals` computes the rule signals (`mixlm select list`) and, with the flags, classifier scores, perplexity
(perplexity_nll, perplexity_bpb) and model-rater columns; `rate` only the model raters (HF classification /
regression folders, or every model a rater config lists).

A weights file is YAML `{signal: weight}` or `{signal: {weight: w, higher_is_better: false}}`; `--weights`
also takes the mapping inline, e.g. `--weights '{classifier_score: 1}'`. The DCLM filter is
`classifier score` then `pick --weights '{classifier_score: 1}' --top-fraction 0.1`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import re
import sys
from pathlib import Path

import yaml

from mixlm.commands.engine_options import add_engine_arguments, engine_from_args
from mixlm.config import load_yaml, read_yaml_file
from mixlm.data.inputs import counted
from mixlm.engine import EngineError
from mixlm.errors import ConfigError
from mixlm.folder_lock import writer_lock
from mixlm.selection import SelectionError

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_amount(text: str) -> float:
    """'2B' → 2e9, '500M' → 5e8, '1e6' → 1e6, '12000' → 12000."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?)\s*", text)
    try:
        value = float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1) if m else None
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount like 12000, 1e9, 500M or 2B")
    return value


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="document shards: .jsonl (.gz, .zst) or .parquet")
    p.add_argument("--out", required=True, help="folder for the per-shard signal tables")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (a.b for nested)")
    p.add_argument("--tokenizer", help="HF tokenizer folder or hub name: adds num_tokens for token budgets")
    add_engine_arguments(p)
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="table format")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of counting it")
    p.add_argument("--overwrite", action="store_true", help="recompute shards that already have tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = __doc__.split("\n", 2)[2]  # the usage lines above
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("signals", help="rule-based signals (+ rating columns, classifier) per document")
    _add_input_args(p)
    p.add_argument("--rating-columns", default="",
                   help="comma-separated numeric fields of the input to keep as signals (PRRC, QuRating ...)")
    p.add_argument("--classifier", help="also score with this classifier folder")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a classifier folder of an older version (a pickled model.joblib, which can run code): "
                   "only for folders you trust; it is converted to model.npz once")
    p.add_argument("--no-rules", action="store_true", help="skip the rule-based signals")
    p.add_argument("--perplexity", metavar="MODEL_DIR",
                   help="also perplexity_nll (mean nats per token) and perplexity_bpb (bits per byte) under this "
                   "causal LM: a local HF folder (a `mixlm export` output included) or a mixlm run / checkpoint folder")

    def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--model", action="append", default=[], required=required, metavar="NAME=DIR",
                       help="rate with this local HF sequence-classification / regression folder (or a mixlm "
                       "linear-head rater); one output → column NAME, K outputs → NAME_<label> (repeatable)")
        p.add_argument("--columns", action="append", default=[], metavar="NAME=a,b,...",
                       help="names of rater NAME's outputs, in order (default: its config.id2label)")
        p.add_argument("--activation", action="append", default=[], metavar="NAME=auto|none|sigmoid|softmax",
                       help="applied to rater NAME's outputs (auto: from its problem_type)")
        p.add_argument("--batch-size", type=int, default=32, help="documents per model forward pass")
        p.add_argument("--max-length", type=int, default=512, help="tokens per document (longer ones truncated); "
                       "perplexity's window")
        p.add_argument("--device", default="auto", help="torch device of HF models: auto | cpu | cuda | cuda:N")

    add_model_args(p, required=False)

    p = sub.add_parser("rate", help="model ratings (FineWeb-Edu, PRRC, QuRating ... classifiers) per document")
    _add_input_args(p)
    p.add_argument("--config", help="a rater config (configs/selection/metarater-25.yaml): rate with every model it "
                   "lists, folders from --model NAME=DIR (or its models.NAME.path)")
    add_model_args(p, required=False)

    p = sub.add_parser("pick", help="combine signals with weights and keep the best documents")
    p.add_argument("--signals", nargs="+", required=True, help="signal folders (joined on file and line)")
    p.add_argument("--weights", help="weights YAML file, or an inline YAML mapping (mode top)")
    p.add_argument("--mode", choices=("top", "dsir-resample"), default="top",
                   help="top: best weighted score; dsir-resample: sample without replacement proportional to "
                   "exp(--signal), a DSIR log importance weight (seeded by --seed)")
    p.add_argument("--signal", help="with --mode dsir-resample: the log-weight column, e.g. dsir_books")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--budget", type=parse_amount, help="keep the best documents up to this many units")
    group.add_argument("--top-fraction", type=float, help="keep this fraction of the documents")
    p.add_argument("--budget-unit", choices=("tokens", "words", "chars"),
                   help="size column for the budget (default tokens; chars for --top-fraction without tokens)")
    p.add_argument("--out", required=True, help="folder for documents.jsonl.zst and report.json")
    p.add_argument("--random-out", help="also write a seeded random selection of the same budget here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (and of dsir-resample)")
    p.add_argument("--plot", action="store_true", help="write signals.png (histograms: all / top / random)")
    p.add_argument("--prepare-out", help="also run `mixlm prepare` on the selection(s) into this folder; the "
                   "domain is named after --out (and --random-out)")
    p.add_argument("--tokenizer", help="with --prepare-out: the HF tokenizer folder or hub name to prepare with")
    p.add_argument("--mix-field", default="domain",
                   help="document field (a.b for nested) the selection's mix is reported by; documents without it "
                   "count under their input file's name")
    add_engine_arguments(p)

    p = sub.add_parser("classifier", help="DCLM-style classifier: train | score")
    csub = p.add_subparsers(dest="classifier_action", required=True, metavar="train|score")
    t = csub.add_parser("train", help="fit on positive and negative documents")
    t.add_argument("--pos", nargs="+", required=True, help="positive (high-quality) jsonl files")
    t.add_argument("--neg", nargs="+", required=True, help="negative jsonl files")
    t.add_argument("--out", required=True, help="model folder")
    t.add_argument("--backend", choices=("sklearn", "fasttext"), help="default sklearn, or the preset's")
    t.add_argument("--preset", choices=("dclm",),
                   help="a published recipe: dclm = fastText, wordNgrams 2, DCLM's hyper-parameters")
    t.add_argument("--fasttext-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fastText setting (repeatable), e.g. bucket=100000 dim=64")
    t.add_argument("--signal", default="classifier_score", help="name of the score column it produces")
    t.add_argument("--text-field", default="text")
    t.add_argument("--max-docs", type=int, help="use at most this many documents per class")
    t.add_argument("--val-fraction", type=float, default=0.1, help="held out per class for the metrics")
    t.add_argument("--seed", type=int, default=0)
    s = csub.add_parser("score", help="score documents: one table per shard, like `signals`")
    _add_input_args(s)
    s.add_argument("--model", required=True, help="model folder from `classifier train`")
    s.add_argument("--signal", help="score column name (default: the one saved with the model)")
    s.add_argument("--trust-pickle", action="store_true",
                   help="load a classifier folder of an older version (a pickled model.joblib, which can run code): "
                   "only for folders you trust; it is converted to model.npz once")

    p = sub.add_parser("dsir", help="DSIR log importance weights, one column dsir_<target> per target")
    p.add_argument("inputs", nargs="+", help="document shards: .jsonl (.gz, .zst) or .parquet")
    p.add_argument("--out", required=True, help="folder for the per-shard signal tables and dsir_model.npz")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (a.b for nested)")
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="table format")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of counting it")
    p.add_argument("--overwrite", action="store_true", help="recompute shards that already have tables")
    p.add_argument("--target", action="append", default=[], metavar="NAME=PATH",
                   help="target documents (repeatable; a name given twice pools its files)")
    p.add_argument("--raw", nargs="+", help="fit the raw model on these files instead of the inputs")
    p.add_argument("--model", help="score with a saved model (an earlier run's dsir_model.npz) instead of fitting")
    add_engine_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--buckets", type=int, default=10_000, help="hash buckets of the n-gram features")
    p.add_argument("--ngrams", type=int, default=2, help="1 = unigrams, 2 = unigrams + bigrams")
    p.add_argument("--smoothing", type=float, default=1.0, help="pseudo-count added to every bucket")

    p = sub.add_parser("run", help="run a chain of selection stages (e.g. configs/selection/dclm-baseline.yaml)")
    p.add_argument("config", help="pipeline YAML: text_field and stages")
    p.add_argument("--input", nargs="+", required=True, help="document shards: .jsonl (.gz, .zst) or .parquet")
    p.add_argument("--out", required=True, help="folder: one NN-<stage> folder per stage and report.json")
    p.add_argument("--pos", nargs="+", help="classifier stage: positive (high-quality) training files")
    p.add_argument("--neg", nargs="+", help="classifier stage: negative training files")
    p.add_argument("--model", help="classifier stage: a trained classifier folder instead of --pos/--neg")
    add_engine_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace stage outputs left by a run with other settings or inputs (matching ones are reused)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input line instead of counting it")

    p = sub.add_parser("dedup", help="remove duplicate documents: exact, MinHash-LSH or Bloom filter (as in `run`)")
    p.add_argument("inputs", nargs="+", help="document files: .jsonl(.gz/.zst) or .parquet")
    p.add_argument("--method", choices=("exact", "minhash", "bloom"), required=True,
                   help="exact: same normalised text; minhash: Jaccard similarity of word shingles; bloom: share of "
                   "word n-grams seen before (DCLM's BFF)")
    p.add_argument("--out", required=True, help="folder for documents.jsonl.zst (the kept documents) and report.json")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (a.b for nested)")
    p.add_argument("--threshold", type=float, help="minhash: Jaccard similarity of duplicates (default 0.8); bloom: "
                   "share of a document's n-grams seen before (default 0.8)")
    p.add_argument("--ngram", type=int, help="words per shingle / n-gram (default: minhash 5, bloom 13)")
    p.add_argument("--num-perm", type=int, help="minhash: MinHash values per document (default 112)")
    p.add_argument("--bands", type=int, help="minhash: LSH bands (default: chosen for the threshold)")
    p.add_argument("--rows", type=int, help="minhash: rows per band (bands x rows = num-perm)")
    p.add_argument("--seed", type=int, help="minhash: seed of the hash permutations (default 0)")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="minhash: link every LSH candidate pair without checking its estimated similarity")
    p.add_argument("--expected-ngrams", type=int, help="bloom: distinct n-grams the filter is sized for (default 1e7)")
    p.add_argument("--false-positive-rate", type=float, help="bloom: of the filter (default 0.01)")
    p.add_argument("--paragraphs", action="store_true", default=None,
                   help="bloom: also remove duplicate paragraphs (lines) inside documents (DCLM)")
    p.add_argument("--min-words", type=int, help="bloom --paragraphs: drop a document left with fewer words")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input line instead of counting it")
    p.add_argument("--overwrite", action="store_true", help="replace the output of a run with other settings")
    add_engine_arguments(p)

    p = sub.add_parser("weightings", help="Dirichlet weightings over raters (Meta-rater)")
    p.add_argument("--signals", required=True, help="comma-separated rater / signal names")
    p.add_argument("--n", type=int, required=True, help="number of weightings")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of every rater")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for weighting_NNNN.yaml files and weightings.csv")

    p = sub.add_parser("metarater", help="learn rater weights: a proxy per weighting, fit, optimise (Meta-rater)")
    p.add_argument("--signals", nargs="+", required=True, help="signal folders of the document pool")
    p.add_argument("--raters", required=True,
                   help="comma-separated signal names; suffix :high or :low states a direction (a:high,b:low)")
    wgroup = p.add_mutually_exclusive_group(required=True)
    wgroup.add_argument("--n", type=int, help="sample this many weightings (Dirichlet over the raters)")
    wgroup.add_argument("--weightings", help="a `select weightings` folder or CSV: index + one column per rater")
    p.add_argument("--budget", type=parse_amount, required=True, help="selection budget of every proxy")
    p.add_argument("--budget-unit", choices=("tokens", "words", "chars"), default="tokens")
    p.add_argument("--base", required=True, help="proxy experiment YAML (data.prepared_dir / mixture are set per run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override applied to every proxy (repeatable)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder or hub name to prepare selections with")
    p.add_argument("--heldout", nargs="+", required=True,
                   help="document files, disjoint from the pool, every proxy is scored on")
    p.add_argument("--heldout-name", default="heldout", help="domain name of the held-out set")
    p.add_argument("--out", required=True, help="folder: selections/, prepared/, runs/, results.csv, fit/, weights.yaml")
    p.add_argument("--regressors", default="loglinear,linear,lightgbm", help="regressors to fit (best k-fold Spearman is used)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--samples", type=int, default=100_000, help="weightings simulated by the optimiser")
    p.add_argument("--top-k", type=int, default=128, help="optimum = mean of the top-k simulated weightings")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of every rater")
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("list", help="print the rule-based signals, their default direction and definition")


def _load_weights(text: str) -> dict:
    path = Path(text)
    try:
        spec = read_yaml_file(path) if path.is_file() else load_yaml(text, f"--weights {text!r}")
    except ConfigError as e:
        raise SelectionError(str(e)) from None
    if not isinstance(spec, dict):
        raise SelectionError(f"--weights {text!r}: expected a YAML file or inline mapping {{signal: weight}}")
    return spec


def _read_texts(paths: list[str], text_field: str, limit: int | None) -> list[str]:
    from mixlm.selection.documents import BadLines, read_texts

    bad = BadLines()
    texts = read_texts(paths, text_field, limit, bad=bad)
    if bad.counts:
        print(f"skipped {_bad_lines(dict(bad.counts))}; e.g. {bad.examples[0]}", file=sys.stderr)
    return texts


def _prepare(selection_dirs: list[str], prepare_out: str, tokenizer: str) -> None:
    """Each selection folder becomes a prepared domain named after it, under `prepare_out`."""
    from mixlm.data.prepare import PrepareOptions, prepare_domains

    domains = {Path(d).resolve().name: [str(Path(d) / "documents.jsonl.zst")] for d in selection_dirs}
    prepare_domains(domains, prepare_out, PrepareOptions(tokenizer=tokenizer, progress=False))


def _fasttext_options(items: list[str]) -> dict:
    """['bucket=100000', 'lr=0.05'] → {'bucket': 100000, 'lr': 0.05} (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SelectionError(f"--fasttext-option {item!r}: write KEY=VALUE, e.g. bucket=100000")
        out[key] = load_yaml(value, f"--fasttext-option {item!r}")
    return out


def _tokenizer_arg(value: str | None) -> str | None:
    # A local folder is stored resolved (the settings are compared on rerun); a hub name as given.
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def _compute(args, settings) -> int:
    from mixlm.selection.signal_tables import compute_tables

    with _job(args, args.out) as engine:
        report = compute_tables(args.inputs, args.out, settings, strict=args.strict, overwrite=args.overwrite,
                                progress=not args.no_progress, engine=engine)
    print(f"{counted(report['documents'], 'document')} in {counted(report['shards'], 'shard')} → {args.out} "
          f"({report['seconds']:.1f} s)", flush=True)
    _print_skipped(report["malformed"], report["malformed_examples"])
    return 0


def _print_skipped(counts: dict[str, int], examples: list[str], what: str = "") -> None:
    """'skipped 3 bad lines (2 invalid json, 1 empty) <what>; e.g.' and the examples, on stderr (nothing when
    none were skipped)."""
    if sum(counts.values()):
        print(f"skipped {_bad_lines(counts)}{' ' + what if what else ''}; e.g.", file=sys.stderr)
        for example in examples:  # each whole: file:line: kind: detail
            print(f"  {example}", file=sys.stderr)


def _mix_line(mix: dict, unit: str, total: int, shown: int = 12) -> str:
    """'mix by domain (share of tokens): web 61.2% (80 documents), code 30.1% (40 documents), ...'."""
    groups = list(mix["groups"].items())
    parts = [f"{name} {100 * g[unit] / max(total, 1):.1f}% ({counted(g['documents'], 'document')})"
             for name, g in groups[:shown]]
    if len(groups) > shown:
        parts.append(f"and {len(groups) - shown} more (report.json)")
    by = f"{mix['field']} (or input file)" if mix["field"] else "input file"
    return f"mix by {by}, share of {unit}: " + (", ".join(parts) or "no documents")


def _bad_lines(counts: dict[str, int]) -> str:
    """'3 bad lines (2 invalid json, 1 empty)'."""
    kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items())
    return f"{counted(sum(counts.values()), 'bad line')} ({kinds})"


def _classifier_dir(path: str, trust_pickle: bool) -> str:
    """The absolute classifier folder; with --trust-pickle an older folder's pickle is converted to model.npz
    first (the workers load only model.npz and refuse a pickle)."""
    from mixlm.selection.classifier import convert_pickled_classifier

    model_dir = Path(path).resolve()
    if trust_pickle and convert_pickled_classifier(model_dir):
        print(f"converted {model_dir}/model.joblib to model.npz: later runs load it without --trust-pickle",
              file=sys.stderr)
    return str(model_dir)


class SelectFolderLockedError(SelectionError):
    """Another `mixlm select` is writing the output folder."""


@contextlib.contextmanager
def _job(args, *outs: str | None):
    """The engine the flags ask for, with the lock of each output folder held: a second job writing one of
    them is refused in one line."""
    inputs = getattr(args, "inputs", None) or getattr(args, "input", None)
    if inputs:  # missing, remote or unreadable inputs are refused before any output folder is made
        from mixlm.selection.documents import resolve_inputs

        resolve_inputs([inputs] if isinstance(inputs, str) else inputs)
    with contextlib.ExitStack() as stack:
        for out in outs:
            if out:
                stack.enter_context(writer_lock(Path(out), f"mixlm select {args.action}", SelectFolderLockedError))
        yield stack.enter_context(engine_from_args(args, progress=not getattr(args, "no_progress", False)))


def _run(args) -> int:
    from mixlm.selection.signal_tables import TableSettings

    if args.action == "list":
        from mixlm.selection.signals import SIGNALS

        direction = {True: "higher", False: "lower", None: "(state it)"}
        width = max(len(spec.name) for spec in SIGNALS)
        for spec in SIGNALS:
            print(f"{spec.name:{width}s} {direction[spec.higher_is_better]:10s} {spec.doc}")
        return 0
    if args.action in ("signals", "rate"):
        from mixlm.selection.model_raters import model_table_fields

        model_fields = model_table_fields(
            args.model, args.columns, args.activation, config=getattr(args, "config", None),
            perplexity=getattr(args, "perplexity", None), device=args.device, batch_size=args.batch_size,
            max_length=args.max_length)
        if args.action == "rate":
            if not model_fields["model_raters"]:
                raise SelectionError("select rate: give at least one --model NAME=DIR (or a --config listing models)")
            return _compute(args, TableSettings(text_field=args.text_field, rules=False, table_format=args.format,
                                                tokenizer=_tokenizer_arg(args.tokenizer), **model_fields))
        columns = tuple(c.strip() for c in args.rating_columns.split(",") if c.strip())
        return _compute(args, TableSettings(
            text_field=args.text_field, rules=not args.no_rules, rating_columns=columns,
            classifier=_classifier_dir(args.classifier, args.trust_pickle) if args.classifier else None,
            tokenizer=_tokenizer_arg(args.tokenizer), table_format=args.format, **model_fields))
    if args.action == "classifier" and args.classifier_action == "score":
        return _compute(args, TableSettings(
            text_field=args.text_field, rules=False, classifier=_classifier_dir(args.model, args.trust_pickle),
            classifier_signal=args.signal,
            tokenizer=_tokenizer_arg(args.tokenizer), table_format=args.format))
    if args.action == "classifier":
        from mixlm.selection.classifier import classifier_preset, train_classifier

        overrides = _fasttext_options(args.fasttext_option)
        preset = classifier_preset(args.preset, overrides) if args.preset else {}
        backend = args.backend or preset.get("backend", "sklearn")
        pos = _read_texts(args.pos, args.text_field, args.max_docs)
        neg = _read_texts(args.neg, args.text_field, args.max_docs)
        meta = train_classifier(pos, neg, args.out, backend=backend, signal=args.signal, seed=args.seed,
                                val_fraction=args.val_fraction,
                                fasttext_options=preset.get("fasttext_options", overrides))
        print(f"{backend} classifier on {counted(meta['train'], 'document')} → {args.out}; held out "
              f"{meta['held_out']}: accuracy {meta.get('held_out_accuracy', float('nan')):.3f}")
        return 0
    if args.action == "pick":
        if args.prepare_out and not args.tokenizer:
            raise SelectionError("--prepare-out needs --tokenizer (the tokenizer to prepare the selection with)")
        from mixlm.selection.pick_documents import select_documents

        if args.mode == "top" and not args.weights:
            raise SelectionError("--weights is needed with --mode top (or use --mode dsir-resample --signal COL)")
        if args.mode == "dsir-resample" and not args.signal:
            raise SelectionError("--mode dsir-resample needs --signal, the log-weight column (e.g. dsir_books)")
        weights = _load_weights(args.weights) if args.weights else None
        with _job(args, args.out, args.random_out) as engine:
            report = select_documents(args.signals, weights, args.out, budget=args.budget,
                                      top_fraction=args.top_fraction, budget_unit=args.budget_unit,
                                      random_out=args.random_out, seed=args.seed, plot=args.plot, mode=args.mode,
                                      resample_signal=args.signal, mix_field=args.mix_field, engine=engine)
        unit = report["budget_unit"]
        print(f"kept {report['documents_out']:,} of {counted(report['documents_in'], 'document')}, "
              f"{report[unit + '_out']:,} of {report[unit + '_in']:,} {unit} → {args.out}")
        if report["score_threshold"] is not None:
            fill = report["fill"]
            print(f"score cutoff {report['score_threshold']:.4f}: the best {report['top_documents']:,} documents "
                  "that fit the budget outright" + (
                      f"; the greedy fill then added {counted(fill['documents'], 'document')} "
                      f"({fill[unit]:,} {unit}) scoring {fill['score_min']:.4f} to {fill['score_max']:.4f}, "
                      "which fit the rest of the budget" if fill["documents"] else ""))
        print(_mix_line(report["mix"], unit, report[unit + "_out"]))
        if args.random_out:
            rnd = report["random_baseline"]
            print(f"random baseline: {counted(rnd['documents_out'], 'document')}, {rnd[unit + '_out']:,} {unit} "
                  f"→ {args.random_out}")
            print("random baseline " + _mix_line(rnd["mix"], unit, rnd[unit + "_out"]))
        if args.prepare_out:
            _prepare([args.out] + ([args.random_out] if args.random_out else []), args.prepare_out, args.tokenizer)
        return 0
    if args.action == "dsir":
        from mixlm.selection.dsir import DSIRSettings, parse_targets, score_dsir

        if not args.target and not args.model:
            raise SelectionError("select dsir needs --target NAME=PATH (one or more), or --model dsir_model.npz")
        with _job(args, args.out) as engine:
            report = score_dsir(args.inputs, parse_targets(args.target), args.out,
                                settings=DSIRSettings(args.buckets, args.ngrams, args.smoothing), raw=args.raw,
                                model_path=args.model, text_field=args.text_field, table_format=args.format,
                                strict=args.strict, overwrite=args.overwrite, engine=engine)
        print(f"{', '.join(report['columns'])} for {counted(report['documents'], 'document')} in "
              f"{counted(report['shards'], 'shard')} → {args.out} ({report['seconds']:.1f} s)")
        _print_skipped(report["fit_malformed"], report["fit_malformed_examples"], "in the files fitted on")
        _print_skipped(report["malformed"], report["malformed_examples"], "in the scored inputs")
        return 0
    if args.action == "run":
        from mixlm.selection.pipeline import load_pipeline, run_pipeline

        config = load_pipeline(args.config, {"pos": args.pos, "neg": args.neg, "model": args.model})
        with _job(args, args.out) as engine:
            result = run_pipeline(config, args.input, args.out, overwrite=args.overwrite,
                                  progress=lambda line: print(line, flush=True), strict=args.strict, engine=engine)
        print(f"kept {result['documents_out']:,} of {counted(result['documents_in'], 'document')} → "
              f"{result['output']}; per stage: {Path(args.out) / 'report.json'}")
        return 0
    if args.action == "dedup":
        from mixlm.selection.pipeline import DOCUMENTS, dedup_documents

        options = {key: getattr(args, key) for key in ("threshold", "ngram", "num_perm", "bands", "rows", "seed",
                                                       "verify", "expected_ngrams", "false_positive_rate",
                                                       "paragraphs", "min_words")}
        with _job(args, args.out) as engine:
            report = dedup_documents(args.inputs, args.out, args.method, options, text_field=args.text_field,
                                     strict=args.strict, overwrite=args.overwrite, engine=engine)
        removed = report["documents_in"] - report["documents_out"]
        extra = f", {report['paragraphs_removed']:,} duplicate paragraphs cut" if "paragraphs_removed" in report else ""
        print(f"dedup {args.method}: kept {report['documents_out']:,} of {counted(report['documents_in'], 'document')} "
              f"({removed:,} removed{extra}) → {Path(args.out) / DOCUMENTS}"
              + (" (up to date: same inputs and settings)" if report["reused"] else f" ({report['seconds']:.1f} s)"))
        _print_skipped(report["malformed"], report["malformed_examples"])
        return 0
    if args.action == "weightings":
        from mixlm.selection.pick import sample_rater_weightings

        signals = [s.strip() for s in args.signals.split(",") if s.strip()]
        weightings = sample_rater_weightings(signals, args.n, args.seed, args.alpha)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "weightings.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", *signals])
            for i, w in enumerate(weightings):
                writer.writerow([i, *(w[s] for s in signals)])
                (out / f"weighting_{i:04d}.yaml").write_text(yaml.safe_dump(w, sort_keys=False))
        print(f"{counted(args.n, 'weighting')} of {counted(len(signals), 'rater')} → {out}")
        return 0
    if args.action == "metarater":
        from mixlm.selection.metarater import learn_rater_weights, parse_raters

        raters = [r.strip() for r in args.raters.split(",") if r.strip()]
        names, _ = parse_raters(raters)
        if args.n is not None:
            from mixlm.selection.pick import sample_rater_weightings

            weightings = sample_rater_weightings(names, args.n, args.seed, args.alpha)
        else:
            from mixlm.mixing.tables import read_csv

            path = Path(args.weightings)
            table = read_csv(path / "weightings.csv" if path.is_dir() else path)
            weightings = {int(i): dict(zip(names, map(float, row)))
                          for i, row in zip(table.index_N, table.select(names, source=str(path)))}
        result = learn_rater_weights(
            args.signals, raters, weightings, args.out, budget=args.budget, budget_unit=args.budget_unit,
            base_config=args.base, overrides=args.overrides, tokenizer=args.tokenizer, heldout=args.heldout,
            heldout_name=args.heldout_name, regressors=[r.strip() for r in args.regressors.split(",") if r.strip()],
            folds=args.folds, n_samples=args.samples, top_k=args.top_k, alpha=args.alpha, seed=args.seed)
        print(f"{len(result.losses)} {'proxy' if len(result.losses) == 1 else 'proxies'} → {result.results_csv}; "
              f"weights → {result.weights_yaml}")
        return 0
    raise AssertionError(args.action)


def run(args: argparse.Namespace) -> int:
    from mixlm.errors import PrepareError

    try:
        return _run(args)
    except (SelectionError, PrepareError) as e:
        print(f"mixlm select: error: {e}", file=sys.stderr)
        return 2
    except EngineError as e:
        print(f"mixlm select: error: {e}", file=sys.stderr)
        return 1
