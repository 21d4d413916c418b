"""Data throughput: `prepare` tokens/s with a real tokenizer, and loader tokens/s delivered to the host.

A 17-domain mixture (RegMix's Pile domains, weights = their natural token shares from
../shared/data/regmix/pile_token_prior.yaml, else configs/mixtures/pile-17-token-prior.yaml) over synthetic
documents; the loader runs at seq 2048, global batch 64 on one host. The reference: one host of 8xH100
training regmix-1b at 50% MFU consumes about 0.5M tokens/s; the target is >= 10x that (5M tokens/s) per
host. Prints a markdown table (with the machine) and, with --save, writes benchmarks/results/data_throughput.md.
Never asserts a time.

    python benchmarks/data_throughput.py --save
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NEEDED_PER_HOST = 0.5e6  # tokens/s: one 8xH100 host, regmix-1b, 50% MFU

SYLLABLES = ["ta", "ri", "on", "el", "an", "ko", "mu", "se", "la", "di", "ve", "or", "it", "ne", "pa", "to", "re",
             "si", "al", "be", "ca", "de", "ga", "ho", "in", "ju", "ke", "lo", "ma", "no", "pe", "qu", "ra", "so",
             "tu", "un", "vi", "wa", "ye", "za", "ch", "sh", "th", "st", "pr", "tr"]  # fmt: skip
FUNCTION_WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by",
                  "on", "not", "this", "are", "or", "from", "at", "which"]  # fmt: skip


from machine import describe_machine as machine  # benchmarks/machine.py


def write_corpus(
    root: Path, weights: dict[str, float], total_tokens: int, min_tokens: int, seed: int
) -> dict:
    """One jsonl per domain of pseudo-words; roughly `total_tokens` tokens split by weight (>= min_tokens)."""
    import json

    rng = np.random.default_rng(seed)
    words = np.array(
        ["".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(4000)]
        + FUNCTION_WORDS * 100
    )
    root.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, w in weights.items():
        budget_words = max(int(w * total_tokens), min_tokens) // 2  # ~2 tokens per pseudo-word
        path = root / f"{name}.jsonl"
        with open(path, "w") as f:
            while budget_words > 0:
                n = int(min(max(rng.lognormal(6.0, 1.0), 20), 20000))
                f.write(json.dumps({"text": " ".join(rng.choice(words, size=n))}) + "\n")
                budget_words -= n
        sources[name] = str(path)
    return sources


def bench_prepare(sources: dict, out: Path, tokenizer: str, workers: int) -> tuple[float, int, float]:
    from mixlm.data.prepare import PrepareOptions, prepare_domains
    from mixlm.data.tokenizer import load_tokenizer_spec

    shutil.rmtree(out, ignore_errors=True)
    load_tokenizer_spec(tokenizer)  # pay the one-off transformers import outside the timing
    t0 = time.perf_counter()
    manifests = prepare_domains(
        sources,
        out,
        PrepareOptions(tokenizer=tokenizer, workers=workers, progress=False, shard_tokens=2_000_000),
    )
    secs = time.perf_counter() - t0
    tokens = sum(m.tokens for m in manifests.values())
    return tokens / secs, tokens, secs


def bench_loader(
    prepared: Path,
    weights: dict,
    vocab: int,
    packing: str,
    workers: int,
    batches: int,
    seq_len: int,
    batch: int,
    threads: int,
) -> float:
    from mixlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from mixlm.data.pipeline import PreparedMixtureSource

    cfg = ExperimentConfig(
        model=ModelConfig(vocab_size=vocab),
        data=DataConfig(
            source="prepared",
            prepared_dir=str(prepared),
            mixture=weights,
            seq_len=seq_len,
            packing=packing,
            num_workers=workers,
        ),
        train=TrainConfig(steps=0, global_batch_size=batch),
    )
    source = PreparedMixtureSource(cfg, verbose=False, read_threads=threads)
    for _ in range(3):  # warm-up: worker start, first reads
        source.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        source.next_batch()
    secs = time.perf_counter() - t0
    source.close()
    return batches * batch * seq_len / secs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total-tokens", type=float, default=6e6, help="synthetic corpus size (approx.)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--loader-workers", default="0,1,2", help="data.num_workers values to time")
    parser.add_argument("--prepare-workers", default="1,2")
    parser.add_argument("--threads", type=int, default=2, help="read threads per process")
    parser.add_argument("--workdir", default="", help="keep data here (default: a temp folder)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/data_throughput.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*starts repeating")  # small synthetic domains repeat

    prior_path = SHARED / "regmix" / "pile_token_prior.yaml"
    if not prior_path.is_file():
        prior_path = REPO / "configs" / "mixtures" / "pile-17-token-prior.yaml"
    weights = {
        k.replace("train_the_pile_", ""): float(v) for k, v in yaml.safe_load(prior_path.read_text()).items()
    }
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mixlm-data-bench-"))
    sources = write_corpus(
        work / "raw", weights, int(args.total_tokens), min_tokens=4 * (args.seq_len + 1), seed=0
    )
    tokenizer = SHARED / "tokenizers" / "gpt-neox"
    if tokenizer.is_dir():
        tok_note = "gpt-neox (50,277 tokens)"
    else:
        from mixlm.data.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(
            {k: v for k, v in list(sources.items())[:3]}, work / "tok", vocab_size=8192
        )
        tok_note = "byte-level BPE 8192 trained here (gpt-neox folder not found)"
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer)))

    rows = []
    prepared = None
    for w in [int(x) for x in args.prepare_workers.split(",") if x]:
        out = work / f"prepared-w{w}"
        rate, tokens, secs = bench_prepare(sources, out, str(tokenizer), w)
        rows.append(
            (
                f"prepare, {w} tokenizer process{'es' if w > 1 else ''}",
                rate,
                f"{tokens / 1e6:.1f}M tokens in {secs:.1f}s, {tok_note}",
            )
        )
        prepared = out
    for packing in ("concat", "first_fit"):
        for w in [int(x) for x in args.loader_workers.split(",") if x]:
            rate = bench_loader(
                prepared, weights, vocab, packing, w, args.batches, args.seq_len, args.batch, args.threads
            )
            where = "in the trainer process" if w == 0 else f"{w} worker process{'es' if w > 1 else ''}"
            rows.append(
                (
                    f"loader, {packing} packing, {where}",
                    rate,
                    f"{rate / NEEDED_PER_HOST:.1f}x of 0.5M tokens/s; {args.threads} read threads/process",
                )
            )

    lines = [
        "# Data throughput",
        "",
        f"Machine: {machine()}.",
        (
            f"Corpus: 17 Pile domains (weights: {prior_path.name}), synthetic pseudo-word documents "
            f"(lognormal lengths), ~{args.total_tokens / 1e6:.0f}M tokens; loader at seq {args.seq_len}, global "
            f"batch {args.batch}, one host, {args.batches} timed batches after 3 warm-up batches, shards in the "
            "page cache."
        ),
        "Reference: one 8xH100 host training regmix-1b at 50% MFU consumes about 0.5M tokens/s; target >= 5M/host.",
        "",
        "| what | tokens/s | notes |",
        "|---|---:|---|",
    ] + [f"| {what} | {rate:,.0f} | {note} |" for what, rate, note in rows]
    lines += [
        "",
        "The loader rows are host-side work only (no device transfer). Analysis of these numbers (hand-written,",
        "not by this script): benchmarks/results/data_throughput_notes.md.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.save:
        out = REPO / "benchmarks" / "results" / "data_throughput.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
