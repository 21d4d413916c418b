"""Rule-based quality signals of one document (RedPajama-v2 / Gopher style), as plain floats.

Every signal is defined on one of five views of the text, fixed here so that values are reproducible:

* **normalised words** — the text lower-cased, every character that is neither a letter, a digit nor
  whitespace removed (so `don't` → `dont`, `_` removed too), then split on whitespace.
* **raw words** — `re.findall(r"\\w+|[^\\w\\s]+", text)`: runs of word characters and runs of
  punctuation/symbols, each a word (`"Hi, you!"` → `Hi` `,` `you` `!`).
* **lines** — `text.split("\\n")` with trailing whitespace stripped, blank lines dropped.
* **whitespace words** — `text.split()`, as DCLM's RefinedWeb / Gopher filters count words (`ws_*` signals and
  `gopher_stop_words`).
* **paragraphs** — `text.split("\\n\\n")`, each stripped, empty ones dropped (DCLM's Gopher paragraphs).

The Gopher repetition signals over paragraphs count every copy of a repeated paragraph, as DCLM does
(`frac_dupe_lines` counts only the repeats after the first). `num_sentences` and
`frac_numeric_chars_per_line` follow RedPajama-v2 (`rps_doc_num_sentences`,
`rps_lines_numerical_chars_fraction`).

A signal that is undefined for a document (a ratio over zero words or lines) is NaN; scoring ranks NaN
last. `compute_signals(text)` returns every signal in `SIGNALS` order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

_NON_WORD = re.compile(r"[^\w\s]|_")
_RAW_WORD = re.compile(r"\w+|[^\w\s]+")
_SENTENCE = re.compile(r"\b[^.!?]+[.!?]*")  # RedPajama-v2's rps_doc_num_sentences pattern

# The Gopher / RedPajama symbols: '#' and ellipses, counted as substrings of the raw text.
SYMBOLS = ("#", "...", "…")
ELLIPSES = ("...", "…")
# DCLM's symbol_ratio_filter symbols, counted per whitespace word ('. . .' too).
WS_SYMBOLS = ("#", "...", ". . .", "…")
# Gopher's stop words (Rae et al. 2021): a document needs two of them; DCLM compares whitespace words lower-cased.
GOPHER_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
# A line "ends in punctuation" (C4's terminal-punctuation rule, with closing quotes).
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")
BULLETS = ("•", "●", "○", "▪", "■", "‣", "◦", "·", "-", "*", "–", "—")
DUPE_NGRAM_SIZES = (2, 3, 4, 5, 6, 7, 8, 9, 10)
TOP_NGRAM_SIZES = (2, 3, 4)

# Function words of English, written for mixlm (not copied from a list); compared with normalised
# words, so contractions appear without the apostrophe.
STOP_WORDS = frozenset((
    "a", "an", "the", "and", "or", "but", "nor", "so", "yet", "if", "then", "than", "because", "while",
    "although", "though", "as", "of", "at", "by", "for", "from", "in", "into", "on", "onto", "off", "out",
    "over", "under", "up", "down", "to", "with", "without", "about", "above", "below", "between",
    "through", "during", "before", "after", "since", "until", "against", "among", "per", "via", "is", "am",
    "are", "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did",
    "doing", "will", "would", "shall", "should", "can", "could", "may", "might", "must", "i", "me", "my",
    "mine", "myself", "you", "your", "yours", "yourself", "we", "us", "our", "ours", "they", "them",
    "their", "theirs", "he", "him", "his", "she", "her", "hers", "it", "its", "itself", "this", "that",
    "these", "those", "there", "here", "who", "whom", "whose", "which", "what", "when", "where", "why",
    "how", "not", "no", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such",
    "only", "own", "same", "too", "very", "just", "also", "again", "once", "dont", "doesnt", "didnt",
    "isnt", "arent", "wasnt", "werent", "cant", "couldnt", "wont", "wouldnt", "shouldnt", "im", "ive",
    "youre", "theyre",
))


@dataclass(frozen=True)
class SignalSpec:
    """`higher_is_better`: the default direction when the signal is weighted; None = no natural
    direction, so a weighting must state one."""

    name: str
    higher_is_better: bool | None
    doc: str


def _specs() -> tuple[SignalSpec, ...]:
    specs = [
        SignalSpec("num_chars", None, "characters in the text (len)"),
        SignalSpec("num_lines", None, "non-blank lines"),
        SignalSpec("word_count", None, "normalised words"),
        SignalSpec("mean_word_length", None, "mean characters per normalised word"),
        SignalSpec("frac_unique_words", True, "distinct normalised words / normalised words"),
        SignalSpec("unigram_entropy", True, "-sum p ln p over the normalised-word distribution"),
        SignalSpec("stop_word_frac", True, "normalised words in STOP_WORDS / normalised words"),
        SignalSpec("symbol_to_word_ratio", False, "occurrences of '#', '...', '…' / raw words"),
        SignalSpec("frac_no_alpha_words", False, "raw words without an alphabetic character / raw words"),
        SignalSpec("frac_all_caps_words", False, "raw words w with w.isupper() / raw words"),
        SignalSpec("frac_upper_chars", False, "upper-case letters / letters"),
        SignalSpec("frac_alpha_chars", True, "letters / non-whitespace characters"),
        SignalSpec("frac_lines_end_punct", True, "lines ending in TERMINAL_PUNCTUATION / lines"),
        SignalSpec("frac_lines_end_ellipsis", False, "lines ending in '...' or '…' / lines"),
        SignalSpec("frac_lines_bullet", False, "lines starting (after indentation) with a BULLET / lines"),
        SignalSpec("frac_dupe_lines", False, "lines equal to an earlier line / lines"),
        SignalSpec("frac_chars_dupe_lines", False, "characters of those repeated lines / line characters"),
        SignalSpec("frac_dupe_paragraphs", False,
                   "paragraphs occurring more than once, every copy counted / paragraphs (Gopher, DCLM)"),
        SignalSpec("frac_chars_dupe_paragraphs", False,
                   "characters of those paragraphs, every copy / paragraph characters (Gopher, DCLM)"),
        SignalSpec("ws_mean_word_length", None, "mean characters per whitespace word (DCLM word_length_filter)"),
        SignalSpec("ws_symbol_to_word_ratio", False,
                   "occurrences of '#', '...', '. . .', '…' / whitespace words (DCLM symbol_ratio_filter)"),
        SignalSpec("ws_frac_no_alpha_words", False,
                   "whitespace words without an alphabetic character / whitespace words (DCLM)"),
        SignalSpec("gopher_stop_words", True,
                   "whitespace words that lower-cased are one of the, be, to, of, and, that, have, with"),
        SignalSpec("num_sentences", None, "matches of RedPajama-v2's sentence pattern \\b[^.!?]+[.!?]* in the text"),
        SignalSpec("frac_numeric_chars_per_line", False,
                   "mean over lines of numeric characters / characters of the line's normalised words joined "
                   "by spaces (RedPajama-v2 per-line score; 0 for a line without words)"),
    ]
    specs += [
        SignalSpec(f"frac_chars_top_{n}gram", False,
                   f"characters (of normalised words) covered by the most frequent word {n}-gram")
        for n in TOP_NGRAM_SIZES
    ]
    specs += [
        SignalSpec(f"frac_chars_dupe_{n}gram", False,
                   f"characters (of normalised words) covered by word {n}-grams occurring twice or more")
        for n in DUPE_NGRAM_SIZES
    ]
    return tuple(specs)


SIGNALS: tuple[SignalSpec, ...] = _specs()
SIGNAL_NAMES: tuple[str, ...] = tuple(s.name for s in SIGNALS)
DIRECTIONS: dict[str, bool | None] = {s.name: s.higher_is_better for s in SIGNALS}


def normalized_words(text: str) -> list[str]:
    return _NON_WORD.sub("", text.lower()).split()


def raw_words(text: str) -> list[str]:
    return _RAW_WORD.findall(text)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _ngram_coverage(words: list[str]) -> dict[str, float]:
    """frac_chars_top_{n}gram and frac_chars_dupe_{n}gram over the normalised words.

    Both count each character once however many n-grams cover it (RedPajama's
    `rps_doc_frac_chars_dupe_{n}grams` semantics; for the top n-gram the coverage of all its
    occurrences). The top n-gram is the most frequent one; ties go to the n-gram with more
    characters, then to the one that occurs first; a document whose top n-gram occurs once scores 0.
    Fewer than n words → 0.
    """
    out = {}
    num_words = len(words)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=num_words)
    total_chars = int(lengths.sum())
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=num_words)
    csum = np.concatenate([[0], np.cumsum(lengths)])
    # Exact n-gram ids, built one word at a time: id_n[i] = rank of (id_{n-1}[i], word[i+n-1]).
    gram_ids = ids
    for n in range(2, max(DUPE_NGRAM_SIZES + TOP_NGRAM_SIZES) + 1):
        dupe_key, top_key = f"frac_chars_dupe_{n}gram", f"frac_chars_top_{n}gram"
        if num_words < n or total_chars == 0:
            if n in DUPE_NGRAM_SIZES:
                out[dupe_key] = 0.0
            if n in TOP_NGRAM_SIZES:
                out[top_key] = 0.0
            continue
        pairs = gram_ids[:-1] * len(vocab) + ids[n - 1:]
        _, first, gram_ids, counts = np.unique(
            pairs, return_index=True, return_inverse=True, return_counts=True
        )
        occurrences = counts[gram_ids]
        if n in DUPE_NGRAM_SIZES:
            out[dupe_key] = _covered_chars(np.flatnonzero(occurrences > 1), n, lengths) / total_chars
        if n in TOP_NGRAM_SIZES:
            covered = 0
            if counts.max() > 1:
                # Among the most frequent n-grams take the longest (in characters), then the first.
                gram_chars = csum[first + n] - csum[first]
                tied = np.flatnonzero(counts == counts.max())
                longest = tied[gram_chars[tied] == gram_chars[tied].max()]
                top = longest[np.argmin(first[longest])]
                covered = _covered_chars(np.flatnonzero(gram_ids == top), n, lengths)
            out[top_key] = covered / total_chars
    return out


def _covered_chars(starts: np.ndarray, n: int, lengths: np.ndarray) -> int:
    if starts.size == 0:
        return 0
    cover = np.zeros(lengths.size + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    return int(lengths[np.cumsum(cover[:-1]) > 0].sum())


def _paragraph_repetition(text: str) -> dict[str, float]:
    """Gopher's paragraph repetition as DCLM computes it: paragraphs split on a blank line, every copy of a
    paragraph that occurs more than once counted (NaN without paragraphs)."""
    paragraphs = [p for p in (part.strip() for part in text.split("\n\n")) if p]
    repeated = [(p, c) for p, c in Counter(paragraphs).items() if c > 1]
    return {
        "frac_dupe_paragraphs": _ratio(sum(c for _, c in repeated), len(paragraphs)),
        "frac_chars_dupe_paragraphs": _ratio(sum(len(p) * c for p, c in repeated), sum(map(len, paragraphs))),
    }


def _whitespace_word_signals(text: str) -> dict[str, float]:
    ws = text.split()
    return {
        "ws_mean_word_length": _ratio(sum(map(len, ws)), len(ws)),
        "ws_symbol_to_word_ratio": _ratio(sum(text.count(s) for s in WS_SYMBOLS), len(ws)),
        "ws_frac_no_alpha_words": _ratio(sum(not any(ch.isalpha() for ch in w) for w in ws), len(ws)),
        "gopher_stop_words": float(sum(w.lower() in GOPHER_STOP_WORDS for w in ws)),
    }


def _numeric_fraction(line: str) -> float:
    normalised = " ".join(normalized_words(line))
    return sum(ch.isnumeric() for ch in normalised) / len(normalised) if normalised else 0.0


def compute_signals(text: str) -> dict[str, float]:
    """All rule-based signals of `text` (definitions in `SIGNALS` and the module docstring)."""
    words = normalized_words(text)
    raw = raw_words(text)
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    num_words, num_raw, num_lines = len(words), len(raw), len(lines)

    counts = Counter(words)
    entropy = -sum(c / num_words * math.log(c / num_words) for c in counts.values()) if num_words else math.nan
    letters = [ch for ch in text if ch.isalpha()]
    non_space = sum(1 for ch in text if not ch.isspace())

    seen: set[str] = set()
    dupe_lines = dupe_line_chars = 0
    for line in lines:
        key = line.strip()
        if key in seen:
            dupe_lines += 1
            dupe_line_chars += len(key)
        seen.add(key)

    values = {
        "num_chars": float(len(text)),
        "num_lines": float(num_lines),
        "word_count": float(num_words),
        "mean_word_length": _ratio(sum(map(len, words)), num_words),
        "frac_unique_words": _ratio(len(counts), num_words),
        "unigram_entropy": entropy,
        "stop_word_frac": _ratio(sum(c for w, c in counts.items() if w in STOP_WORDS), num_words),
        "symbol_to_word_ratio": _ratio(sum(text.count(s) for s in SYMBOLS), num_raw),
        "frac_no_alpha_words": _ratio(sum(not any(ch.isalpha() for ch in w) for w in raw), num_raw),
        "frac_all_caps_words": _ratio(sum(w.isupper() for w in raw), num_raw),
        "frac_upper_chars": _ratio(sum(ch.isupper() for ch in letters), len(letters)),
        "frac_alpha_chars": _ratio(len(letters), non_space),
        "frac_lines_end_punct": _ratio(sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines), num_lines),
        "frac_lines_end_ellipsis": _ratio(sum(line.endswith(ELLIPSES) for line in lines), num_lines),
        "frac_lines_bullet": _ratio(sum(line.lstrip().startswith(BULLETS) for line in lines), num_lines),
        "frac_dupe_lines": _ratio(dupe_lines, num_lines),
        "frac_chars_dupe_lines": _ratio(dupe_line_chars, sum(len(line.strip()) for line in lines)),
    }
    values.update(_paragraph_repetition(text))
    values.update(_whitespace_word_signals(text))
    values["num_sentences"] = float(len(_SENTENCE.findall(text)))
    values["frac_numeric_chars_per_line"] = _ratio(sum(map(_numeric_fraction, lines)), num_lines)
    values.update(_ngram_coverage(words))
    return {name: float(values[name]) for name in SIGNAL_NAMES}
