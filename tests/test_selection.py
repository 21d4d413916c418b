"""Data selection: hand-computed signals, percentile scoring, budgeted / random selection, the DCLM
classifier, and the `mixlm select` CLI end to end on tiny files."""

from __future__ import annotations

import gzip
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import zstandard

from mixlm.cli import main
from mixlm.selection import SelectionError
from mixlm.selection.classifier import load_classifier, train_classifier
from mixlm.selection.pick import (
    combine_scores,
    parse_weights,
    percentile_ranks,
    sample_rater_weightings,
    select_random,
    select_top,
)
from mixlm.selection.signals import SIGNAL_NAMES, compute_signals

# ---------------------------------------------------------------------------------------------------
# Rule-based signals, each against arithmetic done by hand.

PROSE = "The cat sat on the mat.\nThe cat sat on the mat.\nDogs bark!"
# normalised words (14): the cat sat on the mat | the cat sat on the mat | dogs bark
#   lengths 3 3 3 2 3 3 = 17 per sentence, x2 = 34, + dogs 4 + bark 4 = 42 characters
# raw words (17): The cat sat on the mat . (7) x2 + Dogs bark ! (3)
PROSE_EXPECTED = {
    "num_chars": 23 + 1 + 23 + 1 + 10,  # two 23-char lines, "Dogs bark!", two newlines = 58
    "num_lines": 3,
    "word_count": 14,
    "mean_word_length": 42 / 14,
    "frac_unique_words": 7 / 14,  # the cat sat on mat dogs bark
    # counts: the 4, cat/sat/on/mat 2 each, dogs/bark 1 each; -sum p ln p
    "unigram_entropy": 4 / 14 * math.log(14 / 4) + 4 * (2 / 14 * math.log(14 / 2)) + 2 * (1 / 14 * math.log(14)),
    "stop_word_frac": (4 + 2) / 14,  # the x4, on x2
    "symbol_to_word_ratio": 0 / 17,
    "frac_no_alpha_words": 3 / 17,  # . . !
    "frac_all_caps_words": 0 / 17,
    "frac_upper_chars": 3 / 42,  # T T D of 42 letters
    "frac_alpha_chars": 42 / (58 - 11 - 2),  # 58 chars less 11 spaces and 2 newlines = 45
    "frac_lines_end_punct": 3 / 3,
    "frac_lines_end_ellipsis": 0 / 3,
    "frac_lines_bullet": 0 / 3,
    "frac_dupe_lines": 1 / 3,  # line 2 repeats line 1
    "frac_chars_dupe_lines": 23 / (23 + 23 + 10),
    "frac_dupe_paragraphs": 0 / 1,  # no blank line: one paragraph
    "frac_chars_dupe_paragraphs": 0 / 58,
    # whitespace words (14): The cat sat on the mat. (3 3 3 2 3 4 = 18) x2, Dogs bark! (4 5)
    "ws_mean_word_length": (18 + 18 + 9) / 14,
    "ws_symbol_to_word_ratio": 0 / 14,
    "ws_frac_no_alpha_words": 0 / 14,
    "gopher_stop_words": 4,  # The the The the ("on" is not one of Gopher's 8)
    "num_sentences": 3,  # "The cat sat on the mat." x2, "Dogs bark!"
    "frac_numeric_chars_per_line": 0.0,
    # top 2-gram: every repeated bigram occurs twice; the longest (6 chars) first one is "the cat",
    # at words 0-1 and 6-7: 12 of 42 characters
    "frac_chars_top_2gram": 12 / 42,
    "frac_chars_top_3gram": 18 / 42,  # "the cat sat" (9 chars) twice
    "frac_chars_top_4gram": 22 / 42,  # "the cat sat on" (11 chars) twice
    # 2- to 6-grams: repeated ones cover both sentences entirely (34 chars), never "dogs bark"
    **{f"frac_chars_dupe_{n}gram": 34 / 42 for n in (2, 3, 4, 5, 6)},
    # the 7-grams starting at words 0 and 6 differ in their last word (the / dogs): none repeats
    **{f"frac_chars_dupe_{n}gram": 0.0 for n in (7, 8, 9, 10)},
}

WEB = "# BUY NOW...\n\n- item one\n  - item one\n123 456\n"
# lines (blank dropped): "# BUY NOW..." (12) "- item one" (10) "  - item one" (12, stripped 10) "123 456" (7)
# normalised words (8): buy now item one item one 123 456 — lengths 3 3 4 3 4 3 3 3 = 26 characters
# raw words (12): # BUY NOW ... - item one - item one 123 456
WEB_EXPECTED = {
    "num_chars": 12 + 1 + 1 + 10 + 1 + 12 + 1 + 7 + 1,  # = 46, with the blank line's newline
    "num_lines": 4,
    "word_count": 8,
    "mean_word_length": 26 / 8,
    "frac_unique_words": 6 / 8,
    "unigram_entropy": 2 * (2 / 8 * math.log(8 / 2)) + 4 * (1 / 8 * math.log(8)),  # = 2.5 ln 2
    "stop_word_frac": 0 / 8,
    "symbol_to_word_ratio": 2 / 12,  # one '#', one '...'
    "frac_no_alpha_words": 6 / 12,  # # ... - - 123 456
    "frac_all_caps_words": 2 / 12,  # BUY NOW
    "frac_upper_chars": 6 / 20,  # BUYNOW of 6 + 7 + 7 letters
    "frac_alpha_chars": 20 / 32,  # non-space: 10 + 8 + 8 + 6
    "frac_lines_end_punct": 1 / 4,  # "NOW..." ends in "."
    "frac_lines_end_ellipsis": 1 / 4,
    "frac_lines_bullet": 2 / 4,
    "frac_dupe_lines": 1 / 4,
    "frac_chars_dupe_lines": 10 / (12 + 10 + 10 + 7),
    # paragraphs: "# BUY NOW..." and "- item one\n  - item one\n123 456", neither repeated
    "frac_dupe_paragraphs": 0 / 2,
    "frac_chars_dupe_paragraphs": 0 / (12 + 31),
    # whitespace words (11): # BUY NOW... - item one - item one 123 456
    "ws_mean_word_length": (1 + 3 + 6 + 1 + 4 + 3 + 1 + 4 + 3 + 3 + 3) / 11,
    "ws_symbol_to_word_ratio": 2 / 11,  # '#', '...'
    "ws_frac_no_alpha_words": 5 / 11,  # # - - 123 456
    "gopher_stop_words": 0,
    # "BUY NOW...", then from "item" to the end (no . ! ? after it)
    "num_sentences": 2,
    # normalised lines "buy now", "item one", "item one", "123 456" (6 digits of 7 characters)
    "frac_numeric_chars_per_line": (0 + 0 + 0 + 6 / 7) / 4,
    "frac_chars_top_2gram": (4 + 3 + 4 + 3) / 26,  # "item one" twice
    "frac_chars_top_3gram": 0.0,  # no 3-gram repeats
    "frac_chars_top_4gram": 0.0,
    "frac_chars_dupe_2gram": (4 + 3 + 4 + 3) / 26,
    **{f"frac_chars_dupe_{n}gram": 0.0 for n in (3, 4, 5, 6, 7, 8, 9, 10)},
}


@pytest.mark.parametrize("text, expected", [(PROSE, PROSE_EXPECTED), (WEB, WEB_EXPECTED)], ids=["prose", "web"])
def test_signals_equal_hand_computed_values(text, expected):
    assert set(expected) == set(SIGNAL_NAMES)
    got = compute_signals(text)
    for name in SIGNAL_NAMES:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_signals_of_an_empty_document_are_nan_where_undefined():
    got = compute_signals("")
    assert got["word_count"] == 0 and got["num_lines"] == 0 and got["num_chars"] == 0
    for name in ("mean_word_length", "frac_unique_words", "unigram_entropy", "symbol_to_word_ratio",
                 "frac_lines_end_punct", "frac_dupe_lines", "frac_upper_chars"):
        assert math.isnan(got[name]), name
    assert got["frac_chars_dupe_2gram"] == 0.0


def test_overlapping_ngrams_count_each_character_once():
    # "a a a a": the bigram (a, a) occurs 3 times but covers only 4 characters, not 6.
    got = compute_signals("a a a a")
    assert got["frac_chars_dupe_2gram"] == 1.0 and got["frac_chars_top_2gram"] == 1.0
    assert got["frac_chars_dupe_3gram"] == 1.0  # (a a a) twice, at 0 and 1
    assert got["frac_chars_dupe_4gram"] == 0.0  # once only


# ---------------------------------------------------------------------------------------------------
# Percentiles, combination, selection.


def test_percentile_ranks_are_mid_ranks_with_nan_last():
    np.testing.assert_allclose(percentile_ranks([1, 2, 2, 4]), [0.125, 0.5, 0.5, 0.875])
    np.testing.assert_allclose(percentile_ranks([1, 2, 2, 4], higher_is_better=False), [0.875, 0.5, 0.5, 0.125])
    # n = 5, two NaNs tie below everything: (0 + 2/2)/5 = 0.2; then 1 → (2 + 0.5)/5, 2 → 3.5/5, 3 → 4.5/5
    np.testing.assert_allclose(percentile_ranks([3, np.nan, 1, np.nan, 2]), [0.9, 0.2, 0.5, 0.2, 0.7])
    np.testing.assert_allclose(percentile_ranks([3, np.nan, 1, np.nan, 2], False), [0.5, 0.2, 0.9, 0.2, 0.7])


TABLE = {"a": np.array([10.0, 20, 30, 40]), "b": np.array([0.1, 0.4, 0.3, 0.2])}


def test_combination_of_weighted_percentiles():
    weights = parse_weights({"a": 3, "b": {"weight": 1, "higher_is_better": False}}, list(TABLE))
    # a (higher better): [.125 .375 .625 .875]; b (lower better): [.875 .125 .375 .625]
    # (3 a + b) / 4 = [(.375+.875)/4, (1.125+.125)/4, (1.875+.375)/4, (2.625+.625)/4]
    np.testing.assert_allclose(combine_scores(TABLE, weights), [0.3125, 0.3125, 0.5625, 0.8125])


def test_weights_are_validated_with_actionable_errors():
    available = ["frac_unique_words", "word_count", "fineweb_edu"]
    with pytest.raises(SelectionError, match="unknown signal 'frac_uniqe_words'.*closest: frac_unique_words"):
        parse_weights({"frac_uniqe_words": 1}, available)
    with pytest.raises(SelectionError, match="no natural direction"):
        parse_weights({"word_count": 1}, available)
    with pytest.raises(SelectionError, match="higher_is_better: false"):
        parse_weights({"fineweb_edu": -1}, available)
    (w,) = parse_weights({"word_count": {"weight": 2, "higher_is_better": True}}, available)
    assert (w.weight, w.higher_is_better) == (2.0, True)
    (w,) = parse_weights({"fineweb_edu": 1}, available)  # an input column: higher is better
    assert w.higher_is_better


def test_select_top_budget_is_greedy_and_never_exceeded():
    scores = np.array([0.3125, 0.3125, 0.5625, 0.8125])  # order: 3, 2, 0, 1 (tie → lower index)
    # sizes 1 7 4 6, budget 9: take 3 (6, 3 left), skip 2 (4 > 3), take 0 (1, 2 left), skip 1 (7)
    np.testing.assert_array_equal(select_top(scores, np.array([1, 7, 4, 6]), budget=9), [0, 3])
    np.testing.assert_array_equal(select_top(scores, np.array([5, 5, 5, 5]), budget=12), [2, 3])
    np.testing.assert_array_equal(select_top(scores, np.array([5, 5, 5, 5]), top_fraction=0.5), [2, 3])
    # size-0 documents are never chosen
    np.testing.assert_array_equal(select_top(scores, np.array([1, 1, 1, 0]), budget=10), [0, 1, 2])

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        scores, sizes = rng.random(n).round(1), rng.integers(0, 50, n)
        budget = int(rng.integers(0, sizes.sum() + 10))
        chosen = select_top(scores, sizes, budget=budget)
        # a plain loop, the definition
        expected, left = [], budget
        for i in sorted(range(n), key=lambda i: (-scores[i], i)):
            if 0 < sizes[i] <= left:
                expected.append(i)
                left -= sizes[i]
        np.testing.assert_array_equal(chosen, sorted(expected))
        assert sizes[chosen].sum() <= budget


def test_random_baseline_matches_budget_within_one_document_and_is_seeded():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 100, 500)
    for budget in (0, 1234, 9999, int(sizes.sum()) + 5):
        chosen = select_random(sizes, budget, seed=3)
        total = int(sizes[chosen].sum())
        assert total <= budget
        assert total == sizes.sum() or budget - total < sizes.max()  # within one document
    a, b, c = (select_random(sizes, 5000, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rater_weightings_are_dirichlet_and_seeded():
    names = ["a", "b", "c"]
    ws = sample_rater_weightings(names, 16, seed=0, alpha=0.5)
    assert len(ws) == 16 and all(list(w) == names for w in ws)
    assert all(abs(sum(w.values()) - 1) < 1e-12 and min(w.values()) >= 0 for w in ws)
    assert ws == sample_rater_weightings(names, 16, seed=0, alpha=0.5)
    assert ws != sample_rater_weightings(names, 16, seed=1, alpha=0.5)
    with pytest.raises(SelectionError):
        sample_rater_weightings(["a", "a"], 2, seed=0)


# ---------------------------------------------------------------------------------------------------
# Classifier.

SCIENCE = ["theorem", "proof", "lemma", "hypothesis", "experiment", "measurement", "analysis", "result", "method", "equation"]
SPAM = ["buy", "cheap", "deal", "free", "click", "offer", "discount", "sale", "winner", "prize", "limited", "hurry"]
FILLER = ["the", "a", "of", "and", "to", "in", "is", "that", "it", "for"]


def _styled(vocab, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab + FILLER) for _ in range(rng.randint(15, 40))) for _ in range(n)]


@pytest.mark.parametrize("backend", ["sklearn", "fasttext"])
def test_classifier_separates_two_styles(tmp_path, backend):
    if backend == "fasttext":
        pytest.importorskip("fasttext")
    options = {"bucket": 2**14, "dim": 16, "epoch": 10}  # a small model: the test writes it to disk
    meta = train_classifier(_styled(SCIENCE, 200, 0), _styled(SPAM, 200, 1), tmp_path, backend=backend,
                            signal="quality", fasttext_options=options)
    assert meta["held_out"] == 40 and meta["held_out_accuracy"] > 0.9
    clf = load_classifier(tmp_path)
    assert clf.signal == "quality"
    pos, neg = clf.score(_styled(SCIENCE, 50, 2)), clf.score(_styled(SPAM, 50, 3))
    accuracy = (np.sum(pos >= 0.5) + np.sum(neg < 0.5)) / 100
    assert accuracy > 0.9 and np.all((pos >= 0) & (pos <= 1))


class _Planted:
    """A pickle that creates `path` when unpickled: what a hostile model.joblib could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickle(folder, marker):
    import joblib

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classifier.json").write_text(json.dumps({"backend": "sklearn", "signal": "quality"}))
    joblib.dump(_Planted(marker), folder / "model.joblib")


def test_classifier_round_trips_without_unpickling(tmp_path, monkeypatch):
    import pickle

    import joblib

    from mixlm.selection import classifier as clf_mod

    docs = _styled(SCIENCE, 30, 5) + _styled(SPAM, 30, 6)
    model = clf_mod._sklearn_model(0, 1.0).fit(docs, [1] * 30 + [0] * 30)
    train_classifier(_styled(SCIENCE, 40, 0), _styled(SPAM, 40, 1), tmp_path / "clf", signal="quality")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier.json", "model.npz"]
    clf_mod.save_sklearn_model(model, tmp_path / "clf" / "model.npz")

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    for target, name in ((pickle, "load"), (pickle, "loads"), (joblib, "load")):
        monkeypatch.setattr(target, name, refuse)
    loaded = load_classifier(tmp_path / "clf")
    texts = _styled(SCIENCE, 20, 7) + _styled(SPAM, 20, 8)
    assert np.array_equal(loaded.score(texts), model.predict_proba(texts)[:, 1])  # identical, not close


def test_pickled_classifier_is_refused_unless_trusted(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "old", marker)
    with pytest.raises(SelectionError, match=r"model.joblib: a pickled classifier.*retrain.*--trust-pickle"):
        load_classifier(tmp_path / "old")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a document"}) + "\n")
    capsys.readouterr()
    assert main(["select", "classifier", "score", str(docs), "--model", str(tmp_path / "old"),
                 "--out", str(tmp_path / "scores")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-pickle" in err
    assert not marker.exists()

    # An older folder that is trusted: converted to model.npz once, then scored the same without the flag.
    import joblib

    from mixlm.selection.classifier import _sklearn_model

    model = _sklearn_model(0, 1.0).fit(_styled(SCIENCE, 30, 5) + _styled(SPAM, 30, 6), [1] * 30 + [0] * 30)
    (tmp_path / "old" / "model.joblib").unlink()
    joblib.dump(model, tmp_path / "old" / "model.joblib")
    assert main(["select", "classifier", "score", str(docs), "--model", str(tmp_path / "old"),
                 "--out", str(tmp_path / "scores"), "--format", "jsonl", "--trust-pickle"]) == 0
    assert (tmp_path / "old" / "model.npz").is_file()
    texts = _styled(SCIENCE, 5, 9)
    assert np.array_equal(load_classifier(tmp_path / "old").score(texts), model.predict_proba(texts)[:, 1])


# ---------------------------------------------------------------------------------------------------
# CLI end to end.


def _write_corpus(tmp_path):
    """Three shards (plain, gz, zst) of 60 good and bad documents, with 4 malformed lines in the first."""
    rng = random.Random(0)
    docs = []
    for i in range(60):
        text = " ".join(_styled(SCIENCE, 1, i)) + "." if i % 2 else "BUY NOW!!! ### " + _styled(SPAM, 1, i)[0]
        docs.append(json.dumps({"text": text, "id": i, "meta": {"edu": rng.random()}}))
    plain = tmp_path / "a.jsonl"
    malformed = ["{broken json", json.dumps({"body": "no text"}), json.dumps({"text": 5}), json.dumps({"text": " "})]
    plain.write_text("\n".join(docs[:3] + malformed + docs[3:20]) + "\n")  # lines 4-7 are malformed
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(docs[20:40]) + "\n")
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(docs[40:]) + "\n").encode()))
    return [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")], docs


def _read_zst_lines(path):
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read().decode().splitlines()


def test_cli_signals_pick_and_random_baseline(tmp_path, capsys):
    inputs, docs = _write_corpus(tmp_path)
    sig = tmp_path / "sig"
    assert main(["select", "signals", *inputs, "--out", str(sig), "--rating-columns", "meta.edu",
                 "--workers", "2"]) == 0
    report = json.loads((sig / "signals_report.json").read_text())
    assert report["documents"] == 60 and report["malformed_lines"] == 4
    assert report["malformed"] == {"invalid_json": 1, "missing_field": 2, "empty": 1}
    assert "a.jsonl:4: invalid json: " in report["malformed_examples"][0]
    assert report["malformed_examples"][1].endswith("a.jsonl:5: missing field: no field 'text'")
    assert report["malformed_examples"][2].endswith("a.jsonl:6: missing field: field 'text' is int, not text")

    weights = tmp_path / "w.yaml"
    weights.write_text("frac_unique_words: 1\nsymbol_to_word_ratio: 2\nmeta.edu: 0.5\n")
    out, rnd = tmp_path / "top", tmp_path / "rnd"
    assert main(["select", "pick", "--signals", str(sig), "--weights", str(weights), "--budget", "400",
                 "--budget-unit", "words", "--out", str(out), "--random-out", str(rnd), "--seed", "1",
                 "--plot"]) == 0
    top = json.loads((out / "report.json").read_text())
    assert top["documents_in"] == 60 and 0 < top["words_out"] <= 400
    assert top["documents_out"] == len(_read_zst_lines(out / "documents.jsonl.zst"))
    # verbatim input lines, with the input file they came from appended
    sources = {doc: path for path, part in zip(inputs, (docs[:20], docs[20:40], docs[40:])) for doc in part}
    for line in _read_zst_lines(out / "documents.jsonl.zst"):
        original, sep, source = line.rpartition(', "source_file": ')
        assert sep and source == json.dumps(sources[original + "}"]) + "}"
    kept_text = [json.loads(line)["text"] for line in _read_zst_lines(out / "documents.jsonl.zst")]
    assert sum(t.startswith("BUY NOW") for t in kept_text) < len(kept_text) / 4  # the '#' ones go
    assert (out / "signals.png").stat().st_size > 0
    base = json.loads((rnd / "report.json").read_text())
    assert base["method"] == "random" and base["words_out"] <= 400
    assert top["random_baseline"]["words_out"] == base["words_out"]

    # an unknown signal names the closest ones; exit code 2
    assert main(["select", "pick", "--signals", str(sig), "--weights", "{frac_uniq_words: 1}",
                 "--top-fraction", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "closest: frac_unique_words" in capsys.readouterr().err


def test_cli_strict_stops_at_the_first_bad_line(tmp_path, capsys):
    inputs, _ = _write_corpus(tmp_path)
    assert main(["select", "signals", inputs[0], "--out", str(tmp_path / "s"), "--strict"]) == 2
    assert "a.jsonl:4: invalid json" in capsys.readouterr().err


def test_cli_classifier_train_score_and_keep_top_fraction(tmp_path):
    pos, neg = tmp_path / "pos.jsonl", tmp_path / "neg.jsonl"
    pos.write_text("".join(json.dumps({"text": t}) + "\n" for t in _styled(SCIENCE, 100, 10)))
    neg.write_text("".join(json.dumps({"text": t}) + "\n" for t in _styled(SPAM, 100, 11)))
    clf = tmp_path / "clf"
    assert main(["select", "classifier", "train", "--pos", str(pos), "--neg", str(neg), "--out", str(clf),
                 "--signal", "dclm"]) == 0
    assert json.loads((clf / "classifier.json").read_text())["held_out_accuracy"] > 0.9

    inputs, _ = _write_corpus(tmp_path)
    scores = tmp_path / "scores"
    assert main(["select", "classifier", "score", *inputs, "--model", str(clf), "--out", str(scores),
                 "--format", "jsonl"]) == 0
    sig = tmp_path / "sig"
    assert main(["select", "signals", *inputs[1:], "--out", str(sig)]) == 0  # 40 of the 60 documents
    out = tmp_path / "kept"
    # joined on (file, line): only the documents in both folders; num_chars, in both, must agree
    assert main(["select", "pick", "--signals", str(scores), str(sig), "--weights", "{dclm: 1}",
                 "--top-fraction", "0.25", "--out", str(out)]) == 0
    kept = [json.loads(line)["text"] for line in _read_zst_lines(out / "documents.jsonl.zst")]
    assert len(kept) == 10 and not any(t.startswith("BUY NOW") for t in kept)  # floor(0.25 * 40)


def test_cli_reruns_reuse_tables_and_notice_changed_inputs(tmp_path, capsys):
    inputs, _ = _write_corpus(tmp_path)
    sig = str(tmp_path / "sig")
    assert main(["select", "signals", *inputs, "--out", sig]) == 0
    tables = sorted((tmp_path / "sig").glob("*.signals.parquet"))
    stamps = [t.stat().st_mtime_ns for t in tables]
    assert main(["select", "signals", *inputs, "--out", sig]) == 0
    assert [t.stat().st_mtime_ns for t in tables] == stamps  # finished shards are not redone
    with open(inputs[0], "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert main(["select", "pick", "--signals", sig, "--weights", "{stop_word_frac: 1}", "--top-fraction", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "changed since its signals" in capsys.readouterr().err
    assert main(["select", "signals", *inputs, "--out", sig]) == 0  # only the changed shard is redone
    assert [t.stat().st_mtime_ns for t in tables][1:] == stamps[1:] and tables[0].stat().st_mtime_ns != stamps[0]


def test_cli_weightings_and_list(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["select", "weightings", "--signals", "a,b,c", "--n", "4", "--seed", "3", "--out", str(out)]) == 0
    rows = (out / "weightings.csv").read_text().splitlines()
    assert rows[0] == "index,a,b,c" and len(rows) == 5
    import yaml

    first = yaml.safe_load((out / "weighting_0000.yaml").read_text())
    assert first == sample_rater_weightings(["a", "b", "c"], 4, seed=3)[0]
    assert main(["select", "list"]) == 0
    assert "frac_chars_dupe_5gram" in capsys.readouterr().out


def test_cli_token_budget_and_prepared_domains(tmp_path):
    from mixlm.data.prepared import MANIFEST, DomainManifest
    from mixlm.data.tokenizer import train_tokenizer_from_texts

    inputs, docs = _write_corpus(tmp_path)
    tok = train_tokenizer_from_texts([json.loads(d)["text"] for d in docs], tmp_path / "tok", vocab_size=300)
    sig, top, rnd, prep = (str(tmp_path / n) for n in ("sig", "top", "rnd", "prep"))
    assert main(["select", "signals", *inputs, "--out", sig, "--tokenizer", str(tok), "--format", "jsonl"]) == 0
    assert main(["select", "pick", "--signals", sig, "--weights", "{stop_word_frac: 1}", "--budget", "1.5k",
                 "--out", top, "--random-out", rnd, "--prepare-out", prep, "--tokenizer", str(tok)]) == 0
    report = json.loads((tmp_path / "top" / "report.json").read_text())
    assert report["budget_unit"] == "tokens" and report["tokens_out"] <= 1500
    assert report["tokens_out"] > 1500 - max(len(d) for d in docs)  # greedy fill leaves less than a document
    for name in ("top", "rnd"):
        manifest = DomainManifest.load(tmp_path / "prep" / name / MANIFEST)
        selected = json.loads((tmp_path / name / "report.json").read_text())
        # prepare appends one EOS per document to the tokens counted here
        assert manifest.documents == selected["documents_out"]
        assert manifest.tokens == selected["tokens_out"] + selected["documents_out"]


def test_cli_cut_or_mislabelled_compressed_inputs_are_one_error_naming_the_file(tmp_path, capsys):
    inputs, docs = _write_corpus(tmp_path)
    whole = zstandard.ZstdCompressor().compress(("\n".join(docs) + "\n").encode())
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    read = zstandard.ZstdDecompressor().decompressobj().decompress(cut.read_bytes()).count(b"\n")
    not_zstd = tmp_path / "plain.jsonl.zst"
    not_zstd.write_text("\n".join(docs) + "\n")
    cut_message = (f"{cut}: the zstd data ends in the middle of a compressed frame: the file is cut short (an "
                   f"interrupted download or copy?); stopped after {read:,} lines ({read:,} documents) read")
    for path, message in ((cut, cut_message),
                          (not_zstd, f"{not_zstd}: is not zstd data although its name ends in .zst")):
        for verb in (["signals"], ["dsir", "--target", f"t={inputs[0]}"], ["dedup", "--method", "exact"]):
            capsys.readouterr()
            out = tmp_path / f"out-{verb[0]}-{path.name}"
            assert main(["select", verb[0], str(path), *verb[1:], "--out", str(out)]) == 2, verb
            err = capsys.readouterr().err.splitlines()
            assert err[-1].startswith("mixlm select: error: ") and message in err[-1], (verb, err)
            assert not any("Traceback" in line for line in err)
            assert not (out / "signals_report.json").exists() and not (out / "documents.jsonl.zst").exists()


def test_cli_parquet_inputs_are_read_as_parquet_and_picked_with_their_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, docs = _write_corpus(tmp_path)
    rows = [json.loads(d) for d in docs]
    table = pa.table({"text": [r["text"] for r in rows], "id": [r["id"] for r in rows],
                      "meta": [r["meta"] for r in rows], "domain": ["science" if r["id"] % 2 else "spam" for r in rows]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=16)
    (tmp_path / "docs.jsonl").write_text("\n".join(docs) + "\n")
    for name in ("docs.parquet", "docs.jsonl"):
        assert main(["select", "signals", str(tmp_path / name), "--out", str(tmp_path / f"sig-{name}"),
                     "--rating-columns", "meta.edu", "--format", "jsonl"]) == 0
    report = json.loads((tmp_path / "sig-docs.parquet" / "signals_report.json").read_text())
    assert report["documents"] == 60 and report["malformed_lines"] == 0
    parquet_rows, jsonl_rows = ([{k: v for k, v in json.loads(line).items() if k != "file"}
                                 for line in next((tmp_path / f"sig-{name}").glob("*.signals.jsonl")).read_text().splitlines()]
                                for name in ("docs.parquet", "docs.jsonl"))
    assert parquet_rows == jsonl_rows  # row n of the parquet file is line n of the same documents as jsonl

    out = tmp_path / "top"
    assert main(["select", "pick", "--signals", str(tmp_path / "sig-docs.parquet"), "--weights", "{meta.edu: 1}",
                 "--top-fraction", "0.25", "--out", str(out)]) == 0
    picked = [json.loads(line) for line in _read_zst_lines(out / "documents.jsonl.zst")]
    best = sorted(rows, key=lambda r: -r["meta"]["edu"])[:15]
    assert sorted(r["id"] for r in picked) == sorted(r["id"] for r in best)
    by_id = {r["id"]: r for r in rows}
    for r in picked:  # every field of the row, and the file it came from
        domain = "science" if r["id"] % 2 else "spam"
        assert r == {**by_id[r["id"]], "domain": domain, "source_file": str(tmp_path / "docs.parquet")}
    mix = json.loads((out / "report.json").read_text())["mix"]
    assert mix["field"] == "domain"
    assert {k: v["documents"] for k, v in mix["groups"].items()} == dict(Counter(
        "science" if r["id"] % 2 else "spam" for r in best))


def test_cli_pick_reports_the_real_cutoff_the_fill_and_the_mix(tmp_path, capsys):
    from mixlm.selection.score_folder import write_score_folder

    # A, B, C: 300 characters each; D: 10, E: 8. Quality A > B > C > D > E.
    texts = {name: (name.lower() + " ") * (size // 2) for name, size in (("A", 300), ("B", 300), ("C", 300),
                                                                          ("D", 10), ("E", 8))}
    quality = {"A": 0.9, "B": 0.8, "C": 0.7, "D": 0.1, "E": 0.05}
    web, code = tmp_path / "web.jsonl", tmp_path / "code.jsonl"
    web.write_text("".join(json.dumps({"text": texts[n], "domain": "web"}) + "\n" for n in "ACE"))
    code.write_text("".join(json.dumps({"text": texts[n]}) + "\n" for n in "BD"))  # no domain field
    by_text = {t: quality[n] for n, t in texts.items()}
    write_score_folder([web, code], tmp_path / "sig", lambda batch: {"q": np.array([by_text[t] for t in batch])},
                       settings={"scorer": "test"})
    capsys.readouterr()
    # budget 620 chars: A + B (600) fit outright, C does not; the greedy fill then adds D (10) and E (8)
    assert main(["select", "pick", "--signals", str(tmp_path / "sig"), "--weights", "{q: 1}", "--budget", "620",
                 "--budget-unit", "chars", "--out", str(tmp_path / "top")]) == 0
    report = json.loads((tmp_path / "top" / "report.json").read_text())
    # percentile scores of five documents: E 0.1, D 0.3, C 0.5, B 0.7, A 0.9
    assert report["score_threshold"] == pytest.approx(0.7) and report["top_documents"] == 2
    assert report["fill"] == {"documents": 2, "chars": 18, "score_min": pytest.approx(0.1),
                              "score_max": pytest.approx(0.3)}
    assert report["chars_out"] == 618
    assert report["mix"]["groups"] == {"code.jsonl": {"documents": 2, "chars": 310},
                                       "web": {"documents": 2, "chars": 308}}
    out = capsys.readouterr().out
    assert "score cutoff 0.7000: the best 2 documents that fit the budget outright; the greedy fill then added " \
           "2 documents (18 chars) scoring 0.1000 to 0.3000" in out
    assert "mix by domain (or input file), share of chars: code.jsonl 50.2% (2 documents), web 49.8% (2 documents)" \
        in out
    picked = [json.loads(line) for line in _read_zst_lines(tmp_path / "top" / "documents.jsonl.zst")]
    assert [(r["text"], r["source_file"]) for r in picked] == [(texts["B"], str(code)), (texts["D"], str(code)),
                                                                (texts["A"], str(web)), (texts["E"], str(web))]


def test_perplexity_matches_a_direct_computation_and_ignores_batching(tmp_path):
    import jax
    from flax import nnx

    from mixlm.config import ModelConfig
    from mixlm.data.tokenizer import load_tokenizer_spec, train_tokenizer_from_texts
    from mixlm.models import build_model, merge_params, split_params
    from mixlm.selection.perplexity import perplexity_scores

    texts = ["the cat sat on the mat", "a much longer document " * 6, "", "dogs bark"]
    spec = load_tokenizer_spec(str(train_tokenizer_from_texts(texts * 3, tmp_path / "tok", vocab_size=300)))
    cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, vocab_size=spec.vocab_size,
                      vocab_multiple=1, max_seq_len=8)
    graphdef, params = split_params(build_model(cfg, rngs=nnx.Rngs(0)))
    ppl = perplexity_scores(texts, cfg, graphdef, params, spec, batch_size=4)
    assert math.isnan(ppl[2]) and np.all(np.isfinite(ppl[[0, 1, 3]]))
    np.testing.assert_allclose(perplexity_scores(texts, cfg, graphdef, params, spec, batch_size=1), ppl, rtol=1e-5)

    # "dogs bark" fits one window: exp(mean -log softmax(logits)[target]) after the EOS, by hand
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(spec.backend_json).encode("dogs bark", add_special_tokens=False).ids
    inputs = np.array([[spec.eos_id] + ids[:-1]], np.int32)
    logits = np.asarray(jax.jit(lambda p, x: merge_params(graphdef, p)(x))(params, inputs))[0, :, : cfg.vocab_size]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.exp(-np.mean(log_probs[np.arange(len(ids)), ids]))
    assert ppl[3] == pytest.approx(expected, rel=1e-4)


def test_fasttext_divergence_is_retried_at_a_lower_rate(tmp_path, monkeypatch):
    pytest.importorskip("fasttext")
    from mixlm.selection import classifier

    real, rates = classifier._fit_fasttext, []

    def diverges_once(train_file, model_file, seed, settings):
        rates.append(settings["lr"])
        return "RuntimeError: Encountered NaN." if len(rates) == 1 else real(train_file, model_file, seed, settings)

    monkeypatch.setattr(classifier, "_fit_fasttext", diverges_once)
    train_classifier(_styled(SCIENCE, 40, 0), _styled(SPAM, 40, 1), tmp_path / "clf", backend="fasttext",
                     fasttext_options={"bucket": 2**14, "dim": 16})  # a small model.bin
    assert rates == [0.1, 0.05]
    monkeypatch.setattr(classifier, "_fit_fasttext", lambda *a: "RuntimeError: Encountered NaN.")
    with pytest.raises(SelectionError, match="fastText training failed .* at lr 0.025"):
        train_classifier(_styled(SCIENCE, 40, 0), _styled(SPAM, 40, 1), tmp_path / "clf2", backend="fasttext")


def test_fasttext_trains_the_same_model_whatever_ran_before_in_the_process(tmp_path):
    """A Pallas interpret-mode kernel in the same process used to change what fastText trained for a seed."""
    pytest.importorskip("fasttext")
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def scores(folder):
        train_classifier(_styled(SCIENCE, 100, 0), _styled(SPAM, 100, 1), folder, backend="fasttext",
                         fasttext_options={"bucket": 2**14, "dim": 16, "epoch": 10})
        return load_classifier(folder).score(_styled(SCIENCE, 20, 2))

    before = scores(tmp_path / "a")

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=True)(
        jnp.ones((8, 128))).block_until_ready()
    np.testing.assert_array_equal(scores(tmp_path / "b"), before)
