"""Deduplication: exact (normalised-text hash), fuzzy (MinHash-LSH) and Bloom-filter (document or paragraph level).

* `exact_keep(texts)` — bool [n]: False for a document whose normalised text (`signals.normalized_words`
  joined by spaces: lower-cased, punctuation removed, whitespace collapsed) equals an earlier one's
  (compared by a 128-bit BLAKE2b digest).
* `fuzzy_keep(texts, MinHashSettings(...))` — bool [n] and cluster labels: documents whose word-`ngram`
  shingle sets have Jaccard similarity >= `threshold` are linked, and every connected cluster keeps only
  its first document (the lowest index). The Jaccard similarity is estimated by `num_perm` MinHash values
  (h_k(s) = high 32 bits of a_k * s + b_k mod 2^64 over 64-bit shingle hashes, seeded), candidates come from
  LSH with `bands` x `rows` = `num_perm` (when not given, the pair minimising the false-positive and
  false-negative areas at the threshold, as datasketch chooses), and with `verify` a candidate pair is
  linked only when the fraction of equal MinHash values is >= `threshold`, so band collisions of
  dissimilar documents create no false duplicate. A document with fewer than `ngram` words is one shingle
  of all its words; a document without words is never a duplicate.
* `bloom_keep(texts, BloomSettings(...))` — DCLM's Bloom-filter variant (BFF) at document level: documents are
  read in order; one whose word `ngram`-grams were already seen (in the Bloom filter of the kept documents
  before it) in a fraction >= `threshold` is dropped, otherwise kept and its n-grams added. The filter is
  sized for `expected_ngrams` at `false_positive_rate`; a false positive can only make a document look more
  duplicated than it is.
* `bloom_dedup_paragraphs(texts, BloomSettings(paragraphs=True, min_words=...))` — document then paragraph
  level, as DCLM ran BFF (its README: `--remove-type naive-both` for the paper): paragraphs are lines
  (`text.split("\\n")`, BFF's units), each with its own word `ngram`-grams (a paragraph of fewer than `ngram`
  words has none: always kept, never added). A document whose paragraph n-grams were seen in a fraction >=
  `threshold` is dropped whole; otherwise, in order, each paragraph whose n-grams were seen (in earlier
  documents or earlier in this one) in a fraction >= `threshold` is removed, and every kept paragraph's n-grams
  are added. A document left with fewer than `min_words` normalised words is dropped (BFF drops those left
  empty: `min_words` 1). Yields the new text or None. BFF removes a paragraph above the threshold and compares
  punctuation tokens too; here >= and normalised words, as at document level.

Everything is numpy-vectorised over documents and permutations; signatures take 4 * num_perm bytes per
document (112 values: 448 MB per million documents).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mixlm.selection import SelectionError
from mixlm.selection.hashing import ngram_hashes, splitmix64, word_hashes
from mixlm.selection.signals import normalized_words

_CHUNK_ELEMENTS = 1 << 22  # permutations x shingles hashed per numpy call (32 MiB of uint64)


def normalized_text(text: str) -> str:
    """The text exact dedup compares: normalised words joined by single spaces."""
    return " ".join(normalized_words(text))


def exact_keep(texts: Iterable[str]) -> np.ndarray:
    """bool [n]: True for the first document of each normalised text."""
    seen: set[bytes] = set()
    keep = []
    for text in texts:
        key = hashlib.blake2b(normalized_text(text).encode("utf-8"), digest_size=16).digest()
        keep.append(key not in seen)
        seen.add(key)
    return np.array(keep, bool)


@dataclass(frozen=True)
class MinHashSettings:
    ngram: int = 5  # words per shingle
    num_perm: int = 112  # MinHash values per document
    bands: int | None = None  # LSH bands; with rows, bands * rows must equal num_perm
    rows: int | None = None
    threshold: float = 0.8  # Jaccard similarity at which two documents are duplicates
    seed: int = 0
    verify: bool = True  # link a candidate pair only when its estimated Jaccard >= threshold

    def bands_rows(self) -> tuple[int, int]:
        if not 0 < self.threshold <= 1 or self.ngram < 1 or self.num_perm < 1:
            raise SelectionError(f"MinHash settings: need 0 < threshold <= 1, ngram >= 1, num_perm >= 1; got "
                                 f"threshold {self.threshold}, ngram {self.ngram}, num_perm {self.num_perm}")
        if self.bands is None and self.rows is None:
            return optimal_bands_rows(self.threshold, self.num_perm)
        bands = self.bands if self.bands is not None else self.num_perm // self.rows
        rows = self.rows if self.rows is not None else self.num_perm // self.bands
        if bands < 1 or rows < 1 or bands * rows != self.num_perm:
            raise SelectionError(f"MinHash: bands {self.bands} x rows {self.rows} must multiply to num_perm "
                                 f"{self.num_perm} (e.g. 14 x 8 = 112); or give neither to choose them")
        return bands, rows


def optimal_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows == num_perm minimising the area under the LSH candidate probability
    1 - (1 - s^rows)^bands below `threshold` (false positives) plus the area above it that it misses (false
    negatives), equally weighted (datasketch's rule, over exact factorisations only). Ties: more bands."""
    best, best_err = (1, num_perm), np.inf
    s_lo, s_hi = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if bands * rows != num_perm:
            continue
        fp = np.trapezoid(1 - (1 - s_lo**rows) ** bands, s_lo)
        fn = np.trapezoid((1 - s_hi**rows) ** bands, s_hi)
        if fp + fn <= best_err:
            best, best_err = (bands, rows), fp + fn
    return best


def shingles(text: str, ngram: int) -> np.ndarray:
    """uint64 [k]: the distinct hashes of the text's word `ngram`-grams (normalised words)."""
    hashes = word_hashes(normalized_words(text))
    if hashes.size == 0:
        return hashes
    return np.unique(ngram_hashes(hashes, min(ngram, hashes.size)))


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2)
    return a, b


def minhash_signatures(texts: Iterable[str], settings: MinHashSettings = MinHashSettings()
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 [n, num_perm] signatures, bool [n] whether the document has any shingle)."""
    a, b = _permutations(settings.num_perm, settings.seed)
    sigs, valid = [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        sizes = np.array([s.size for s in batch])
        out = np.full((len(batch), settings.num_perm), np.iinfo(np.uint32).max, np.uint32)
        nonempty = np.flatnonzero(sizes)
        if nonempty.size:
            flat = np.concatenate([batch[i] for i in nonempty])
            starts = np.concatenate([[0], np.cumsum(sizes[nonempty])[:-1]])
            with np.errstate(over="ignore"):
                hashed_KxS = ((a[:, None] * flat[None, :] + b[:, None]) >> np.uint64(32)).astype(np.uint32)
            out[nonempty] = np.minimum.reduceat(hashed_KxS, starts, axis=1).T
        sigs.append(out)
        valid.append(sizes > 0)
        batch.clear()

    pending = 0
    for text in texts:
        batch.append(shingles(text, settings.ngram))
        pending += batch[-1].size
        if pending * settings.num_perm >= _CHUNK_ELEMENTS:
            flush()
            pending = 0
    if batch or not sigs:
        flush()
    return np.concatenate(sigs), np.concatenate(valid)


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [n, bands]: one hash of each band's `rows` MinHash values."""
    keys = np.zeros((signatures.shape[0], bands), np.uint64)
    for r in range(rows):
        keys = splitmix64(keys ^ signatures[:, r:bands * rows:rows].astype(np.uint64))
    return keys


def _components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """int64 [n]: for every node, the smallest node index of its connected component."""
    label = np.arange(n)
    while True:
        old = label.copy()
        lo = np.minimum(label[left], label[right])
        np.minimum.at(label, left, lo)
        np.minimum.at(label, right, lo)
        label = label[label]  # pointer jumping
        if np.array_equal(label, old):
            return label


def lsh_clusters(signatures: np.ndarray, valid: np.ndarray, settings: MinHashSettings = MinHashSettings()
                 ) -> np.ndarray:
    """int64 [n]: each document's cluster label, the lowest index of the documents linked to it."""
    bands, rows = settings.bands_rows()
    n = signatures.shape[0]
    docs = np.flatnonzero(valid)
    keys = _band_keys(signatures[docs], bands, rows)
    lefts, rights = [], []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        k = keys[order, band]
        new_run = np.concatenate([[True], k[1:] != k[:-1]])
        anchor = order[np.maximum.accumulate(np.where(new_run, np.arange(k.size), 0))]
        member = ~new_run
        lefts.append(docs[anchor[member]])
        rights.append(docs[order[member]])
    left = np.concatenate(lefts) if lefts else np.zeros(0, np.int64)
    right = np.concatenate(rights) if rights else np.zeros(0, np.int64)
    if left.size:
        pairs = np.unique(np.stack([left, right], 1), axis=0)
        left, right = pairs[:, 0], pairs[:, 1]
    if settings.verify and left.size:
        agree = np.empty(left.size)
        for start in range(0, left.size, 65536):  # bounded memory: 65536 x num_perm comparisons at a time
            sl = slice(start, start + 65536)
            agree[sl] = (signatures[left[sl]] == signatures[right[sl]]).mean(axis=1)
        linked = agree >= settings.threshold
        left, right = left[linked], right[linked]
    return _components(n, left, right)


@dataclass(frozen=True)
class BloomSettings:
    ngram: int = 13  # DCLM's BFF run: 13-grams
    threshold: float = 0.8  # fraction of a document's n-grams already seen that makes it a duplicate
    expected_ngrams: int = 10_000_000  # distinct n-grams the filter is sized for
    false_positive_rate: float = 0.01
    paragraphs: bool = False  # also remove duplicate paragraphs inside documents (`bloom_dedup_paragraphs`)
    min_words: int = 1  # with paragraphs: drop a document left with fewer normalised words

    def size(self) -> tuple[int, int]:
        """(bits, hash functions) of the optimal Bloom filter: m = -n ln p / ln(2)^2, k = m / n ln 2."""
        if not 0 < self.threshold <= 1 or self.ngram < 1 or self.expected_ngrams < 1 \
                or not 0 < self.false_positive_rate < 1 or self.min_words < 0:
            raise SelectionError(f"Bloom settings: need 0 < threshold <= 1, ngram >= 1, expected_ngrams >= 1, "
                                 f"0 < false_positive_rate < 1 and min_words >= 0; got {self}")
        bits = int(np.ceil(-self.expected_ngrams * np.log(self.false_positive_rate) / np.log(2) ** 2))
        return bits, max(1, round(bits / self.expected_ngrams * np.log(2)))


class BloomFilter:
    """A Bloom filter of uint64 n-gram hashes sized by `BloomSettings.size()`; k positions per hash by double
    hashing, h1 + i * h2 (mod bits)."""

    def __init__(self, settings: BloomSettings):
        self.bits, self.k = settings.size()
        self.table = np.zeros((self.bits + 7) // 8, np.uint8)

    def _positions(self, grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h1, h2 = splitmix64(grams), splitmix64(grams ^ np.uint64(0x5BD1E995)) | np.uint64(1)
        with np.errstate(over="ignore"):
            pos_KxS = (h1[None, :] + np.arange(self.k, dtype=np.uint64)[:, None] * h2[None, :]) % np.uint64(self.bits)
        return (pos_KxS >> np.uint64(3)).astype(np.int64), (pos_KxS & np.uint64(7)).astype(np.uint8)

    def contains(self, grams: np.ndarray) -> np.ndarray:
        """bool [s]: which of the hashes `grams` [s] are (probably) in the filter."""
        byte, bit = self._positions(grams)
        return ((self.table[byte] >> bit) & 1).all(axis=0)

    def add(self, grams: np.ndarray) -> None:
        byte, bit = self._positions(grams)
        np.bitwise_or.at(self.table, byte.ravel(), (np.uint8(1) << bit).ravel())  # several bits may share a byte


def bloom_keep(texts: Iterable[str], settings: BloomSettings = BloomSettings()) -> np.ndarray:
    """bool [n]: see the module docstring (documents without words are kept)."""
    bloom = BloomFilter(settings)
    keep = []
    for text in texts:
        grams = shingles(text, settings.ngram)
        if grams.size == 0:
            keep.append(True)
            continue
        duplicate = bloom.contains(grams).mean() >= settings.threshold
        keep.append(not duplicate)
        if not duplicate:
            bloom.add(grams)
    return np.array(keep, bool)


def _paragraph_ngrams(paragraph: str, ngram: int) -> np.ndarray:
    """uint64 [k]: distinct hashes of the paragraph's word `ngram`-grams; none when it has fewer words."""
    hashes = word_hashes(normalized_words(paragraph))
    return np.unique(ngram_hashes(hashes, ngram)) if hashes.size >= ngram else np.zeros(0, np.uint64)


def bloom_dedup_paragraphs(texts: Iterable[str], settings: BloomSettings = BloomSettings(paragraphs=True),
                           counts: Counter | None = None) -> Iterator[str | None]:
    """Per document, in order: its text without duplicate paragraphs, or None when it is dropped (see the
    module docstring). `counts`, when given, gets duplicate_documents, too_short_documents and
    paragraphs_removed."""
    bloom = BloomFilter(settings)
    counts = counts if counts is not None else Counter()
    for text in texts:
        paragraphs = text.split("\n")
        grams = [_paragraph_ngrams(p, settings.ngram) for p in paragraphs]
        total = sum(g.size for g in grams)
        if total and sum(int(bloom.contains(g).sum()) for g in grams) / total >= settings.threshold:
            counts["duplicate_documents"] += 1
            yield None
            continue
        kept = []
        for paragraph, g in zip(paragraphs, grams):
            if g.size and bloom.contains(g).mean() >= settings.threshold:
                counts["paragraphs_removed"] += 1
                continue
            if g.size:
                bloom.add(g)
            kept.append(paragraph)
        new_text = "\n".join(kept)
        if len(normalized_words(new_text)) < settings.min_words:
            counts["too_short_documents"] += 1
            yield None
        else:
            yield new_text


def fuzzy_keep(texts: Iterable[str], settings: MinHashSettings = MinHashSettings()
               ) -> tuple[np.ndarray, np.ndarray]:
    """(bool [n] keep: the first document of each cluster, int64 [n] cluster labels)."""
    settings.bands_rows()  # settings errors before the work
    signatures, valid = minhash_signatures(texts, settings)
    labels = lsh_clusters(signatures, valid, settings)
    return labels == np.arange(labels.size), labels
