"""`mixlm eval --domains` / `--mc-task`: lm-eval tasks generated from local files, on a training run's checkpoint
(the Flax model, no export) and on its export (transformers).

Why the numbers can equal the trainer's exactly: lm-eval's rolling log-likelihood scores each held-out document
on its own, every token conditioned on the prefix (BOS) token and the document so far. The trainer scores
packed rows; with `first_fit` packing each document is its own segment (own positions, no attention across
segments) and a target counts only inside its segment, so each document's loss is the same per-document sum,
but without a prediction for its first token. Preparing with a BOS (`prepend_bos`) makes that first token the
BOS itself, so both sides predict exactly the same tokens (the document's text tokens and its EOS) from the same
contexts. Documents are shorter than data.seq_len, so no document is split across rows.
"""

import json

import numpy as np
import pytest
from corpus import alphabet_docs

from mixlm.cli import main as cli_main
from mixlm.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
)
from mixlm.data.prepare import PrepareOptions, prepare_domains
from mixlm.data.prepared import PreparedDomain
from mixlm.data.tokenizer import train_tokenizer_from_texts

ALPHABETS = {"letters": "abcdefgh", "digits": "0123456789"}
VOCAB = 300
SEQ_LEN = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two prepared domains (with BOS and EOS, 12 held-out documents each), a 3-step first_fit run on them with
    a checkpoint, and the run exported as a transformers folder."""
    from mixlm.hf.export import export_hf
    from mixlm.hf.param_readers import open_checkpoint
    from mixlm.hooks import MixtureUpdateHook, default_hooks
    from mixlm.train import train

    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    texts = {name: alphabet_docs(alphabet, 120, rng, word_len=(1, 5), words=(2, 8)) for name, alphabet in ALPHABETS.items()}
    sources = {}
    for name, docs in texts.items():
        sources[name] = str(root / f"{name}.jsonl")
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer_from_texts([t for d in texts.values() for t in d], root / "tok", vocab_size=VOCAB)
    prepared = root / "prepared"
    prepare_domains(sources, prepared, PrepareOptions(tokenizer=str(tok), validation_docs=12, prepend_bos=True,
                                                      progress=False))
    cfg = ExperimentConfig(
        model=ModelConfig(family="llama", name="domains-tiny", num_layers=2, d_model=64, num_heads=4, mlp_dim=128,
                          vocab_size=VOCAB, max_seq_len=SEQ_LEN, init_std=0.1),
        data=DataConfig(source="prepared", prepared_dir=str(prepared), mixture={"letters": 0.5, "digits": 0.5},
                        seq_len=SEQ_LEN, packing="first_fit", tokenizer=str(tok)),
        train=TrainConfig(steps=3, global_batch_size=8, output_dir=str(root / "run")),
        checkpoint=CheckpointConfig(async_save=False),
        eval=EvalConfig(batches=8),
        logging=LoggingConfig(every=1, progress=False, tensorboard=False),
    )
    # a mixture update at step 2 (saved in the checkpoint's data state), for `mixlm plot` on a real run
    update = MixtureUpdateHook(2, lambda stats: {"letters": 0.8, "digits": 0.2} if stats.step == 2 else None)
    result = train(cfg, hooks=default_hooks(cfg, update))
    export_hf(open_checkpoint(root / "run"), root / "hf", tokenizer=str(tok))
    return {"root": root, "prepared": prepared, "run": root / "run", "hf": root / "hf", "val": result.eval}


def _eval(args, out):
    assert cli_main(["eval", *args, "--batch-size", "4", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_domain_perplexity_equals_the_trainers_validation_loss(run):
    """Same documents, same tokens: nll_per_token of `eval RUN --domains PREPARED` (Flax model on the checkpoint)
    and of the export (transformers) equals the trainer's val_loss/<domain> within 1e-4 nats."""
    for model, name in ((run["run"], "run"), (run["hf"], "hf")):
        results = _eval([str(model), "--domains", str(run["prepared"])], run["root"] / f"eval_{name}.json")
        assert set(results["domains"]) == set(ALPHABETS)
        for domain, row in results["domains"].items():
            split = PreparedDomain(run["prepared"], domain).validation
            assert row["documents"] == split.num_documents == 12
            assert row["tokens"] == split.num_tokens - split.num_documents  # all but each document's BOS
            assert row["retokenized_mismatches"] == 0
            assert row["nll_per_token"] == pytest.approx(run["val"][f"val_loss/{domain}"], abs=1e-4), (name, domain)
            assert row["token_perplexity"] == pytest.approx(np.exp(row["nll_per_token"]), rel=1e-6)
            assert 0 < row["bits_per_byte"] < 20 and row["byte_perplexity"] > 1
        assert results["tasks"]["mixlm_domain_letters"]["metric"] == "nll_per_token"

    # a subset by name
    results = _eval([str(run["run"]), "--domains", f"{run['prepared']}:digits"], run["root"] / "eval_sub.json")
    assert list(results["domains"]) == ["digits"]


def test_jsonl_domain_and_a_local_multiple_choice_task(run, capsys):
    quiz = run["root"] / "quiz.jsonl"
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(14):
        a = "".join(rng.choice(list("abcdefgh"), size=3))
        choices = [a, "123", "45", "6789"]
        rows.append({"question": f"{a} {a}", "choices": choices, "answer": a if len(rows) % 2 else 0})
    quiz.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes = run["root"] / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc def gh", "12 345 6", "a1 b2 c3"]))
    results = _eval([str(run["hf"]), "--domains", str(notes), "--mc-task", f"quiz={quiz}:3"],
                    run["root"] / "eval_local.json")
    assert results["domains"]["notes"]["documents"] == 3 and results["domains"]["notes"]["nll_per_token"] > 0
    quiz_row = results["tasks"]["quiz"]
    assert quiz_row["metric"] in ("acc_norm", "acc") and 0.0 <= quiz_row["score"] <= 1.0
    assert quiz_row["shots"] == [3]
    shot_runs = {r["shots"]: r for r in results["runs"]}
    assert shot_runs[3]["n-samples"]["quiz"]["effective"] == 11  # 14 questions, 3 are the few-shot pool
    assert "| notes |" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [
    ("{root}/missing", "no such folder or file"),
    ("{prepared}:nope", "nope not prepared"),
])
def test_domain_spec_errors_are_one_line(run, capsys, spec, message):
    spec = spec.format(root=run["root"], prepared=run["prepared"])
    assert cli_main(["eval", str(run["hf"]), "--domains", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_plot_of_the_real_run_shows_its_mixture_update(run):
    from mixlm.training_curves import mixture_schedule, plot_runs

    schedule = mixture_schedule(run["run"])
    assert [step for step, _ in schedule] == [0, 2]
    assert schedule[1][1] == pytest.approx({"letters": 0.8, "digits": 0.2})
    written = plot_runs([run["run"]], run["root"] / "plots")
    assert sorted(p.name for p in written) == ["mixture.png", "train_loss.png", "val_loss.png"]
    assert all(p.stat().st_size > 1000 for p in written)
