"""DSIR importance weights and importance resampling: a hand-computed log weight, a target that is part of
the pool ranked first, the `select dsir` signal folder joined by `select pick`, seeded Gumbel top-k."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import zstandard

from mixlm.cli import main
from mixlm.selection import SelectionError
from mixlm.selection.dsir import DSIRSettings, fit_dsir, load_dsir_model, ngram_buckets, parse_targets
from mixlm.selection.pick import importance_resample

B = 2**20  # enough buckets that the handful of n-grams below never share one


def test_log_weight_equals_the_hand_computed_value():
    settings = DSIRSettings(num_buckets=B, ngrams=2, smoothing=1.0)
    # n-grams: "a b" → a, b, "a b"; "c d" → c, d, "c d"; six distinct buckets
    assert len(set(ngram_buckets("a b", settings)) | set(ngram_buckets("c d", settings))) == 6
    model = fit_dsir(["a b", "c d"], {"t": ["a b"]}, settings)
    w = model.log_weights(["a b", "c d", "A, b"])["dsir_t"]
    # target: 3 n-grams seen once, total 3; raw: 6 n-grams seen once, total 6; p = (count + 1) / (total + B)
    p_t_seen, p_t_unseen, p_raw = 2 / (3 + B), 1 / (3 + B), 2 / (6 + B)
    assert w[0] == pytest.approx(3 * (math.log(p_t_seen) - math.log(p_raw)), rel=1e-12, abs=1e-15)
    assert w[1] == pytest.approx(3 * (math.log(p_t_unseen) - math.log(p_raw)), rel=1e-12)
    # lower-cased, punctuation is a word of its own: a , b → a ","(unseen) b, "a ,", ", b" (unseen bigrams)
    p_raw_unseen = 1 / (6 + B)
    expected = 2 * (math.log(p_t_seen) - math.log(p_raw)) + 3 * (math.log(p_t_unseen) - math.log(p_raw_unseen))
    assert w[2] == pytest.approx(expected, rel=1e-12)


TOPICS = {
    "science": ["theorem", "proof", "lemma", "measurement", "equation", "hypothesis", "experiment", "result"],
    "spam": ["cheap", "deal", "click", "offer", "discount", "winner", "prize", "hurry"],
    "cooking": ["onion", "garlic", "simmer", "butter", "recipe", "oven", "flour", "pepper"],
}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "that", "it", "for"]


def _docs(topic, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(TOPICS[topic] + FILLER) for _ in range(rng.randint(20, 40))) for _ in range(n)]


def test_a_target_that_is_part_of_the_pool_ranks_its_documents_first():
    pool = _docs("science", 20, 0) + _docs("spam", 20, 1) + _docs("cooking", 20, 2)
    model = fit_dsir(pool, {"science": pool[:20], "cooking": pool[40:]}, DSIRSettings(num_buckets=1000))
    weights = model.log_weights(pool)
    assert set(np.argsort(-weights["dsir_science"])[:20]) == set(range(20))
    assert set(np.argsort(-weights["dsir_cooking"])[:20]) == set(range(40, 60))


def test_model_round_trips_and_bad_targets_are_named(tmp_path):
    model = fit_dsir(_docs("spam", 5, 3), {"books": _docs("science", 5, 4)}, DSIRSettings(num_buckets=64))
    model.save(tmp_path / "m.npz")
    texts = _docs("cooking", 4, 5)
    assert np.array_equal(load_dsir_model(tmp_path / "m.npz").log_weights(texts)["dsir_books"],
                          model.log_weights(texts)["dsir_books"])
    assert parse_targets(["books=a", "books=b", "wiki=c"]) == {"books": ["a", "b"], "wiki": ["c"]}
    with pytest.raises(SelectionError, match="NAME=PATH"):
        parse_targets(["books"])
    with pytest.raises(SelectionError, match="letters, digits"):
        fit_dsir(["x"], {"my books": ["x"]})


def test_resampling_respects_the_budget_is_seeded_and_follows_the_weights():
    rng = np.random.default_rng(0)
    log_w, sizes = rng.normal(size=200), rng.integers(1, 50, size=200)
    a = importance_resample(log_w, sizes, budget=1000, seed=0)
    assert sizes[a].sum() <= 1000 and sizes[a].sum() > 1000 - sizes.max()
    assert np.array_equal(a, importance_resample(log_w, sizes, budget=1000, seed=0))
    assert not np.array_equal(a, importance_resample(log_w, sizes, budget=1000, seed=1))
    assert importance_resample(log_w, sizes, top_fraction=0.1, seed=0).size == 20
    # one draw: P(i) = w_i / sum w  (weights 1 : 2 : 5)
    w = np.log([1.0, 2.0, 5.0])
    firsts = np.array([importance_resample(w, np.ones(3), top_fraction=1 / 3, seed=s)[0] for s in range(4000)])
    assert np.allclose(np.bincount(firsts, minlength=3) / 4000, [1 / 8, 2 / 8, 5 / 8], atol=0.03)


def _read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_cli_dsir_signal_folder_joins_with_signals_and_resamples_to_a_budget(tmp_path, capsys):
    pool = _write(tmp_path / "pool.jsonl", _docs("science", 15, 6) + _docs("spam", 15, 7))
    books = _write(tmp_path / "books.jsonl", _docs("science", 10, 8))
    wiki = _write(tmp_path / "wiki.jsonl", _docs("cooking", 10, 9))
    sig, rules = tmp_path / "dsir", tmp_path / "rules"
    assert main(["select", "dsir", pool, "--target", f"books={books}", "--target", f"wiki={wiki}",
                 "--out", str(sig), "--buckets", "5000"]) == 0
    assert "dsir_books, dsir_wiki for 30 documents" in capsys.readouterr().out
    assert (sig / "dsir_model.npz").is_file()
    # a saved model scores other shards alike, in worker processes: the same values for the same documents
    other = _write(tmp_path / "other.jsonl", [json.loads(line)["text"] for line in _read_lines(pool)][:5])
    again = tmp_path / "again"
    assert main(["select", "dsir", pool, other, "--model", str(sig / "dsir_model.npz"), "--out", str(again),
                 "--workers", "2", "--format", "jsonl"]) == 0
    first = [json.loads(line) for line in _read_lines(next(again.glob("00000-*.signals.jsonl")))]
    second = [json.loads(line) for line in _read_lines(next(again.glob("00001-*.signals.jsonl")))]
    assert [r["dsir_books"] for r in first[:5]] == pytest.approx([r["dsir_books"] for r in second])
    assert main(["select", "signals", pool, "--out", str(rules)]) == 0
    top = tmp_path / "top"
    assert main(["select", "pick", "--signals", str(sig), str(rules), "--weights", "{dsir_books: 1}",
                 "--top-fraction", "0.5", "--out", str(top)]) == 0
    with open(top / "documents.jsonl.zst", "rb") as f:
        kept = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
    assert sum(any(w in line for w in TOPICS["science"]) for line in kept.splitlines()) == 15

    runs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"rs{len(runs)}"
        assert main(["select", "pick", "--signals", str(sig), str(rules), "--mode", "dsir-resample",
                     "--signal", "dsir_books", "--budget", "300", "--budget-unit", "words", "--seed", str(seed),
                     "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["method"] == "dsir-resample" and 0 < report["words_out"] <= 300
        runs.append((out / "documents.jsonl.zst").read_bytes())
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert main(["select", "pick", "--signals", str(sig), "--mode", "dsir-resample", "--budget", "9",
                 "--budget-unit", "chars", "--out", str(tmp_path / "x")]) == 2
    assert "needs --signal" in capsys.readouterr().err
