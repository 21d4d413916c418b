"""mixlm's dedup and heuristic filters against datatrove 0.10's (and datasketch's MinHash) on the same documents:
CPU seconds per document on one core, and agreement of what each keeps and removes.

  * MinHash-LSH: mixlm `dedup.fuzzy_keep` (word 5-grams, 112 permutations, 14 bands x 8 rows, pairs verified at
    Jaccard 0.8) and the same run as an engine stage over 8 files (`corpus_dedup.dedup_corpus`, LocalEngine(1):
    features, band shuffle, verification, components), datatrove's 4-stage MinhashDedup (signature, buckets,
    cluster, filter; 5-grams, 14 buckets x 8 hashes, 64-bit hashes) and datasketch's MinHash + MinHashLSH on
    1,000 distinct documents + 300 planted near-copies (1-3 of 150-300 words substituted), scored against the
    exact Jaccard of each copy to its original.
  * exact dedup: mixlm `exact_keep` (BLAKE2b of normalised words) and datatrove's 3-stage ExactDedup, on the same
    pool plus 100 copies that differ only in case, spacing and punctuation.
  * Bloom dedup: mixlm `bloom_keep` (13-grams, threshold 0.8, sized for 10M n-grams at 1%) and datatrove's
    SingleBloomFilter (13-grams, threshold 0.8, the same number of bits and hashes).
  * Gopher / RefinedWeb heuristics: mixlm's `refinedweb` preset (rule signals + thresholds) and datatrove's
    GopherQualityFilter + GopherRepetitionFilter (DCLM ran exactly these, from datatrove's code) on 1,500
    synthetic prose documents and 600 degraded ones (short, repeated lines, bullet lists, symbol-heavy,
    no stop words, repeated n-grams).

Rates are documents per CPU second of this process (time.process_time, one thread), after a warm-up; datatrove's
stages are called in this process (`step.run(...)` with its own rank/world_size protocol), writing its
intermediate files under a temp folder as its executor would.

datatrove, datasketch and spacy (datatrove's English word tokenizer) are not part of mixlm's pinned stack; run
this with a Python that has them and sees mixlm, e.g. a scratch venv:

    python -m venv /tmp/dt && echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > /tmp/dt/lib/python3.11/site-packages/mixlm-venv.pth
    /tmp/dt/bin/pip install 'datatrove[processing]==0.10.1' datasketch==2.0.0 spacy
    PYTHONPATH=$PWD /tmp/dt/bin/python benchmarks/dedup_filters_vs_datatrove.py

Writes benchmarks/results/dedup_filters_vs_datatrove.md (or --out). Never asserts a time.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe_machine  # benchmarks/machine.py
from selection_throughput import (
    SYLLABLES,
    datasketch_keep,
    plant_near_copies,
    synthetic_documents,
    word_jaccard,
)


def letter_planted_corpus(n: int, copies: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`n` distinct documents of 150-300 pseudo-words made of letters only (datatrove's text normalisation maps
    every digit to 0, so words like w123 would all look alike to it), then `copies` near-copies of the first ones
    (1-3 words substituted); returns the texts and, per text, the index of its original."""
    rng = np.random.default_rng(seed)
    vocab = sorted({"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5)))) for _ in range(8000)})
    return plant_near_copies(rng, vocab, n, copies)


def cpu_seconds(fn, *args):
    """(result, CPU seconds of this process) of fn(*args), with mixlm's per-process word-hash cache emptied first
    (so an implementation timed after another does not find the words hashed)."""
    from mixlm.selection import hashing

    hashing._word_cache.clear()
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def _exhaust(step_output) -> list:
    return list(step_output) if step_output is not None else []


# ---- datatrove -----------------------------------------------------------------------------------------------
def _documents(texts: list[str]):
    from datatrove.data import Document

    return [Document(text=t, id=str(i)) for i, t in enumerate(texts)]


def datatrove_minhash_keep(texts: list[str], work: Path) -> np.ndarray:
    """datatrove's MinhashDedup: signatures, one bucket task per band, clusters, filter."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64))
    sigs, buckets, remove = work / "sigs", work / "buckets", work / "remove"
    _exhaust(MinhashDedupSignature(output_folder=str(sigs), config=config).run(iter(_documents(texts)), 0, 1))
    for b in range(config.num_buckets):
        _exhaust(MinhashDedupBuckets(input_folder=str(sigs), output_folder=str(buckets), config=config)
                 .run(None, b, config.num_buckets))
    _exhaust(MinhashDedupCluster(input_folder=str(buckets), output_folder=str(remove), config=config).run(None, 0, 1))
    kept = _exhaust(MinhashDedupFilter(input_folder=str(remove)).run(iter(_documents(texts)), 0, 1))
    keep = np.zeros(len(texts), bool)
    keep[[int(d.id) for d in kept]] = True
    return keep


def _raw_text(doc) -> str:
    return doc.text


def _simplified_text(doc) -> str:
    from datatrove.utils.text import TextNormConfig, simplify_text

    return simplify_text(doc.text, TextNormConfig())


def datatrove_exact_keep(texts: list[str], work: Path, content=_raw_text) -> np.ndarray:
    """datatrove's ExactDedup (signature, find, filter) on `content(document)`: its raw text by default (the
    config takes a getter; datatrove normalises nothing itself)."""
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )

    config = ExactDedupConfig(content_getter=content)
    sigs, remove = work / "exact-sigs", work / "exact-remove"
    _exhaust(ExactDedupSignature(output_folder=str(sigs), config=config).run(iter(_documents(texts)), 0, 1))
    _exhaust(ExactFindDedups(data_folder=str(sigs), output_folder=str(remove), config=config).run(None, 0, 1))
    kept = _exhaust(ExactDedupFilter(data_folder=str(remove), config=config).run(iter(_documents(texts)), 0, 1))
    keep = np.zeros(len(texts), bool)
    keep[[int(d.id) for d in kept]] = True
    return keep


# datatrove's SingleBloomFilter ANDs each position with m_bytes (`& m_bytes`), so positions spread only when m_bytes
# is 2^j - 1, and then over the first m_bytes bits: 2^27 - 1 gives it 134M usable bits (mixlm's filter: 95.9M).
DATATROVE_BLOOM_BYTES = 2**27 - 1


def datatrove_bloom_keep(texts: list[str], work: Path, hashes: int) -> np.ndarray:
    from datatrove.pipeline.dedup.bloom_filter import BloomFilterConfig, SingleBloomFilter

    config = BloomFilterConfig(m_bytes=DATATROVE_BLOOM_BYTES, k=hashes, expected_elements=10_000_000,
                               duplicate_threshold=0.8, n_grams=13)
    kept = _exhaust(SingleBloomFilter(output_folder=str(work / "bloom"), config=config).run(iter(_documents(texts)), 0, 1))
    keep = np.zeros(len(texts), bool)
    keep[[int(d.id) for d in kept]] = True
    return keep


def datatrove_gopher_keep(texts: list[str]) -> np.ndarray:
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()
    keep = np.zeros(len(texts), bool)
    for i, doc in enumerate(_documents(texts)):
        ok = quality.filter(doc)
        ok = ok if isinstance(ok, bool) else ok[0]
        if ok:
            ok = repetition.filter(doc)
            ok = ok if isinstance(ok, bool) else ok[0]
        keep[i] = ok
    return keep


# ---- mixlm --------------------------------------------------------------------------------------------------
def mixlm_gopher_keep(texts: list[str]) -> np.ndarray:
    from mixlm.selection.heuristics import PRESETS, apply_rules
    from mixlm.selection.signals import compute_signals

    rows = [compute_signals(t) for t in texts]
    columns = {k: np.array([r[k] for r in rows], np.float64) for k in rows[0]}
    return apply_rules(columns, PRESETS["refinedweb"])[0]


def mixlm_engine_minhash_keep(texts: list[str], work: Path, settings) -> np.ndarray:
    """The engine stage over 8 jsonl files (features, band shuffle, verification, components) on LocalEngine(1)."""
    from mixlm.engine import LocalEngine
    from mixlm.selection.corpus_dedup import dedup_corpus

    work.mkdir(parents=True, exist_ok=True)
    files = []
    for k, part in enumerate(np.array_split(np.arange(len(texts)), 8)):
        path = work / f"part-{k}.jsonl"
        path.write_text("".join(json.dumps({"text": texts[i]}) + "\n" for i in part))
        files.append(str(path))
    found = dedup_corpus(files, work / "mixlm-work", "minhash", settings, LocalEngine(1, progress=False))
    keep = np.ones(len(texts), bool)
    first = 0
    for part, dropped in zip(np.array_split(np.arange(len(texts)), 8), found.dropped):
        keep[first + dropped] = False
        first += len(part)
    return keep


def degraded_documents(n: int, seed: int) -> list[str]:
    """Documents the Gopher rules exist to catch: short, repeated lines, bullets, '#'-heavy, no stop words,
    one n-gram over and over."""
    rng = np.random.default_rng(seed)
    base = synthetic_documents(n, seed + 1)
    out = []
    for i, text in enumerate(base):
        kind = i % 6
        lines = text.split("\n")
        if kind == 0:
            out.append(" ".join(text.split()[: int(rng.integers(5, 45))]))
        elif kind == 1:
            out.append("\n".join(lines + [lines[0]] * int(rng.integers(2, 8))))
        elif kind == 2:
            out.append("\n".join(f"- {line[:60]}" for line in lines for _ in range(2)))
        elif kind == 3:
            out.append(" ".join(f"#{w}" if rng.random() < 0.3 else w for w in text.split()))
        elif kind == 4:
            stop = {"the", "be", "to", "of", "and", "that", "have", "with"}
            out.append(" ".join(w for w in text.split() if w.lower().strip(".?!") not in stop))
        else:
            words = text.split()
            gram = " ".join(words[:3])
            out.append(" ".join(words[:40]) + (" " + gram) * int(rng.integers(10, 40)))
    return out


def _agreement(a: np.ndarray, b: np.ndarray) -> str:
    return f"{int((a == b).sum()):,} / {a.size:,}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dedup_filters_vs_datatrove.md"))
    parser.add_argument("--command", default="", help="the command line to record in the results file")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import datasketch
    from loguru import logger

    logger.remove()  # datatrove logs every step at INFO

    from mixlm.selection.dedup import BloomSettings, MinHashSettings, bloom_keep, exact_keep, fuzzy_keep

    start_all = time.perf_counter()
    load = os.getloadavg()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="dedup-vs-datatrove-") as tmp:
        work = Path(tmp)
        # MinHash
        texts, original = letter_planted_corpus(1000, 300, seed=0)
        copies = np.arange(1000, 1300)
        jaccard = np.array([word_jaccard(texts[i], texts[original[i]], 5) for i in copies])
        settings = MinHashSettings(ngram=5, num_perm=112, threshold=0.8)
        fuzzy_keep(texts[:8], settings)  # warm-up: imports and caches of every implementation
        datasketch_keep(texts[:8], settings)
        datatrove_minhash_keep(texts[:8], work / "warm")
        results = {}
        for name, fn in (("mixlm dedup.fuzzy_keep", lambda: fuzzy_keep(texts, settings)[0]),
                         ("mixlm engine stage (8 files, LocalEngine(1))",
                          lambda: mixlm_engine_minhash_keep(texts, work / "engine", settings)),
                         (f"datatrove {version('datatrove')} MinhashDedup (4 stages)",
                          lambda: datatrove_minhash_keep(texts, work / "dt-minhash")),
                         (f"datasketch {datasketch.__version__} MinHash + MinHashLSH",
                          lambda: datasketch_keep(texts, settings))):
            keep, secs = cpu_seconds(fn)
            results[name] = keep
            missed = jaccard[keep[copies]]
            rows.append(("MinHash-LSH", name, len(texts) / secs, f"{int((~keep[copies]).sum())} / 300 copies",
                         f"{int((~keep[:1000]).sum())}", ", ".join(f"{j:.3f}" for j in np.sort(missed)) or "none"))
        names = list(results)
        notes.append(f"MinHash copies' exact Jaccard to their originals: {jaccard.min():.3f} .. {jaccard.max():.3f}. "
                     "Agreement on kept/removed (of 1,300): " + "; ".join(
                         f"{a} vs {b}: {_agreement(results[a], results[b])}"
                         for k, a in enumerate(names) for b in names[k + 1:]))
        # exact
        rng = np.random.default_rng(1)
        variants = []
        for i in range(100):
            words = texts[i].split()
            variants.append("  ".join(w.upper() if rng.random() < 0.3 else w for w in words) + " !!")
        exact_texts = texts[:1000] + variants
        keep_m, secs_m = cpu_seconds(exact_keep, exact_texts)
        keep_d, secs_d = cpu_seconds(datatrove_exact_keep, exact_texts, work / "dt-exact")
        keep_s, secs_s = cpu_seconds(datatrove_exact_keep, exact_texts, work / "dt-exact-simple", _simplified_text)
        for name, keep, secs in (("mixlm dedup.exact_keep (normalised words)", keep_m, secs_m),
                                 ("datatrove ExactDedup (3 stages), raw text", keep_d, secs_d),
                                 ("datatrove ExactDedup, content = its simplify_text", keep_s, secs_s)):
            rows.append(("exact", name, len(exact_texts) / secs, f"{int((~keep[1000:]).sum())} / 100 variants",
                         f"{int((~keep[:1000]).sum())}", ""))
        notes.append(f"exact: the 100 variants differ from their originals only in case, spacing and punctuation; "
                     f"agreement with mixlm: raw text {_agreement(keep_m, keep_d)}, simplified text "
                     f"{_agreement(keep_m, keep_s)}")
        # Bloom
        bloom = BloomSettings(ngram=13, threshold=0.8)
        bits, hashes = bloom.size()
        keep_m, secs_m = cpu_seconds(bloom_keep, texts, bloom)
        keep_d, secs_d = cpu_seconds(datatrove_bloom_keep, texts, work / "dt-bloom", hashes)
        for name, keep, secs in (("mixlm dedup.bloom_keep", keep_m, secs_m),
                                 ("datatrove SingleBloomFilter", keep_d, secs_d)):
            rows.append(("Bloom (13-grams, 0.8)", name, len(texts) / secs, f"{int((~keep[copies]).sum())} / 300 copies",
                         f"{int((~keep[:1000]).sum())}", ""))
        notes.append(f"Bloom: mixlm {bits:,} bits, datatrove m_bytes 2^27 - 1 (its positions are `& m_bytes`: "
                     f"{DATATROVE_BLOOM_BYTES:,} usable bits), {hashes} hashes for both; datatrove drops a document "
                     "above the threshold and adds every document's new n-grams, mixlm (as DCLM's BFF) at or above it "
                     f"and only kept documents' n-grams; agreement {_agreement(keep_m, keep_d)}")
        # Gopher / RefinedWeb
        good = synthetic_documents(1500, seed=2)
        bad = degraded_documents(600, seed=3)
        gopher_texts = good + bad
        datatrove_gopher_keep(gopher_texts[:8])
        mixlm_gopher_keep(gopher_texts[:8])
        keep_m, secs_m = cpu_seconds(mixlm_gopher_keep, gopher_texts)
        keep_d, secs_d = cpu_seconds(datatrove_gopher_keep, gopher_texts)
        for name, keep, secs in (("mixlm refinedweb preset (signals + rules)", keep_m, secs_m),
                                 ("datatrove GopherQuality + GopherRepetition", keep_d, secs_d)):
            rows.append(("Gopher / RefinedWeb", name, len(gopher_texts) / secs,
                         f"{int((~keep[1500:]).sum())} / 600 degraded", f"{int((~keep[:1500]).sum())} of 1,500 prose",
                         ""))
        from mixlm.selection.heuristics import PRESETS, apply_rules
        from mixlm.selection.signals import compute_signals

        only = np.flatnonzero(keep_m != keep_d)
        if only.size:
            rows_only = [compute_signals(gopher_texts[i]) for i in only]
            _, dropped_by = apply_rules({k: np.array([r[k] for r in rows_only]) for k in rows_only[0]},
                                        PRESETS["refinedweb"])
            notes.append("Gopher / RefinedWeb, the documents the two disagree on, by mixlm's first failing rule: " +
                         ", ".join(f"{rule}: {n}" for rule, n in dropped_by.items() if n))
        both = (keep_m == keep_d)
        only_m = int((~keep_m & keep_d).sum())
        only_d = int((keep_m & ~keep_d).sum())
        notes.append(f"Gopher / RefinedWeb: agreement {int(both.sum()):,} / {both.size:,}; removed only by mixlm "
                     f"{only_m}, only by datatrove {only_d} (by degraded kind: " + ", ".join(
                         f"{kind} {int((keep_m[1500 + k::6] != keep_d[1500 + k::6]).sum())}"
                         for k, kind in enumerate(("short", "repeated lines", "bullets", "hashes", "no stop words",
                                                   "repeated n-gram"))) + ")")
    lines = [
        "# mixlm's dedup and Gopher filters against datatrove (and datasketch)",
        "",
        f"Machine: {describe_machine()}. Load average at start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}.",
        (f"Command: `{args.command or 'python benchmarks/dedup_filters_vs_datatrove.py'}` (datatrove "
         f"{version('datatrove')}, datasketch {datasketch.__version__}, spacy {version('spacy')})."),
        ("Rates: documents per CPU second of this one-thread process (time.process_time), so other jobs on the "
        "host do not lower them; single measurements."),
        "",
        ("| task | implementation | docs / CPU s | duplicates / degraded removed | distinct / good removed | "
        "Jaccard of the copies kept |"),
        "|---|---|---:|---|---|---|",
    ]
    lines += [f"| {task} | {name} | {rate:,.0f} | {removed} | {false} | {missed} |"
              for task, name, rate, removed, false, missed in rows]
    lines += [""] + [f"- {n}" for n in notes]
    lines += ["", (f"Total: {time.perf_counter() - start_all:.0f} s wall. Written by "
              "benchmarks/dedup_filters_vs_datatrove.py.")]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
