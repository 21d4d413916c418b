"""Deduplication: exact duplicates after normalisation; MinHash-LSH finds planted near-duplicates (recall against
the exact Jaccard similarity, computed here with Python sets), never merges distinct documents, keeps the first;
the Bloom-filter variant drops documents whose n-grams were seen, and at paragraph level cuts planted duplicate
paragraphs out of documents (also through `select run`, other fields kept)."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from mixlm.cli import main
from mixlm.selection import SelectionError
from mixlm.selection.dedup import (
    BloomSettings,
    MinHashSettings,
    bloom_dedup_paragraphs,
    bloom_keep,
    exact_keep,
    fuzzy_keep,
    minhash_signatures,
    optimal_bands_rows,
)
from mixlm.selection.signals import normalized_words


def test_exact_dedup_compares_normalised_text_and_keeps_the_first():
    texts = ["Hello, World!", "a b c", "hello world", "HELLO   world ...", "a b  c d", "a b c"]
    assert exact_keep(texts).tolist() == [True, True, False, False, True, False]


def _jaccard(a, b, n=5):
    def grams(text):
        w = normalized_words(text)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


@pytest.fixture(scope="module")
def planted():
    """300 distinct documents, then 80 near-copies of the first 80 (1-3 words substituted)."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(150, 200))) for _ in range(300)]
    copies = []
    for i in range(80):
        words = base[i].split()
        for _ in range(rng.randint(1, 3)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        copies.append(" ".join(words))
    return base, copies


def test_minhash_finds_planted_near_duplicates_without_false_positives(planted):
    base, copies = planted
    threshold = 0.7
    settings = MinHashSettings(ngram=5, num_perm=128, threshold=threshold, seed=0)
    keep, labels = fuzzy_keep(base + copies, settings)
    truth = np.array([_jaccard(base[i], c) for i, c in enumerate(copies)])
    assert truth.min() >= threshold + 0.05  # every planted pair is a true duplicate at the threshold
    found = labels[300:] == np.arange(80)  # each copy joined its original's cluster, labelled by the original
    assert found.mean() >= 0.95
    assert keep[:300].all()  # no distinct document merged with another (their Jaccard is ~0)
    assert not keep[300:][found].any()  # the copies come later: the first of each cluster is kept


def test_signature_agreement_estimates_the_jaccard_similarity():
    words = [f"t{i}" for i in range(400)]
    a = " ".join(words[:300])
    b = " ".join(words[100:])  # shares 196 of 296 + 296 - 196 = 396 five-grams: J = 196 / 396
    sigs, valid = minhash_signatures([a, b, "", "short text"], MinHashSettings(ngram=5, num_perm=512, seed=1))
    assert valid.tolist() == [True, True, False, True]
    assert (sigs[0] == sigs[1]).mean() == pytest.approx(_jaccard(a, b), abs=0.06)


def test_band_settings_are_checked_and_chosen():
    with pytest.raises(SelectionError, match="multiply to num_perm"):
        MinHashSettings(num_perm=112, bands=10, rows=10).bands_rows()
    assert MinHashSettings(num_perm=112, bands=14, rows=8).bands_rows() == (14, 8)
    bands, rows = optimal_bands_rows(0.8, 112)
    assert bands * rows == 112
    # the chosen S-curve 1 - (1 - s^r)^b is steep around the threshold
    p = 1 - (1 - np.array([0.5, 0.8, 0.95]) ** rows) ** bands
    assert p[0] < 0.1 and p[1] > 0.3 and p[2] > 0.99


def test_bloom_filter_drops_documents_whose_ngrams_were_seen(planted):
    base = planted[0]
    one_edit = []
    for text in base[:40]:  # one substituted word: at most 13 of the 138+ 13-grams are new
        words = text.split()
        words[len(words) // 2] = "edited"
        one_edit.append(" ".join(words))
    keep = bloom_keep(base + one_edit + base[40:60], BloomSettings(ngram=13, threshold=0.8, expected_ngrams=100_000))
    assert keep[:300].all() and not keep[300:].any()  # distinct kept; near and exact copies dropped
    assert BloomSettings(expected_ngrams=1_000_000, false_positive_rate=0.01).size() == (9_585_059, 7)


@pytest.fixture(scope="module")
def paragraph_docs():
    """Paragraphs P0-P6 of 25 random words (13 13-grams each), P7 of 20; documents with planted duplicates and
    the text each should become (None: dropped)."""
    rng = random.Random(1)
    vocab = [f"v{i}" for i in range(5000)]
    p = [" ".join(rng.choice(vocab) for _ in range(25 if i < 7 else 20)) for i in range(8)]
    cases = [
        ("\n".join([p[0], p[1], p[2]]), "\n".join([p[0], p[1], p[2]])),  # all new
        ("\n".join([p[3], p[1], p[4]]), "\n".join([p[3], p[4]])),  # P1 seen in the first document: cut out
        ("\n".join([p[5], p[5], "ok thanks"]), "\n".join([p[5], "ok thanks"])),  # repeated inside; short line kept
        ("\n".join([p[0], p[2]]), None),  # every n-gram seen: the whole document is a duplicate
        ("\n".join([p[7], p[3]]), None),  # 13 of 21 n-grams seen (< 0.8): P3 cut, 20 words left < min_words 21
        (p[6], p[6]),
    ]
    return cases


def test_bloom_paragraph_dedup_removes_planted_duplicate_paragraphs(paragraph_docs):
    counts: Counter = Counter()
    settings = BloomSettings(ngram=13, threshold=0.8, expected_ngrams=10_000, paragraphs=True, min_words=21)
    got = list(bloom_dedup_paragraphs([text for text, _ in paragraph_docs], settings, counts))
    assert got == [want for _, want in paragraph_docs]
    assert counts == {"duplicate_documents": 1, "too_short_documents": 1, "paragraphs_removed": 3}
    # document level alone keeps all six whole: its n-grams span paragraph breaks, so the fourth document
    # (P0 then P2) has 12 new 13-grams of 38 (0.68 seen < 0.8)
    keep = bloom_keep([text for text, _ in paragraph_docs], BloomSettings(ngram=13, expected_ngrams=10_000))
    assert keep.all()


def test_select_run_bloom_paragraph_stage_rewrites_texts_and_keeps_fields(paragraph_docs, tmp_path):
    import zstandard

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "meta": {"body": text}}) + "\n"
                            for i, (text, _) in enumerate(paragraph_docs)))
    config = tmp_path / "bloom.yaml"
    config.write_text("text_field: meta.body\nstages:\n  - {name: bloom, kind: bloom_dedup, ngram: 13, "
                      "expected_ngrams: 10000, paragraphs: true, min_words: 21}\n")
    assert main(["select", "run", str(config), "--input", str(docs), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "01-bloom" / "documents.jsonl.zst", "rb") as f:
        rows = [json.loads(line) for line in zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()]
    kept = [(i, want) for i, (_, want) in enumerate(paragraph_docs) if want is not None]
    assert [(r["id"], r["meta"]["body"]) for r in rows] == kept
    report = json.loads((tmp_path / "out" / "01-bloom" / "report.json").read_text())
    assert (report["documents_in"], report["documents_out"], report["paragraphs_removed"]) == (6, 4, 3)


def test_select_dedup_verb_writes_the_kept_documents_and_says_what_it_removed(planted, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    base, copies = planted
    exact_copies = [text.upper() + " !" for text in base[20:30]]  # equal once normalised
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(base[:60] + exact_copies))
                     + "{not json\n")
    second = tmp_path / "b.parquet"  # parquet input too: its rows come out as JSON objects
    pq.write_table(pa.table({"text": copies[:20], "n": list(range(100, 120))}), second)
    texts = base[:60] + exact_copies + copies[:20]

    def kept(out):
        with open(out / "documents.jsonl.zst", "rb") as f:
            return [json.loads(line) for line in zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()]

    capsys.readouterr()
    assert main(["select", "dedup", str(first), str(second), "--method", "exact", "--out", str(tmp_path / "exact")]) == 0
    out, err = capsys.readouterr()
    assert f"dedup exact: kept 80 of 90 documents (10 removed) → {tmp_path / 'exact' / 'documents.jsonl.zst'}" in out
    assert "skipped 1 bad line (1 invalid json)" in err and "a.jsonl:71: invalid json" in err
    assert [r["text"] for r in kept(tmp_path / "exact")] == base[:60] + copies[:20]  # the planted exact copies go
    report = json.loads((tmp_path / "exact" / "report.json").read_text())
    assert (report["documents_in"], report["documents_out"], report["malformed_lines"]) == (90, 80, 1)

    settings = MinHashSettings(ngram=5, num_perm=128, threshold=0.7, seed=0)
    assert main(["select", "dedup", str(first), str(second), "--method", "minhash", "--threshold", "0.7",
                 "--num-perm", "128", "--out", str(tmp_path / "minhash")]) == 0
    keep = fuzzy_keep(texts, settings)[0]
    assert keep[:60].all() and keep.sum() <= 62  # ~all planted copies found (>= 95%: the test above)
    assert [r["text"] for r in kept(tmp_path / "minhash")] == [t for t, k in zip(texts, keep) if k]
    assert f"dedup minhash: kept {keep.sum()} of 90 documents ({90 - keep.sum()} removed)" in capsys.readouterr().out

    assert main(["select", "dedup", str(first), str(second), "--method", "bloom", "--expected-ngrams", "100000",
                 "--out", str(tmp_path / "bloom")]) == 0
    keep = bloom_keep(texts, BloomSettings(expected_ngrams=100_000))
    assert [r["n"] for r in kept(tmp_path / "bloom")] == [n for n, k in zip(list(range(70)) + list(range(100, 120)), keep)
                                                        if k]
    # same inputs and settings: reused; other settings in the same folder: refused; a stray option: refused
    assert main(["select", "dedup", str(first), str(second), "--method", "exact", "--out", str(tmp_path / "exact")]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["select", "dedup", str(first), "--method", "exact", "--out", str(tmp_path / "exact")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["select", "dedup", str(first), "--method", "exact", "--threshold", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == \
        "mixlm select: error: --threshold does not apply to --method exact (it takes no options)"


def test_select_run_says_how_many_bad_lines_a_stage_skipped_and_strict_stops(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "one two three"}\n{"text": "one two three"}\n{broken\n{"text": "four five"}\n')
    config = tmp_path / "exact.yaml"
    config.write_text("stages:\n  - {name: exact, kind: exact_dedup}\n")
    capsys.readouterr()
    assert main(["select", "run", str(config), "--input", str(docs), "--out", str(tmp_path / "out")]) == 0
    assert "exact (exact_dedup): 3 → 2 documents (66.7%) in " in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "01-exact" / "report.json").read_text())
    assert report["malformed"] == {"invalid_json": 1} and "docs.jsonl:3: invalid json" in report["malformed_examples"][0]
    assert main(["select", "run", str(config), "--input", str(docs), "--out", str(tmp_path / "out")]) == 0
    assert "1 bad line skipped, reused" in capsys.readouterr().out
    assert main(["select", "run", str(config), "--input", str(docs), "--out", str(tmp_path / "strict"),
                 "--strict"]) == 2
    assert "docs.jsonl:3: invalid json" in capsys.readouterr().err
