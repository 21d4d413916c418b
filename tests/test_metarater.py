"""Meta-rater learned rater weights end to end on a tiny pool: prose (what the held-out set is made of)
mixed with arithmetic. One rater prefers prose documents, one is pointed at arithmetic; six weightings →
six selections → six proxies scored on the same held-out prose → fit → optimised weights that favour
the prose rater and that `mixlm select pick --weights` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixlm.cli import main
from mixlm.data.demo_corpus import GENERATORS
from mixlm.mixing import read_csv
from mixlm.selection import SelectionError
from mixlm.selection.metarater import learn_rater_weights, parse_raters, weight_spec
from mixlm.selection.pick import sample_rater_weightings

# stop_word_frac is high on prose and 0 on arithmetic; frac_no_alpha_words stated higher-is-better
# ranks arithmetic first (its default direction, lower, would rank prose first).
RATERS = ["stop_word_frac", "frac_no_alpha_words:high"]


def _docs(kind: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [json.dumps({"text": GENERATORS[kind](rng)}) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from mixlm.data.tokenizer import load_tokenizer_spec, train_tokenizer_from_texts

    root = tmp_path_factory.mktemp("metarater")
    shards = []
    for i, kind in enumerate(("prose", "arithmetic")):
        path = root / f"pool_{kind}.jsonl"
        path.write_text("".join(_docs(kind, 120, seed=i)))
        shards.append(str(path))
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(_docs("prose", 40, seed=7)))
    texts = [json.loads(line)["text"] for s in shards for line in Path(s).read_text().splitlines()]
    tok = train_tokenizer_from_texts(texts, root / "tok", vocab_size=320)
    sig = root / "sig"
    assert main(["select", "signals", *shards, "--out", str(sig), "--tokenizer", str(tok), "--format", "jsonl"]) == 0
    vocab = load_tokenizer_spec(str(tok)).vocab_size
    base = root / "proxy.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": vocab, "max_seq_len": 32, "vocab_multiple": 8},
        "data": {"source": "prepared", "seq_len": 32},
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "train": {"steps": 30, "global_batch_size": 8},
        "eval": {"batches": 2},
        "logging": {"every": 10, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0, "save_at_end": False},
    }))
    return root, shards, heldout, tok, sig, base


def test_parse_raters_and_weight_spec():
    names, directions = parse_raters(["a", "b:low", "c:high"])
    assert names == ["a", "b", "c"] and directions == {"b": False, "c": True}
    assert weight_spec({"a": 0.5, "b": 0.5}, directions) == {"a": 0.5, "b": {"weight": 0.5, "higher_is_better": False}}
    with pytest.raises(SelectionError, match=":high or :low"):
        parse_raters(["a:up"])


def test_learned_rater_weights_end_to_end(pool, tmp_path):
    root, _, heldout, tok, sig, base = pool
    names, _ = parse_raters(RATERS)
    # Six weightings from a Dirichlet: some lean to the prose rater, some to the arithmetic one.
    weightings = sample_rater_weightings(names, 6, seed=1)
    out = root / "meta"
    # The budget is 40% of the pool's tokens, so which rater leads decides what is kept.
    budget = 0.4 * float(sum(json.loads(line)["num_tokens"] for p in sig.glob("*.signals.jsonl")
                             for line in p.read_text().splitlines()))
    result = learn_rater_weights([sig], RATERS, weightings, out, budget=budget, base_config=base,
                                 tokenizer=str(tok), heldout=[str(heldout)], folds=3, n_samples=2000, top_k=32)

    # RegMix's layout: index, one column per rater weight, the held-out loss
    table = read_csv(out / "results.csv")
    assert table.columns == (*names, "metric/heldout_val_loss")
    assert sorted(table.index_N.tolist()) == [1, 2, 3, 4, 5, 6]
    assert table.select(names) == pytest.approx(np.array([[w[n] for n in names] for w in weightings]))
    losses = table.select(["metric/heldout_val_loss"])[:, 0]
    assert np.all(np.isfinite(losses)) and np.all(losses > 0)

    # every proxy was scored on the same held-out documents: each lists the held-out domain at weight 0
    for i in range(1, 7):
        mixture = yaml.safe_load((out / "runs" / f"{i:04d}" / "proxy.yaml").read_text())["data"]["mixture"]
        assert mixture == {f"sel_{i:04d}": 1.0, "heldout": 0.0}
    # the selections obey the budget and follow the weighting: more prose-rater weight, more prose kept
    prose_share = []
    for i in range(1, 7):
        report = json.loads((out / "selections" / f"{i:04d}" / "report.json").read_text())
        assert report["tokens_out"] <= budget
        prose_share.append(report["signals"]["stop_word_frac"]["selected"]["mean"])
    w_prose = [w["stop_word_frac"] for w in weightings]
    assert np.corrcoef(w_prose, prose_share)[0, 1] > 0.5
    # training on more prose lowers the held-out (prose) loss, and the learned weights favour prose
    assert np.corrcoef(w_prose, losses)[0, 1] < -0.5
    assert result.best["stop_word_frac"] > result.best["frac_no_alpha_words"]
    assert sum(result.best.values()) == pytest.approx(1.0)

    # the weights YAML drives an ordinary selection; the stated direction survives
    spec = yaml.safe_load(result.weights_yaml.read_text())
    assert spec["frac_no_alpha_words"]["higher_is_better"] is True
    assert main(["select", "pick", "--signals", str(sig), "--weights", str(result.weights_yaml),
                 "--budget", str(int(budget)), "--out", str(tmp_path / "best")]) == 0
    assert json.loads((tmp_path / "best" / "report.json").read_text())["tokens_out"] <= budget

    trained = {i: (out / "runs" / f"{i:04d}" / "metrics.jsonl").stat().st_mtime_ns for i in range(1, 7)}
    # a rerun (here through the CLI, the same weightings from a CSV) trains nothing and gives the same table
    wdir = tmp_path / "w"
    wdir.mkdir()
    (wdir / "weightings.csv").write_text(
        "index," + ",".join(names) + "\n"
        + "".join(f"{i + 1}," + ",".join(repr(w[n]) for n in names) + "\n" for i, w in enumerate(weightings)))
    assert main(["select", "metarater", "--signals", str(sig), "--raters", ",".join(RATERS), "--weightings",
                 str(wdir), "--budget", str(budget), "--base", str(base), "--tokenizer", str(tok),
                 "--heldout", str(heldout), "--out", str(out), "--folds", "3", "--samples", "2000",
                 "--top-k", "32"]) == 0
    assert read_csv(out / "results.csv").select(["metric/heldout_val_loss"])[:, 0] == pytest.approx(losses)
    assert {i: (out / "runs" / f"{i:04d}" / "metrics.jsonl").stat().st_mtime_ns for i in range(1, 7)} == trained
