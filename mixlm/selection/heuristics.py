"""Heuristic document filters: thresholds over the rule signals (`signals.py`), as named presets or YAML rules.

A `Rule` keeps a document when `min <= value <= max` (either bound optional), where value is the signal, or
the signal times another column with `times` (a count from a fraction: stop words = stop_word_frac x
word_count). NaN (a signal undefined for the document) fails the rule. `apply_rules` checks rules in order
and counts every dropped document against the first rule it fails, as DCLM's sequential filters do.

The `refinedweb` preset is DCLM-baseline's RefinedWeb heuristics (DCLM `dclm_baseline_refinedweb.yaml`, with
DCLM's thresholds: word count 50..100000, mean word length 3..10, symbol/word <= 0.1, bullet lines <= 0.9,
ellipsis lines <= 0.3, non-alphabetic words <= 0.2, >= 2 of Gopher's stop words, then Gopher's repetition
filters in DCLM's order). Word length, symbols, non-alphabetic words and stop words are over whitespace words
(`text.split()`) and the paragraph rules over blank-line paragraphs, as DCLM computes them. Where mixlm's
signal still differs, the rule says so: the page length counts mixlm's normalised words (DCLM: fastText
tokens without punctuation), duplicate lines count the repeats after the first occurrence (DCLM counts every
copy; paragraphs count every copy, as DCLM), bullets and ellipses are mixlm's (wider) sets, and the n-gram rules use normalised (lower-cased) words
(DCLM: Unicode word segments, case kept). Not covered:
the URL and language-id filters, and DCLM's line-level modifiers with their word-removal-ratio filter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mixlm.selection import SelectionError


@dataclass(frozen=True)
class Rule:
    signal: str
    min: float | None = None
    max: float | None = None
    times: str | None = None  # compare signal * column `times` (e.g. a fraction of words x word_count)
    why: str = ""

    @property
    def name(self) -> str:
        value = f"{self.signal} x {self.times}" if self.times else self.signal
        if self.min is not None and self.max is not None:
            return f"{self.min:g} <= {value} <= {self.max:g}"
        return f"{value} >= {self.min:g}" if self.min is not None else f"{value} <= {self.max:g}"

    def passes(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """bool [n]: which documents satisfy the rule (NaN fails)."""
        value = np.asarray(columns[self.signal], np.float64)
        if self.times:
            value = value * np.asarray(columns[self.times], np.float64)
        ok = ~np.isnan(value)
        if self.min is not None:
            ok &= value >= self.min
        if self.max is not None:
            ok &= value <= self.max
        return ok


_GOPHER_TOP = {2: 0.20, 3: 0.18, 4: 0.16}
_GOPHER_DUPE = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

PRESETS: dict[str, tuple[Rule, ...]] = {
    "refinedweb": (
        Rule("word_count", 50, 100_000, why="page length in words, punctuation ignored (DCLM: 50..100000)"),
        Rule("ws_mean_word_length", 3, 10, why="mean whitespace-word length (DCLM: 3..10)"),
        Rule("ws_symbol_to_word_ratio", max=0.1, why="'#' and ellipses per whitespace word (DCLM: 0.1)"),
        Rule("frac_lines_bullet", max=0.9, why="lines starting with a bullet (DCLM: 0.9)"),
        Rule("frac_lines_end_ellipsis", max=0.3, why="lines ending in an ellipsis (DCLM: 0.3)"),
        Rule("ws_frac_no_alpha_words", max=0.2, why="whitespace words without a letter (DCLM: 0.2)"),
        Rule("gopher_stop_words", min=2, why="at least 2 of the, be, to, of, and, that, have, with (DCLM: 2)"),
        Rule("frac_dupe_lines", max=0.3, why="Gopher: duplicate lines <= 0.3 (here: repeats after the first)"),
        Rule("frac_dupe_paragraphs", max=0.3, why="Gopher: duplicate paragraphs <= 0.3"),
        Rule("frac_chars_dupe_lines", max=0.2, why="Gopher: characters in duplicate lines <= 0.2"),
        Rule("frac_chars_dupe_paragraphs", max=0.2, why="Gopher: characters in duplicate paragraphs <= 0.2"),
        *(Rule(f"frac_chars_top_{n}gram", max=v, why=f"Gopher: most common {n}-gram <= {v}")
          for n, v in _GOPHER_TOP.items()),
        *(Rule(f"frac_chars_dupe_{n}gram", max=v, why=f"Gopher: characters in repeated {n}-grams <= {v}")
          for n, v in _GOPHER_DUPE.items()),
    ),
}


def parse_rules(spec) -> list[Rule]:
    """A preset name, or a list of {signal, min, max, times} mappings (YAML), → rules."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise SelectionError(f"heuristic preset {spec!r}: use one of {sorted(PRESETS)} or list rules")
        return list(PRESETS[spec])
    if not isinstance(spec, Sequence) or not spec:
        raise SelectionError(f"heuristic rules: expected a preset name or a list of {{signal, min, max}}, got {spec!r}")
    rules = []
    for i, item in enumerate(spec):
        fields = {"signal", "min", "max", "times", "why"}
        if not isinstance(item, Mapping) or "signal" not in item or set(item) - fields:
            raise SelectionError(f"heuristic rule {i + 1}: expected {{signal: NAME, min: x, max: y}}, got {item!r}")
        bounds = [item.get("min"), item.get("max")]
        if all(b is None for b in bounds) or any(
                b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b))
                for b in bounds):
            raise SelectionError(f"heuristic rule {i + 1} ({item['signal']}): give a number min, max or both")
        rules.append(Rule(**item))
    return rules


def apply_rules(columns: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> tuple[np.ndarray, dict[str, int]]:
    """(bool [n] keep, {rule name: documents dropped by it}) — each dropped document counted once, against
    the first rule it fails, in rule order."""
    needed = {r.signal for r in rules} | {r.times for r in rules if r.times}
    missing = sorted(needed - set(columns))
    if missing:
        raise SelectionError(f"heuristic rules need signals {missing}, which the tables lack; compute the rule "
                             "signals (`mixlm select signals` without --no-rules)")
    n = len(next(iter(columns.values()))) if columns else 0
    keep = np.ones(n, bool)
    dropped = {}
    for rule in rules:
        fails = keep & ~rule.passes(columns)
        dropped[rule.name] = int(fails.sum())
        keep &= ~fails
    return keep, dropped


def describe(rules: Sequence[Rule]) -> list[dict]:
    """JSON-ready rules for reports."""
    return [{k: v for k, v in asdict(r).items() if v not in (None, "")} | {"name": r.name} for r in rules]
