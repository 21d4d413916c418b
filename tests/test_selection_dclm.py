"""DCLM's pipeline in mixlm: the RefinedWeb heuristic preset on hand-made documents, the `dclm` classifier
preset, and `select run` chaining heuristics → exact dedup → MinHash dedup → classifier top fraction on a
small pool (stage counts known by construction; reruns reuse stages; nothing is overwritten without
--overwrite)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml
import zstandard

from mixlm.cli import main
from mixlm.selection import SelectionError
from mixlm.selection.heuristics import PRESETS, apply_rules, parse_rules
from mixlm.selection.pipeline import load_pipeline
from mixlm.selection.signals import compute_signals

GOOD = (
    "The river that runs past the old mill has changed its course twice in the last century. Each time, the "
    "farmers who worked the fields on its banks had to move their fences and rebuild the small bridges that "
    "connected the two halves of the village. Records kept by the parish show that the first flood came in "
    "the spring of 1921, after a winter of heavy snow, and that the second followed a week of storms in 1968."
)


def _first_failure(text):
    columns = {k: np.array([v]) for k, v in compute_signals(text).items()}
    keep, dropped = apply_rules(columns, PRESETS["refinedweb"])
    return None if keep[0] else next(name for name, n in dropped.items() if n)


def test_refinedweb_preset_keeps_prose_and_drops_each_kind_of_junk():
    lines = [f"the {w} is on sale at the shop near the station today" for w in
             ("apple", "pear", "plum", "lemon", "melon", "grape", "peach", "cherry", "mango", "olive")]
    cases = [
        (GOOD, None),
        ("Buy the best shoes online today.", "50 <= word_count <= 100000"),
        ("\n".join(f"- {line}" for line in lines), "frac_lines_bullet <= 0.9"),
        ("\n".join(f"{line} and a few more words to read about it..." for line in lines),
         "frac_lines_end_ellipsis <= 0.3"),
        (GOOD + " " + " ".join(f"#tag{i}" for i in range(12)), "ws_symbol_to_word_ratio <= 0.1"),
        (" ".join(f"word{i % 7}x fruit{i}" for i in range(40)) + ".", "gopher_stop_words >= 2"),
        ("\n".join([GOOD] * 4), "frac_dupe_lines <= 0.3"),
        (GOOD + " " + "the river " * 16,
         "frac_chars_top_2gram <= 0.2"),
    ]
    assert [_first_failure(text) for text, _ in cases] == [rule for _, rule in cases]


def test_heuristic_rules_from_yaml_are_checked():
    rules = parse_rules([{"signal": "word_count", "min": 3}, {"signal": "frac_dupe_lines", "max": 0.5}])
    columns = {"word_count": np.array([2.0, 5, 5, np.nan]), "frac_dupe_lines": np.array([0.0, 0.9, 0.1, 0.0])}
    keep, dropped = apply_rules(columns, rules)
    assert keep.tolist() == [False, False, True, False]
    assert dropped == {"word_count >= 3": 2, "frac_dupe_lines <= 0.5": 1}  # NaN fails; counted at the first rule
    for bad, match in [("gopher", "preset 'gopher'"), ([{"signal": "x"}], "give a number min"),
                       ([{"signal": "x", "minimum": 1}], "expected")]:
        with pytest.raises(SelectionError, match=match):
            parse_rules(bad)
    with pytest.raises(SelectionError, match="lack"):
        apply_rules({"word_count": np.ones(2)}, rules)


STOP = ["the", "a", "of", "and", "to", "in", "is", "that", "it", "for", "with", "on", "as", "was", "by"]


def _vocab(rng, letters):
    return ["".join(rng.choice(letters) + rng.choice("aeiou") for _ in range(rng.randint(2, 4))) for _ in range(200)]


def _prose(rng, content, sentences=8):
    out = []
    for _ in range(sentences):
        words = [rng.choice(STOP) if rng.random() < 0.4 else rng.choice(content) for _ in range(rng.randint(8, 15))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def _lines(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _read(path):
    with open(path, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
    return [json.loads(line)["text"] for line in raw.splitlines()]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """100 documents: 40 of style A and 40 of style B (both clean prose), 5 exact copies of A documents
    (case and spacing changed), 5 near-copies of B documents (one word changed), 10 junk documents."""
    root = tmp_path_factory.mktemp("pool")
    rng = random.Random(0)
    vocab_a, vocab_b = _vocab(rng, "bcdfg"), _vocab(rng, "kmnpr")
    a = [_prose(rng, vocab_a) for _ in range(40)]
    b = [_prose(rng, vocab_b) for _ in range(40)]
    exact = ["  ".join(t.upper().split()) for t in a[:5]]
    near = []
    for t in b[:5]:
        words = t.split()
        words[len(words) // 2] = "changed"
        near.append(" ".join(words))
    junk = ["Click here."] * 3 + ["- " + " ".join(rng.choice(vocab_b) for _ in range(8)) for _ in range(7)]
    inputs = [_lines(root / "p1.jsonl", a[:20] + b[:20] + junk[:5] + exact),
              _lines(root / "p2.jsonl", a[20:] + b[20:] + junk[5:] + near)]
    pos = _lines(root / "pos.jsonl", [_prose(rng, vocab_a) for _ in range(60)])
    neg = _lines(root / "neg.jsonl", [_prose(rng, vocab_b) for _ in range(60)])
    return {"inputs": inputs, "pos": pos, "neg": neg, "a": set(a), "root": root}


def _config(path, threshold=0.7):
    config = {"text_field": "text", "stages": [
        {"name": "heuristics", "kind": "heuristics", "rules": "refinedweb"},
        {"name": "exact-dedup", "kind": "exact_dedup"},
        {"name": "fuzzy-dedup", "kind": "minhash_dedup", "ngram": 5, "num_perm": 64, "bands": 16, "rows": 4,
         "threshold": threshold},
        {"name": "classifier", "kind": "classifier", "preset": "dclm", "keep_top_fraction": 0.5,
         # DCLM's recipe with a small model; its lr 0.1 x 5 epochs (for millions of documents) leaves every
         # score within 0.001 of 0.5 on 120 training documents, so lr 0.5 x 20 epochs here
         "fasttext_options": {"bucket": 20000, "dim": 16, "epoch": 20, "lr": 0.5}},
    ]}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_pipeline_chains_the_stages_and_keeps_the_fraction(pool, tmp_path, capsys):
    pytest.importorskip("fasttext")
    out = tmp_path / "out"
    args = ["select", "run", _config(tmp_path / "c.yaml"), "--input", *pool["inputs"], "--out", str(out),
            "--pos", pool["pos"], "--neg", pool["neg"]]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    counts = [(s["stage"], s["documents_in"], s["documents_out"]) for s in report["stages"]]
    assert counts == [("heuristics", 100, 90), ("exact-dedup", 90, 85), ("fuzzy-dedup", 85, 80),
                      ("classifier", 80, 40)]  # floor(0.5 * 80)
    final = _read(out / "04-classifier" / "documents.jsonl.zst")
    assert len(final) == 40 and sum(t in pool["a"] for t in final) >= 38  # the classifier prefers style A
    heuristics = json.loads((out / "01-heuristics" / "report.json").read_text())
    assert heuristics["dropped_by"]["50 <= word_count <= 100000"] == 10
    assert "heuristics (heuristics): 100 → 90 documents (90.0%)" in capsys.readouterr().out
    assert not list(out.glob(".*"))  # no temporary stage folder left

    assert main(args) == 0  # a rerun reuses every stage
    assert all(s["reused"] for s in json.loads((out / "report.json").read_text())["stages"])
    changed = ["select", "run", _config(tmp_path / "c2.yaml", threshold=0.9), *args[3:]]
    assert main(changed) == 2  # the fuzzy stage's settings differ: refuse to overwrite it
    assert "03-fuzzy-dedup exists from a run with other settings" in capsys.readouterr().err
    assert main([*changed, "--overwrite"]) == 0
    rerun = json.loads((out / "report.json").read_text())["stages"]
    assert [s["reused"] for s in rerun] == [True, True, False, False]  # from the changed stage on
    assert rerun[-1]["documents_out"] == rerun[-2]["documents_out"] // 2


def test_dclm_config_and_classifier_preset(pool, tmp_path):
    config = load_pipeline("configs/selection/dclm-baseline.yaml", {"pos": [pool["pos"]], "neg": [pool["neg"]]})
    assert [s["kind"] for s in config["stages"]] == ["heuristics", "exact_dedup", "bloom_dedup", "classifier"]
    assert config["stages"][-1]["preset"] == "dclm" and config["stages"][-1]["keep_top_fraction"] == 0.1
    with pytest.raises(SelectionError, match="--pos and --neg"):
        load_pipeline("configs/selection/dclm-baseline.yaml")

    pytest.importorskip("fasttext")
    clf = tmp_path / "clf"
    assert main(["select", "classifier", "train", "--preset", "dclm", "--pos", pool["pos"], "--neg", pool["neg"],
                 "--out", str(clf), "--fasttext-option", "bucket=20000", "--fasttext-option", "dim=16",
                 "--fasttext-option", "epoch=20", "--fasttext-option", "lr=0.5"]) == 0
    meta = json.loads((clf / "classifier.json").read_text())
    assert meta["backend"] == "fasttext" and meta["held_out_accuracy"] > 0.9
    # DCLM's settings, with the four overridden
    assert meta["fasttext_options"] == {"lr": 0.5, "ws": 5, "epoch": 20, "minCount": 1, "wordNgrams": 2,
                                        "dim": 16, "bucket": 20000}


def test_a_later_stage_reads_the_previous_stage_a_file_per_input_file_or_an_older_stage_whole(pool, tmp_path):
    import shutil

    from mixlm.selection.pipeline import run_pipeline

    def run(min_words, **kw):
        stages = [{"name": "rules", "kind": "heuristics", "rules": [{"signal": "word_count", "min": 5}]},
                  {"name": "exact", "kind": "exact_dedup"},
                  {"name": "bloom", "kind": "bloom_dedup", "paragraphs": True, "expected_ngrams": 10_000},
                  {"name": "short", "kind": "heuristics", "rules": [{"signal": "word_count", "min": min_words}]}]
        return run_pipeline({"stages": stages}, pool["inputs"], tmp_path / "out", **kw)

    def read(stage):
        return _read(tmp_path / "out" / stage / "documents.jsonl.zst")

    result = run(90)
    out = tmp_path / "out"
    assert result["output"] == str(out / "04-short" / "documents.jsonl.zst")
    # each stage after the first runs a task per input file of the first: a signal table and a part each
    stages = ("01-rules", "02-exact", "03-bloom", "04-short")
    assert [len(list((out / s / "parts").glob("*.jsonl.zst"))) for s in stages] == [2] * 4
    assert len(list((out / "04-short" / "signals").glob("*.signals.parquet"))) == 2
    for s in stages:
        assert [t for p in sorted((out / s / "parts").glob("*")) for t in _read(p)] == read(s)
    kept = read("04-short")
    # a stage of an older mixlm has no parts: the next stage reads its documents file, as one task
    shutil.rmtree(out / "03-bloom" / "parts")
    rerun = run(90)["stages"]
    assert [s["reused"] for s in rerun] == [True] * 4 and 0 < len(kept) < rerun[3]["documents_in"]
    shutil.rmtree(out / "04-short")
    assert run(90)["documents_out"] == len(kept) and read("04-short") == kept
    assert len(list((out / "04-short" / "signals").glob("*.signals.parquet"))) == 1
