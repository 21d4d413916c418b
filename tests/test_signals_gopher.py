"""The Gopher / DCLM and RedPajama-v2 signals of `mixlm.selection.signals`, each against arithmetic done by
hand: paragraph repetition (every copy counted), whitespace-word ratios, Gopher's stop-word count, the
RedPajama-v2 sentence count and per-line numeric fraction; and the `refinedweb` preset's rules over them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixlm.selection.heuristics import PRESETS, apply_rules
from mixlm.selection.signals import compute_signals


def test_paragraph_repetition_counts_every_copy_of_a_repeated_paragraph():
    text = "Alpha beta.\n\nGamma delta epsilon.\n\nAlpha beta.\n\n  \n\nAlpha beta.\n\nZeta."
    # paragraphs (the blank "  " one dropped): "Alpha beta." (11) x3, "Gamma delta epsilon." (20), "Zeta." (5)
    got = compute_signals(text)
    assert got["frac_dupe_paragraphs"] == pytest.approx(3 / 5)
    assert got["frac_chars_dupe_paragraphs"] == pytest.approx(33 / (33 + 20 + 5))
    # the line signal counts only the repeats after the first copy: 2 of 5 non-blank lines
    assert got["frac_dupe_lines"] == pytest.approx(2 / 5)


def test_paragraphs_split_on_a_blank_line_only():
    # "a\n\n\nb" → "a", "\nb" → stripped "a", "b": two paragraphs; single newlines do not split
    assert compute_signals("same\n\n\nsame")["frac_dupe_paragraphs"] == 1.0
    one = compute_signals("same\nsame")
    assert one["frac_dupe_paragraphs"] == 0.0 and one["frac_chars_dupe_paragraphs"] == 0.0
    empty = compute_signals("")
    assert math.isnan(empty["frac_dupe_paragraphs"]) and math.isnan(empty["frac_chars_dupe_paragraphs"])


def test_whitespace_word_ratios():
    text = "Hello, world... #1 — it's 3.5 km… ok"
    # whitespace words (8): "Hello," 6, "world..." 8, "#1" 2, "—" 1, "it's" 4, "3.5" 3, "km…" 3, "ok" 2 = 29
    got = compute_signals(text)
    assert got["ws_mean_word_length"] == pytest.approx(29 / 8)
    assert got["ws_symbol_to_word_ratio"] == pytest.approx(3 / 8)  # '#', '...', '…'
    assert got["ws_frac_no_alpha_words"] == pytest.approx(3 / 8)  # "#1", "—", "3.5"
    # the raw-word version counts punctuation runs as words: 10 of 16 have no letter
    assert got["frac_no_alpha_words"] == pytest.approx(10 / 16)
    spaced = compute_signals("Wait . . . what")  # 5 whitespace words, one spaced ellipsis (DCLM counts it)
    assert spaced["ws_symbol_to_word_ratio"] == pytest.approx(1 / 5)
    for name in ("ws_mean_word_length", "ws_symbol_to_word_ratio", "ws_frac_no_alpha_words"):
        assert math.isnan(compute_signals(" \n ")[name]), name


def test_gopher_stop_words_are_whole_whitespace_words_lower_cased():
    text = "The THE the, To be or not to be, that Have WITH with."
    # the THE To be to that Have WITH count (8); "the," "be," "with." keep their punctuation and do not
    assert compute_signals(text)["gopher_stop_words"] == 8
    assert compute_signals("")["gopher_stop_words"] == 0


@pytest.mark.parametrize("text, sentences", [
    ("Hi there. How are you? Fine!!! ok", 4),
    ("3.14 is pi", 2),  # "3." then "14 is pi": the pattern splits at any '.'
    ("...", 0),  # no word boundary to start at
    ("", 0),
])
def test_num_sentences_follows_the_redpajama_pattern(text, sentences):
    assert compute_signals(text)["num_sentences"] == sentences


def test_numeric_fraction_is_the_mean_over_lines_of_normalised_lines():
    text = "Price: 100 USD\n\n2024-01-01\nno digits here\n!!!"
    # lines: "price 100 usd" 3 of 13, "20240101" 8 of 8, "no digits here" 0, "!!!" no words → 0
    got = compute_signals(text)["frac_numeric_chars_per_line"]
    assert got == pytest.approx((3 / 13 + 1 + 0 + 0) / 4)
    assert math.isnan(compute_signals("")["frac_numeric_chars_per_line"])


SENTENCES = [
    "The river that runs past the old mill has changed its course twice in the last century.",
    "Each time, the farmers who worked the fields on its banks had to move their fences and rebuild the bridges.",
    "Records kept by the parish show that the first flood came in the spring, after a winter of heavy snow.",
    "The second followed a week of storms, and the water stood in the lower fields until the end of summer.",
]


def _first_failure(text):
    columns = {k: np.array([v]) for k, v in compute_signals(text).items()}
    keep, dropped = apply_rules(columns, PRESETS["refinedweb"])
    return None if keep[0] else next(name for name, n in dropped.items() if n)


def test_refinedweb_preset_uses_the_whitespace_and_paragraph_signals():
    prose = " ".join(SENTENCES)
    numbers = " ".join(str(10 + i) for i in range(25))  # 25 of 102 whitespace words without a letter: 0.245
    assert len(prose.split()) == 77
    cases = [
        (prose, None),
        ("\n\n".join(SENTENCES), None),
        (prose + " " + numbers, "ws_frac_no_alpha_words <= 0.2"),
        # a short paragraph twice: 2 of 6 paragraphs (every copy) fail <= 0.3, while 1 of 6 lines passes
        ("\n\n".join(SENTENCES + ["Thanks for reading."] * 2), "frac_dupe_paragraphs <= 0.3"),
    ]
    assert [_first_failure(text) for text, _ in cases] == [rule for _, rule in cases]
    signals = {r.signal for r in PRESETS["refinedweb"]}
    assert {"ws_mean_word_length", "ws_symbol_to_word_ratio", "ws_frac_no_alpha_words", "gopher_stop_words",
            "frac_dupe_paragraphs", "frac_chars_dupe_paragraphs"} <= signals
    assert not signals & {"mean_word_length", "symbol_to_word_ratio", "frac_no_alpha_words", "stop_word_frac"}
    bound = {r.signal: (r.min, r.max) for r in PRESETS["refinedweb"]}
    assert bound["ws_frac_no_alpha_words"] == (None, 0.2) and bound["gopher_stop_words"] == (2, None)
    assert bound["frac_dupe_paragraphs"] == (None, 0.3) and bound["frac_chars_dupe_paragraphs"] == (None, 0.2)
