"""Selection throughput on this CPU: documents/s and tokens/s per core of each `mixlm select` stage, and
what scoring 100B tokens would cost.

Stages: rule signals, DSIR (fit and score, 3 targets as Meta-rater), exact, MinHash-LSH and Bloom dedup, the
fastText classifier (DCLM preset) and the sklearn one, and model raters (Hugging Face sequence classifiers,
randomly initialised: a tiny one and one of BERT-base's shape, the size of FineWeb-Edu's classifier), each
timed in this one process with one thread (OMP/MKL/torch threads = 1), so the rates are per core. The
corpus is synthetic pseudo-word prose (sentences, lines, lognormal lengths); tokens are counted with the
gpt-neox tokenizer (../shared/data/tokenizers/gpt-neox) when it is there. The 100B-token cost assumes
documents of this corpus's mean length and a perfectly parallel stage (MinHash's LSH join is global but a
small part of its time). Prints a markdown table and writes benchmarks/results/selection_throughput_cpu.md
(or --out). Never asserts a time; runs in about three minutes on 2 shared cores.

    python benchmarks/selection_throughput.py [--docs 2000] [--cores 64,1024] [--out PATH]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # per-core rates: before numpy / torch load their thread pools
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe_machine  # benchmarks/machine.py

TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "gpt-neox"
SYLLABLES = ["ta", "ri", "on", "el", "an", "ko", "mu", "se", "la", "di", "ve", "or", "it", "ne", "pa", "to", "re",
             "si", "al", "be", "ca", "de", "ga", "ho", "in", "ju", "ke", "lo", "ma", "no", "pe", "qu", "ra", "so",
             "tu", "un", "vi", "wa", "ye", "za", "ch", "sh", "th", "st", "pr", "tr"]  # fmt: skip
FUNCTION_WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by",
                  "on", "not", "this", "are", "or", "from", "at", "which"]  # fmt: skip


def synthetic_documents(n: int, seed: int) -> list[str]:
    """Pseudo-word prose: sentences of 6-20 words (40% function words), 1-4 sentences a line."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(20000)])
    docs = []
    for _ in range(n):
        words_left = int(min(max(rng.lognormal(6.0, 0.8), 30), 8000))
        lines, sentences = [], []
        while words_left > 0:
            k = int(rng.integers(6, 21))
            words = np.where(rng.random(k) < 0.4, rng.choice(FUNCTION_WORDS, size=k), rng.choice(vocab, size=k))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
            words_left -= k
            if rng.random() < 0.4:
                lines.append(" ".join(sentences))
                sentences = []
        lines.append(" ".join(sentences))
        docs.append("\n".join(line for line in lines if line))
    return docs


def count_tokens(docs: list[str]) -> tuple[np.ndarray, str]:
    if TOKENIZER.is_dir():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
        return np.array([len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False)]), "gpt-neox tokens"
    return np.array([round(1.3 * len(d.split())) for d in docs]), "tokens estimated as 1.3 x words (no tokenizer)"


def timed(fn, docs: list[str]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of fn(docs), after a warm-up call on a few documents. Every
    stage runs on one thread, so CPU seconds are its per-core cost even when other jobs share the host."""
    fn(docs[:8])  # warm-up: imports, caches, first allocations
    cpu, wall = time.process_time(), time.perf_counter()
    fn(docs)
    return time.process_time() - cpu, time.perf_counter() - wall


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _hf_rater(folder: Path, layers: int, d_model: int, heads: int):
    """A randomly initialised BertForSequenceClassification (1 regression output, like FineWeb-Edu's) over the
    gpt-neox tokenizer, saved in `folder`; scored through mixlm's rater when it exists."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50304, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * d_model, max_position_embeddings=512, num_labels=1,
                        problem_type="regression", pad_token_id=1)
    model = BertForSequenceClassification(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    try:
        from mixlm.selection.model_raters import SequenceClassifierRater

        rater = SequenceClassifierRater("edu", folder, device="cpu", batch_size=8, max_length=512)
        return rater.score, params, "mixlm.selection.model_raters.SequenceClassifierRater"
    except ImportError:  # the rater module is not in this checkout: transformers directly, same shapes
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        tok.pad_token = tok.pad_token or tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

        def score(texts):
            with torch.inference_mode():
                for i in range(0, len(texts), 8):
                    batch = tok(texts[i:i + 8], truncation=True, max_length=512, padding=True, return_tensors="pt")
                    model(**batch)

        return score, params, "transformers directly (mixlm.selection.model_raters not found)"


def planted_corpus(n: int, copies: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`n` distinct documents of 150-300 random words, then `copies` near-copies of the first ones (1-3 words
    substituted); returns the texts and, per text, the index of its original."""
    rng = np.random.default_rng(seed)
    return plant_near_copies(rng, np.array([f"w{i}" for i in range(5000)]), n, copies)


def plant_near_copies(rng: np.random.Generator, vocab, n: int, copies: int) -> tuple[list[str], np.ndarray]:
    """`n` documents of 150-300 words drawn from `vocab` with `rng`, then `copies` near-copies of the first ones
    (1-3 words substituted); returns the texts and, per text, the index of its original."""
    base = [list(rng.choice(vocab, size=int(rng.integers(150, 301)))) for _ in range(n)]
    texts = [" ".join(words) for words in base]
    for i in range(copies):
        words = list(base[i])
        for _ in range(int(rng.integers(1, 4))):
            words[int(rng.integers(len(words)))] = str(rng.choice(vocab))
        texts.append(" ".join(words))
    return texts, np.concatenate([np.arange(n), np.arange(copies)])


def word_jaccard(a: str, b: str, n: int) -> float:
    """Exact Jaccard similarity of the two texts' sets of normalised word n-grams."""
    from mixlm.selection.signals import normalized_words

    def grams(text: str) -> set:
        w = normalized_words(text)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def datasketch_keep(texts: list[str], settings) -> np.ndarray:
    """datasketch's MinHash + MinHashLSH on the same shingles (normalised word 5-grams, as strings): a document
    is dropped when the LSH finds an earlier kept one (datasketch's usual streaming dedup)."""
    from datasketch import MinHash, MinHashLSH

    from mixlm.selection.signals import normalized_words

    lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm, params=settings.bands_rows())
    keep = np.zeros(len(texts), bool)
    for i, text in enumerate(texts):
        words = normalized_words(text)
        n = min(settings.ngram, len(words))
        grams = {" ".join(words[j:j + n]).encode() for j in range(len(words) - n + 1)}
        m = MinHash(num_perm=settings.num_perm, seed=settings.seed)
        m.update_batch(list(grams))
        if not lsh.query(m):
            keep[i] = True
            lsh.insert(i, m)
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000, help="documents for the fast stages")
    parser.add_argument("--model-docs", type=int, default=64, help="documents for the tiny model rater")
    parser.add_argument("--base-docs", type=int, default=8, help="documents for the BERT-base-shaped rater")
    parser.add_argument("--cores", default="64,1024", help="core counts for the 100B-token wall-clock columns")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "selection_throughput_cpu.md"))
    args = parser.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",") if c]

    from mixlm.selection.classifier import classifier_preset, load_classifier, train_classifier
    from mixlm.selection.dedup import BloomSettings, MinHashSettings, bloom_keep, exact_keep, fuzzy_keep
    from mixlm.selection.dsir import DSIRSettings, bucket_counts, fit_dsir
    from mixlm.selection.signals import SIGNALS, compute_signals

    start_all = time.perf_counter()
    docs = synthetic_documents(args.docs, seed=0)
    tokens, token_note = count_tokens(docs)
    mean_tokens = float(tokens.mean())
    work = Path(tempfile.mkdtemp(prefix="mixlm-select-bench-"))
    rows = []  # (stage, documents, CPU seconds, wall seconds, note)

    def add(stage: str, fn, subset: list[str], note: str) -> None:
        cpu, wall = timed(fn, subset)
        rows.append((stage, len(subset), cpu, wall, note))
        print(f"{stage}: {len(subset) / cpu:,.1f} docs per CPU second", file=sys.stderr, flush=True)

    add("rule signals", lambda d: [compute_signals(t) for t in d], docs, f"signals.compute_signals: all {len(SIGNALS)} signals")
    dsir_settings = DSIRSettings()
    add("DSIR fit (bag of n-grams)", lambda d: bucket_counts(d, dsir_settings), docs,
        "10,000 buckets, uni+bigrams; one pass over the pool (and each target set)")
    targets = {name: synthetic_documents(200, seed=i + 1) for i, name in enumerate(("books", "wiki", "math"))}
    model = fit_dsir(docs, targets, dsir_settings)
    add("DSIR score, 3 targets", model.log_weights, docs, "log importance weights for books, wiki, math")
    add("exact dedup", exact_keep, docs, "BLAKE2b of normalised text")
    minhash = MinHashSettings(ngram=5, num_perm=112, bands=14, rows=8, threshold=0.8)
    add("MinHash-LSH dedup", lambda d: fuzzy_keep(d, minhash), docs,
        "word 5-grams, 112 permutations, 14 bands x 8 rows, verified at Jaccard 0.8; signatures + LSH join")

    bloom = BloomSettings(ngram=13, threshold=0.8, expected_ngrams=100_000_000)
    add("Bloom-filter dedup", lambda d: bloom_keep(d, bloom), docs,
        f"DCLM's BFF at document level: 13-grams, threshold 0.8, {bloom.size()[0] / 8e6:.0f} MB filter, "
        f"{bloom.size()[1]} hashes")
    comparison, datasketch_from, jaccard_range = [], "", ""
    try:
        import datasketch

        datasketch_from = f"datasketch {datasketch.__version__} imported from {Path(datasketch.__file__).parents[1]}"

        add(f"MinHash-LSH dedup, datasketch {datasketch.__version__}", lambda d: datasketch_keep(d, minhash), docs,
            "the same shingles, permutations, bands and rows; datasketch's MinHash + MinHashLSH (reference)")
        planted, _original = planted_corpus(1000, 300, seed=1)
        ours = fuzzy_keep(planted, minhash)[0]
        theirs = datasketch_keep(planted, minhash)
        jaccard = np.array([word_jaccard(planted[i], planted[1000 + i], minhash.ngram) for i in range(300)])
        for name, keep in (("mixlm dedup.fuzzy_keep", ours), ("datasketch", theirs)):
            missed = np.sort(jaccard[keep[1000:]])
            comparison.append(f"| {name} | {int((~keep[1000:]).sum())} / 300 | {int((~keep[:1000]).sum())} | "
                              f"{', '.join(f'{j:.3f}' for j in missed) or '-'} |")
        comparison.append(f"| both agree on | {int((ours == theirs).sum())} / {len(planted)} documents | | |")
        jaccard_range = f"{jaccard.min():.2f}-{jaccard.max():.2f}"
    except ImportError:
        comparison = None

    half = len(docs) // 2
    preset = classifier_preset("dclm", {"bucket": 200_000})
    train_classifier(docs[:half], docs[half:], work / "ft", backend="fasttext",
                     fasttext_options=preset["fasttext_options"], val_fraction=0.0)
    fasttext = load_classifier(work / "ft")
    add("fastText classifier score", fasttext.score, docs,
        "DCLM preset (dim 100, wordNgrams 2) with 200k buckets instead of 2M (~80 MB model)")
    train_classifier(docs[:200], docs[half:half + 200], work / "sk", backend="sklearn", val_fraction=0.0)
    sk = load_classifier(work / "sk")
    add("sklearn classifier score", sk.score, docs, "hashed uni+bigrams (2^20) + logistic regression")

    if TOKENIZER.is_dir():
        import torch

        torch.set_num_threads(1)
        for label, layers, d_model, heads, n in (("tiny", 2, 128, 2, args.model_docs),
                                                 ("BERT-base shape", 12, 768, 12, args.base_docs)):
            folder = work / f"rater-{layers}x{d_model}"
            folder.mkdir()
            score, params, how = _hf_rater(folder, layers, d_model, heads)
            add(f"model rater, {label}", score, docs[:n],
                f"{layers} layers, d {d_model}, {params / 1e6:.0f}M params, random init, <= 512 tokens, batch 8; {how}")
    else:
        print(f"no tokenizer at {TOKENIZER}: model raters skipped", file=sys.stderr)

    header = ["stage", "docs/s/core", "tokens/s/core", "core-hours / 100B tokens",
              *[f"hours on {c:,} cores" for c in cores], "docs timed (wall s)", "notes"]
    lines = [
        "# Selection throughput (CPU)",
        "",
        f"Machine: {describe_machine()}.",
        (f"Command: `{'PYTHONPATH=' + os.environ['PYTHONPATH'] + ' ' if os.environ.get('PYTHONPATH') else ''}"
         f"python benchmarks/selection_throughput.py --docs {args.docs} --model-docs {args.model_docs} "
        f"--base-docs {args.base_docs} --cores {args.cores}`"),
        (f"Corpus: {args.docs:,} synthetic pseudo-word prose documents, mean {mean_tokens:,.0f} {token_note} "
        f"({tokens.sum():,} in all); one process, one thread per stage, after a warm-up call. Rates are per CPU "
        "second of this process (time.process_time), so a host shared with other jobs does not lower them; the "
        "wall column is for reference."),
        (f"100B tokens = {100e9 / mean_tokens:,.3g} documents of that mean length; core-hours = documents / "
        "(docs/s/core) / 3600, hours on N cores = core-hours / N (every stage shards over documents; model "
        "raters read at most 512 tokens of a document, so their cost is per document)."),
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 2) + "---|",
    ]
    for stage, n, cpu, wall, note in rows:
        docs_per_s = n / cpu
        core_hours = 100e9 / mean_tokens / docs_per_s / 3600
        cells = [stage, _fmt(docs_per_s), f"{docs_per_s * mean_tokens:,.0f}", _fmt(core_hours),
                 *[_fmt(core_hours / c) for c in cores], f"{n:,} ({wall:.1f})", note]
        lines.append("| " + " | ".join(cells) + " |")
    if comparison:
        lines += ["", ("MinHash-LSH against datasketch on 1,000 distinct documents + 300 planted near-copies (1-3 of "
                  f"150-300 words substituted; exact Jaccard of word 5-grams {jaccard_range}), same settings as "
                  f"above ({datasketch_from}). "
                  "mixlm links a candidate pair only when its estimated Jaccard reaches the threshold; datasketch "
                  "takes every band collision:"), "",
                  "| implementation | near-copies dropped | distinct documents dropped | Jaccard of the copies missed |",
                  "|---|---:|---:|---|",
                  *comparison]
    else:
        lines += ["", "datasketch is not installed here: no side-by-side MinHash row (pip install datasketch)."]
    lines += ["", (f"Total benchmark time: {time.perf_counter() - start_all:.0f} s. The host was shared with other "
              "jobs; rates are single measurements. Written by benchmarks/selection_throughput.py.")]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(
        [{"stage": s, "documents": n, "cpu_seconds": cpu, "wall_seconds": wall, "mean_tokens": mean_tokens}
         for s, n, cpu, wall, _ in rows], indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
