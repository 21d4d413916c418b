"""Model-based raters and perplexity as signal columns: tiny randomly initialised transformers models (a BERT
regression head, a multi-label Llama head, a Llama causal LM) built here, scored by mixlm and by
transformers' own forward pass one document at a time; the mixlm Flax paths (a linear-head rater and
perplexity on the causal LM imported as a mixlm checkpoint) against the same transformers model; and the
Meta-rater 25-rater config run on a small pool through signals + DSIR + rate + pick."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixlm.cli import main
from mixlm.selection import SelectionError
from mixlm.selection.signal_tables import load_tables

CONFIG_25 = Path(__file__).resolve().parents[1] / "configs" / "selection" / "metarater-25.yaml"
PRRC_LABELS = ["professionalism", "readability", "reasoning", "cleanliness"]
TEXTS = [
    "The cat sat on the mat.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules. " * 3,
    "BUY NOW!!! cheap pills, best prices, click here",
    ("In 1905 Einstein published four papers that changed physics: the photoelectric effect, Brownian motion, "
     "special relativity and the equivalence of mass and energy."),
    "dogs bark",
    "A proof by induction shows the statement for n = 1, then for n + 1 assuming it for n. " * 2,
    "lol ok see u tmrw",
    "Water boils at 100 degrees Celsius at sea level; at altitude the boiling point is lower.",
]


def _randomize(model, seed: int):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny HF folders sharing one byte-level BPE: `edu` (BERT, 1 regression output), `prrc` (Llama, 4
    sigmoid outputs named by id2label), `binary` (BERT, 2-way softmax), `lm` (a Llama causal LM) and `mixlm`
    (that LM imported as a mixlm checkpoint)."""
    import torch
    import transformers

    from mixlm.data.tokenizer import train_tokenizer_from_texts
    from mixlm.hf.import_hf import import_hf

    # Tiny matmuls: one thread. With two on a busy 2-core host each op waits ~100 ms for the other thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("raters")
    tok_dir = train_tokenizer_from_texts(TEXTS * 4, root / "tok", vocab_size=300)
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    vocab, pad = len(tok), tok.pad_token_id
    bert = {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": pad, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}
    llama = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "pad_token_id": pad, "bos_token_id": tok.bos_token_id,
             "eos_token_id": tok.eos_token_id}
    built = {
        "edu": transformers.BertForSequenceClassification(
            transformers.BertConfig(num_labels=1, problem_type="regression", **bert)),
        "prrc": transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            num_labels=4, problem_type="multi_label_classification", id2label=dict(enumerate(PRRC_LABELS)),
            label2id={v: k for k, v in enumerate(PRRC_LABELS)}, **llama)),
        "binary": transformers.BertForSequenceClassification(
            transformers.BertConfig(num_labels=2, problem_type="single_label_classification", **bert)),
        "lm": transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)),
    }
    dirs = {}
    for i, (name, model) in enumerate(built.items()):
        _randomize(model, i).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    import_hf(root / "lm", root / "mixlm")
    dirs["mixlm"] = root / "mixlm"
    yield {"dirs": dirs, "models": built, "tok": tok, "root": root}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(models):
    """Two shards of TEXTS (all 25 Meta-rater raters are computed by mixlm; none is read from the input)."""
    shards = []
    for s in range(2):
        path = models["root"] / f"pool_{s}.jsonl"
        rows = [{"text": t} for t in TEXTS[s::2]]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        shards.append(str(path))
    return shards


def _reference(model, tok, text: str, max_length: int):
    """transformers' forward of one document alone (no padding), truncated as the rater truncates."""
    import torch

    enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0].double().numpy()


def test_hf_raters_equal_transformers_forward_one_document_at_a_time(models):
    from mixlm.selection.model_raters import load_rater

    tok, dirs = models["tok"], models["dirs"]
    edu = load_rater("fineweb_edu", dirs["edu"], batch_size=3, max_length=12, device="cpu")
    prrc = load_rater("prrc", dirs["prrc"], batch_size=3, max_length=12)
    binary = load_rater("ad", dirs["binary"], columns=["no_ad", "ad"], batch_size=3, max_length=12)
    assert edu.columns == ["fineweb_edu"] and edu.activation == "none"
    assert prrc.columns == [f"prrc_{label}" for label in PRRC_LABELS] and prrc.activation == "sigmoid"
    assert binary.columns == ["ad_no_ad", "ad_ad"] and binary.activation == "softmax"
    # batches of 3 length-sorted documents, padded, truncated to 12 tokens (several texts are longer)
    assert max(len(tok(t)["input_ids"]) for t in TEXTS) > 12
    for rater, model, act in ((edu, "edu", lambda x: x), (prrc, "prrc", lambda x: 1 / (1 + np.exp(-x))),
                              (binary, "binary", lambda x: np.exp(x) / np.exp(x).sum())):
        expected = np.stack([act(_reference(models["models"][model], tok, t, 12)) for t in TEXTS])
        np.testing.assert_allclose(rater.score(TEXTS), expected, rtol=1e-4, atol=1e-5)
    raw = load_rater("prrc", dirs["prrc"], activation="none", max_length=12).score(TEXTS[:2])
    np.testing.assert_allclose(raw, [_reference(models["models"]["prrc"], tok, t, 12) for t in TEXTS[:2]],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(SelectionError, match="2 column names given for 4 outputs"):
        load_rater("prrc", dirs["prrc"], columns=["a", "b"])
    with pytest.raises(SelectionError, match="rater x: .*neither a Hugging Face model folder"):
        load_rater("x", models["root"])


def _hand_nll(model, tok, text: str, window: int) -> tuple[float, int]:
    """Summed next-token NLL of `text` after BOS, in windows of `window` targets, by log-softmax by hand."""
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    for begin in range(0, len(ids), window):
        targets = ids[begin:begin + window]
        inputs = [ids[begin - 1] if begin else tok.bos_token_id] + targets[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0].double().numpy()
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float(np.sum(log_z - logits[np.arange(len(targets)), targets]))
    return total, len(ids)


def test_perplexity_hf_and_flax_paths_equal_a_hand_computation(models):
    from mixlm.selection.perplexity import load_perplexity_scorer

    tok, lm = models["tok"], models["models"]["lm"]
    hf = load_perplexity_scorer(models["dirs"]["lm"], device="cpu", batch_size=3, max_length=8)
    flax = load_perplexity_scorer(models["dirs"]["mixlm"], batch_size=4, max_length=8)  # the imported checkpoint
    got_hf, got_flax = hf.score(TEXTS), flax.score(TEXTS)
    hand = [_hand_nll(lm, tok, t, 8) for t in TEXTS]
    assert max(n for _, n in hand) > 8  # windows are exercised
    nll = np.array([s / n for s, n in hand])
    bpb = np.array([s / math.log(2) / len(t.encode()) for (s, _), t in zip(hand, TEXTS)])
    for got in (got_hf, got_flax):
        np.testing.assert_allclose(got["perplexity_nll"], nll, rtol=1e-4)
        np.testing.assert_allclose(got["perplexity_bpb"], bpb, rtol=1e-4)


@pytest.fixture(scope="module")
def linear_rater(models):
    """A mixlm linear-head rater fitted to a planted linear function of transformers' pooled final hidden
    states (after BOS, truncated to 10 tokens): (folder, expected features, targets)."""
    import torch

    from mixlm.selection.model_raters import fit_linear_rater

    tok, lm = models["tok"], models["models"]["lm"]
    expected = []
    for t in TEXTS:
        ids = ([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"])[:10]
        with torch.no_grad():
            expected.append(lm.model(torch.tensor([ids])).last_hidden_state[0].mean(0).double().numpy())
    expected = np.stack(expected)
    rng = np.random.default_rng(0)
    targets = expected @ rng.normal(size=(expected.shape[1], 2)) + np.array([0.5, -1.0])
    # 8 documents, 33 unknowns per output: the (nearly unpenalised) ridge solution interpolates
    folder = fit_linear_rater(models["dirs"]["mixlm"], TEXTS, targets, models["root"] / "linear",
                              labels=["edu", "style"], ridge=1e-9, max_length=10)
    return folder, expected, targets


def test_linear_head_rater_pools_the_mixlm_models_hidden_states(models, linear_rater):
    from mixlm.selection.model_raters import load_rater

    folder, expected, targets = linear_rater
    rater = load_rater("mine", folder, batch_size=3)  # batches of 3, padded to the 10-token window
    assert rater.columns == ["mine_edu", "mine_style"]
    np.testing.assert_allclose(rater.features(TEXTS), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rater.score(TEXTS), targets, rtol=1e-3, atol=1e-3)


def test_rate_and_perplexity_columns_join_rule_signals_for_pick(models, pool, linear_rater, tmp_path):
    from mixlm.selection.model_raters import load_rater
    from mixlm.selection.perplexity import load_perplexity_scorer

    dirs = models["dirs"]
    rules, rated, ppl = (str(tmp_path / n) for n in ("rules", "rated", "ppl"))
    assert main(["select", "signals", *pool, "--out", rules, "--format", "jsonl", "--no-progress"]) == 0
    assert main(["select", "rate", *pool, "--model", f"fineweb_edu={dirs['edu']}", "--model", f"prrc={dirs['prrc']}",
                 "--model", f"mine={linear_rater[0]}", "--out", rated, "--batch-size", "3",
                 "--max-length", "12", "--device", "cpu", "--no-progress"]) == 0
    assert main(["select", "signals", *pool, "--no-rules", "--perplexity", str(dirs["lm"]), "--max-length", "8",
                 "--out", ppl, "--no-progress"]) == 0
    shard_report = json.loads(next(Path(rated).glob("*.report.json")).read_text())
    assert main(["select", "rate", *pool, "--model", f"fineweb_edu={dirs['edu']}", "--model", f"prrc={dirs['prrc']}",
                 "--model", f"mine={linear_rater[0]}", "--out", rated, "--batch-size", "3",
                 "--max-length", "12", "--device", "cpu", "--no-progress"]) == 0  # a rerun reuses the tables
    assert json.loads(next(Path(rated).glob("*.report.json")).read_text()) == shard_report
    table = load_tables([rules, rated, ppl])
    assert len(table) == len(TEXTS)
    by_text = {t: i for i, t in enumerate(TEXTS)}
    order = [by_text[json.loads(Path(table.files[f]).read_text().splitlines()[line - 1])["text"]]
             for f, line in zip(table.file_id, table.line)]
    texts = [TEXTS[i] for i in order]
    edu = load_rater("fineweb_edu", dirs["edu"], max_length=12).score(texts)[:, 0]
    np.testing.assert_allclose(table.columns["fineweb_edu"], edu, rtol=1e-5)
    assert {f"prrc_{label}" for label in PRRC_LABELS} <= set(table.columns)
    assert {"mine_edu", "mine_style", "frac_unique_words", "num_chars"} <= set(table.columns)
    nll = load_perplexity_scorer(dirs["lm"], max_length=8).score(texts)["perplexity_nll"]
    np.testing.assert_allclose(table.columns["perplexity_nll"], nll, rtol=1e-5)

    weights = {"fineweb_edu": 1, "prrc_reasoning": 1, "perplexity_nll": {"weight": 1, "higher_is_better": False},
               "frac_unique_words": 1}
    sel, rnd = tmp_path / "sel", tmp_path / "rnd"
    assert main(["select", "pick", "--signals", rules, rated, ppl, "--weights", json.dumps(weights),
                 "--budget", "300", "--budget-unit", "chars", "--out", str(sel), "--random-out", str(rnd)]) == 0
    report = json.loads((sel / "report.json").read_text())
    assert 0 < report["chars_out"] <= 300 and 0 < report["random_baseline"]["chars_out"] <= 300


@pytest.mark.slow
def test_model_columns_from_worker_processes_equal_the_in_process_ones(models, pool, tmp_path):
    """--workers 2: each spawned worker loads the rater and the LM itself (most of this test's time is the
    two workers importing torch and transformers)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, workers in ((one, "1"), (two, "2")):
        assert main(["select", "signals", *pool, "--no-rules", "--perplexity", str(models["dirs"]["lm"]),
                     "--model", f"prrc={models['dirs']['prrc']}", "--max-length", "8", "--format", "jsonl",
                     "--out", out, "--workers", workers, "--no-progress"]) == 0
    a, b = load_tables([one]), load_tables([two])
    assert set(a.columns) == {"num_chars", "perplexity_nll", "perplexity_bpb", *(f"prrc_{x}" for x in PRRC_LABELS)}
    for col in a.columns:
        np.testing.assert_allclose(b.columns[col], a.columns[col], rtol=1e-5)


def test_metarater_25_config_runs_on_a_small_pool(models, pool, tmp_path, capsys):
    from mixlm.selection.metarater import parse_raters, weight_spec
    from mixlm.selection.pick import sample_rater_weightings
    from mixlm.selection.pick_documents import select_documents
    from mixlm.selection.rater_config import load_rater_config

    cfg = load_rater_config(CONFIG_25)
    assert len(cfg.raters) == 25 and len({r.column for r in cfg.raters}) == 25
    sources = [r.source for r in cfg.raters]
    assert (sources.count("rules"), sources.count("dsir"), sources.count("model")) == (11, 3, 11)
    assert cfg.input_columns() == []  # rps_doc_num_sentences and rps_lines_numerical_chars_fraction are rules now
    assert cfg.dsir_targets() == ["books", "wiki", "math"] and cfg.needs_perplexity(include_extra=True)

    # a model folder not given: one line naming the rater and the flag, exit 2
    assert main(["select", "rate", *pool, "--config", str(CONFIG_25), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "rater modernbert_professionalism" in err and "--model modernbert_professionalism=DIR" in err

    dirs = models["dirs"]
    folders = {"qurater": dirs["prrc"], "ad_en": dirs["binary"], "fluency_en": dirs["binary"],
               **{name: dirs["edu"] for name in cfg.model_names() if name.startswith(("modernbert", "fineweb"))}}
    assert set(folders) == set(cfg.model_names())
    sig = {n: str(tmp_path / n) for n in ("rules", "dsir", "models")}
    assert main(["select", "signals", *pool, "--out", sig["rules"], "--no-progress"]) == 0
    targets = {"books": TEXTS[1::3], "wiki": TEXTS[3::3], "math": TEXTS[5::3]}
    for name, texts in targets.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["select", "dsir", *pool, *[f"--target={n}={tmp_path / n}.jsonl" for n in cfg.dsir_targets()],
                 "--out", sig["dsir"]]) == 0
    assert main(["select", "rate", *pool, "--config", str(CONFIG_25), *[f"--model={n}={d}" for n, d in folders.items()],
                 "--max-length", "12", "--out", sig["models"], "--no-progress"]) == 0
    table = load_tables(list(sig.values()))
    assert all(r.column in table.columns for r in cfg.raters)

    (tmp_path / "w.yaml").write_text(yaml.safe_dump(cfg.pick_weights()))
    assert main(["select", "pick", "--signals", *sig.values(), "--weights", str(tmp_path / "w.yaml"), "--budget", "250",
                 "--budget-unit", "chars", "--out", str(tmp_path / "sel"), "--random-out", str(tmp_path / "rnd")]) == 0
    report = json.loads((tmp_path / "sel" / "report.json").read_text())
    assert 0 < report["chars_out"] <= 250 and report["random_baseline"]["chars_out"] <= 250
    # what `select metarater` does per proxy: its raters parsed from the config, a Dirichlet weighting, a selection
    names, directions = parse_raters(cfg.rater_specs())
    weighting = sample_rater_weightings(names, 1, seed=0)[0]
    out = select_documents(list(sig.values()), weight_spec(weighting, directions), tmp_path / "proxy_sel",
                           budget=250, budget_unit="chars")
    assert 0 < out["chars_out"] <= 250
