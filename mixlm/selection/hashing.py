"""Stable 64-bit hashes of words and word n-grams, vectorised with numpy (DSIR features, MinHash shingles).

A word's hash is the first 8 bytes of its BLAKE2b digest (the same on every machine and Python run, unlike
`hash`); an n-gram's hash folds its words' hashes left to right through the splitmix64 finaliser, so
`ngram_hashes(h, n)[i]` depends only on words i .. i+n-1 and their order. Word hashes are cached per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_CACHE_LIMIT = 1_000_000  # distinct words kept; the cache is cleared when it grows past this
_word_cache: dict[str, int] = {}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 [...] → uint64 [...]: the splitmix64 finaliser, a bijection that mixes every input bit."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _word_hash(word: str) -> int:
    h = _word_cache.get(word)
    if h is None:
        if len(_word_cache) >= _CACHE_LIMIT:
            _word_cache.clear()
        h = _word_cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return h


def word_hashes(words: Sequence[str]) -> np.ndarray:
    """uint64 [len(words)]: one stable hash per word."""
    get = _word_cache.get
    hashes = [get(w) for w in words]  # the common case, cached words, without a Python call per word
    if None in hashes:
        hashes = [h if h is not None else _word_hash(w) for h, w in zip(hashes, words)]
    return np.array(hashes, dtype=np.uint64)


def ngram_hashes(hashes_L: np.ndarray, n: int) -> np.ndarray:
    """uint64 [L - n + 1] (empty when L < n): the hash of each run of n consecutive words, from their word
    hashes; n = 1 returns the word hashes mixed once (so unigrams and bigrams do not share values)."""
    length = hashes_L.size - n + 1
    if length <= 0:
        return np.zeros(0, np.uint64)
    g = splitmix64(hashes_L[:length] ^ np.uint64(n))
    for j in range(1, n):
        g = splitmix64(g ^ hashes_L[j:j + length])
    return g
