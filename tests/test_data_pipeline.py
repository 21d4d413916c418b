"""The prepared-mixture train source: token shares, stages, exact resume, host slices, packing, eval."""

import json
import warnings

import numpy as np
import pytest
from corpus import alphabet_docs

from mixlm.config import DataConfig, EvalConfig, ExperimentConfig, ModelConfig, TrainConfig
from mixlm.data import make_train_source
from mixlm.data.pipeline import DataExhaustedError, RepetitionWarning
from mixlm.data.prepare import PrepareOptions, prepare_domains
from mixlm.data.prepared import PreparedDomain
from mixlm.data.tokenizer import train_tokenizer_from_texts
from mixlm.errors import ConfigError

# Each domain writes with its own alphabet, so (apart from spaces and EOS) its tokens are its own and a row's
# domain can be read off its tokens.
ALPHABETS = {"alpha": "abcdefgh", "digits": "0123456789", "upper": "ABCDEFGH", "symbols": "#$%&@+=~"}
VOCAB = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("markers")
    rng = np.random.default_rng(0)
    texts = {name: alphabet_docs(alphabet, 300, rng) for name, alphabet in ALPHABETS.items()}
    sources = {}
    for name, docs in texts.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        sources[name] = str(path)
    tok = train_tokenizer_from_texts(
        [t for docs in texts.values() for t in docs], root / "tok", vocab_size=VOCAB
    )
    prepare_domains(
        sources,
        root / "prepared",
        PrepareOptions(tokenizer=str(tok), validation_docs=10, shard_tokens=3000, progress=False),
    )
    owner = {}
    for d, name in enumerate(sorted(ALPHABETS)):
        split = PreparedDomain(root / "prepared", name).train
        for token in np.unique(np.concatenate(split.read(range(split.num_documents)))):
            owner[int(token)] = -1 if int(token) in owner else d
    token_domain = np.full(VOCAB, -1)
    for token, d in owner.items():
        token_domain[token] = d
    return {"prepared": str(root / "prepared"), "token_domain": token_domain}


def _cfg(data, mixture, *, seq_len=32, batch=40, packing="concat", steps=100, max_epochs=0.0, workers=0):
    return ExperimentConfig(
        model=ModelConfig(vocab_size=VOCAB),
        data=DataConfig(
            source="prepared",
            prepared_dir=data["prepared"],
            mixture=mixture,
            seq_len=seq_len,
            packing=packing,
            max_epochs=max_epochs,
            num_workers=workers,
            seed=7,
        ),
        train=TrainConfig(steps=steps, global_batch_size=batch),
    )


def _row_domains(data, batch):
    """The domain index of each row (from its tokens); asserts no row mixes domains."""
    tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    out = []
    for row in data["token_domain"][tokens]:
        owners = set(row[row >= 0].tolist())
        assert len(owners) == 1, owners
        out.append(owners.pop())
    return np.array(out)


def _take(source, n):
    return [source.next_batch() for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


STAGED = {
    "weights": {"alpha": 0.5, "digits": 0.3, "upper": 0.15, "symbols": 0.05},
    "stages": [{"step": 50, "weights": {"alpha": 0.1, "digits": 0.2, "upper": 0.3, "symbols": 0.4}}],
}


@pytest.mark.filterwarnings("ignore::mixlm.data.pipeline.RepetitionWarning")
def test_token_share_within_one_percent_and_after_a_stage_switch(data, capsys):
    source = make_train_source(_cfg(data, STAGED, batch=40))
    assert "step 50" in capsys.readouterr().out  # the mixture table is printed at start
    names = sorted(ALPHABETS)
    for weights in (
        STAGED["weights"],
        STAGED["stages"][0]["weights"],
    ):  # 50 steps x 40 = 2,000 sequences each
        rows = np.concatenate([_row_domains(data, b) for b in _take(source, 50)])
        observed = np.bincount(rows, minlength=4) / len(rows)
        np.testing.assert_allclose(observed, [weights[n] for n in names], atol=0.01)
    seen = source.tokens_seen()
    assert sum(seen.values()) == 100 * 40 * 32
    source.close()


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_resume_gives_the_next_50_batches_across_a_stage_change(data, packing):
    mixture = {
        "weights": {"alpha": 0.6, "digits": 0.4},
        "stages": [{"step": 30, "weights": {"upper": 0.5, "symbols": 0.3, "alpha": 0.2}}],
    }
    cfg = _cfg(data, mixture, batch=8, packing=packing)
    first = make_train_source(cfg)
    _take(first, 20)
    state = json.loads(json.dumps(first.get_state()))
    assert len(json.dumps(state)) < 400
    expected = _take(first, 50)
    fresh = make_train_source(cfg)
    fresh.set_state(state)
    _same(_take(fresh, 50), expected)
    assert fresh.tokens_seen() == first.tokens_seen()
    moved = make_train_source(cfg)  # a source that already ran elsewhere
    _take(moved, 37)
    moved.set_state(state)
    _same(_take(moved, 5), expected[:5])
    for s in (first, fresh, moved):
        s.close()


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_host_slices_form_the_same_global_batch(data, packing):
    mixture = {
        "weights": {"alpha": 0.5, "digits": 0.5},
        "stages": [{"step": 2, "weights": {"upper": 1, "alpha": 1}}],
    }
    one = make_train_source(_cfg(data, mixture, batch=12, packing=packing))
    hosts = [
        make_train_source(_cfg(data, mixture, batch=12, packing=packing), process_index=p, process_count=3)
        for p in range(3)
    ]
    for _ in range(4):
        whole = one.next_batch()
        parts = [h.next_batch() for h in hosts]
        assert parts[0]["inputs"].shape == (4, 32)
        _same([whole], [{k: np.concatenate([p[k] for p in parts]) for k in whole}])
    assert all(h.get_state() == one.get_state() and h.tokens_seen() == one.tokens_seen() for h in hosts)
    for s in [one] + hosts:
        s.close()


def test_first_fit_rows_never_cross_a_document_boundary(data):
    source = make_train_source(
        _cfg(data, {"alpha": 1, "digits": 1, "upper": 1}, batch=16, packing="first_fit")
    )
    docs = {}
    for name in ("alpha", "digits", "upper"):
        split = PreparedDomain(data["prepared"], name).train
        for d in split.read(range(split.num_documents)):
            docs.setdefault(len(d), []).append(np.asarray(d, np.int32))
    eos = 0
    loss_tokens = 0
    L = 32
    for batch in _take(source, 6):
        seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
        for r in range(seg.shape[0]):
            row_tokens = np.append(batch["inputs"][r], batch["targets"][r, -1])
            ids = [s for s in np.unique(seg[r]) if s > 0]
            assert ids == list(range(1, len(ids) + 1))
            assert (seg[r][: (seg[r] > 0).sum()] > 0).all()  # padding only at the end
            assert (mask[r][seg[r] == 0] == 0).all()
            for s in ids:
                where = np.flatnonzero(seg[r] == s)
                first, last = where[0], where[-1]
                assert (np.diff(where) == 1).all() and (pos[r][where] == np.arange(len(where))).all()
                # Every target inside the piece is trained on; the piece's last input predicts the next piece
                # (masked) unless the piece runs on into the row's final, target-only token.
                assert (mask[r][where[:-1]] == 1).all()
                assert mask[r][last] == 0 or last == L - 1
                piece = row_tokens[first : last + 1 + int(mask[r][last])]
                # The piece is a contiguous run of exactly one document; EOS can only end it.
                assert eos not in piece[:-1].tolist()
                assert any(
                    piece.tobytes() in d.tobytes() for n, ds in docs.items() if n >= len(piece) for d in ds
                )
            loss_tokens += int(mask[r].sum())
    assert sum(source.tokens_seen().values()) == loss_tokens
    source.close()


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_eval_batches_cover_every_mixture_domain_also_weight_zero(data, packing):
    mixture = {"alpha": 1.0, "digits": 0.0}
    one = make_train_source(_cfg(data, mixture, batch=4, packing=packing))
    two = [
        make_train_source(_cfg(data, mixture, batch=4, packing=packing), process_index=p, process_count=2)
        for p in range(2)
    ]
    full = one.eval_batches(1000)
    halves = [h.eval_batches(1000) for h in two]
    assert set(full) == {"alpha", "digits"}
    for name, batches in full.items():
        assert len(batches) == len(halves[0][name]) == len(halves[1][name]) > 1
        for j, batch in enumerate(batches):
            _same([batch], [{k: np.concatenate([h[name][j][k] for h in halves]) for k in batch}])
        val = PreparedDomain(data["prepared"], name).validation
        masked = sum(float(b["loss_mask"].sum()) for b in batches)
        if packing == "concat":  # every held-out token but the first is a target exactly once
            assert masked == val.num_tokens - 1
        else:  # each document of n tokens gives n - 1 targets
            assert masked == val.num_tokens - val.num_documents
    assert len(one.eval_batches(2)["alpha"]) == 2
    for s in [one] + two:
        s.close()


def test_eval_only_domains_are_evaluated_and_never_trained_on(data):
    cfg = _cfg(data, {"alpha": 0.5, "digits": 0.5}, batch=8)
    cfg = cfg.replace(eval=EvalConfig(domains=["symbols"]))
    source = make_train_source(cfg)
    names = sorted(ALPHABETS)
    evals = source.eval_batches(2)
    assert list(evals) == ["alpha", "digits", "symbols"]
    for batch in evals["symbols"]:  # the held-out rows are the symbols domain's own
        real = batch["loss_mask"].sum(axis=1) > 0
        assert set(_row_domains(data, {k: v[real] for k, v in batch.items()})) == {names.index("symbols")}
    trained = set(np.concatenate([_row_domains(data, b) for b in _take(source, 25)]).tolist())
    assert trained == {names.index("alpha"), names.index("digits")}
    source.close()
    with pytest.raises(ConfigError, match=r"eval.domains\[0\]: 'symbol' is not a prepared domain .*symbols"):
        make_train_source(cfg.replace(eval=EvalConfig(domains=["symbol"])))
    synthetic = cfg.replace(data=DataConfig(source="synthetic"))
    with pytest.raises(ConfigError, match="eval.domains=.*needs data.source='prepared'"):
        make_train_source(synthetic)


def test_repetition_limit_warns_then_stops(data):
    mixture = {"alpha": 1.0}
    units = make_train_source(_cfg(data, mixture, batch=8, steps=1)).train_rows[0].units_per_epoch
    steps_per_epoch = units // 8
    with pytest.raises(ConfigError, match=r"alpha \(2\.\d+ epochs\)"):
        make_train_source(_cfg(data, mixture, batch=8, steps=2 * steps_per_epoch + 5, max_epochs=2.0))
    source = make_train_source(
        _cfg(data, mixture, batch=8, steps=1, max_epochs=1.5)
    )  # a run longer than planned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataExhaustedError, match="'alpha'.*data.max_epochs=1.5"):
            for _ in range(2 * steps_per_epoch):
                source.next_batch()
    assert sum(issubclass(w.category, RepetitionWarning) for w in caught) == 1
    assert source._step == int(1.5 * units) // 8
    source.close()


def test_mixture_naming_an_unprepared_domain_is_an_error(data):
    with pytest.raises(ConfigError, match="data.mixture.alpah: unknown domain 'alpah'; did you mean alpha"):
        make_train_source(_cfg(data, {"alpah": 1.0}))
    with pytest.raises(ConfigError, match="model.vocab_size=64 is smaller"):
        make_train_source(_cfg(data, {"alpha": 1.0}).replace(model=ModelConfig(vocab_size=64)))


def test_worker_processes_give_the_same_batches(data):
    mixture = {"alpha": 0.5, "upper": 0.5}
    inline = make_train_source(_cfg(data, mixture, batch=8, packing="first_fit"))
    workers = make_train_source(_cfg(data, mixture, batch=8, packing="first_fit", workers=2))
    _take(inline, 3)
    _take(workers, 3)
    state = workers.get_state()
    assert state == inline.get_state()
    _same(_take(workers, 6), _take(inline, 6))
    workers.set_state(state)
    inline.set_state(state)
    _same(_take(workers, 2), _take(inline, 2))
    workers.close()
    inline.close()


def test_resuming_under_another_mixture_warns_and_follows_the_new_one(data):
    old = make_train_source(_cfg(data, {"alpha": 0.7, "digits": 0.3}, batch=8, packing="first_fit"))
    _take(old, 10)
    new_cfg = _cfg(data, {"alpha": 0.2, "digits": 0.3, "upper": 0.5}, batch=8, packing="first_fit")
    resumed = make_train_source(new_cfg)
    with pytest.warns(UserWarning, match="differs from the checkpoint"):
        resumed.set_state(old.get_state())
    reference = make_train_source(new_cfg)
    _take(reference, 10)
    _same(_take(resumed, 3), _take(reference, 3))
    for s in (old, resumed, reference):
        s.close()


def test_first_fit_batch_through_the_model_never_attends_across_documents(data):
    """The model side of packing: on a real first-fit batch, each packed document's logits equal the
    logits of that document run alone (so no token saw another document)."""
    import jax.numpy as jnp
    from flax import nnx

    from mixlm.models import build_model

    cfg = _cfg(data, {"alpha": 1, "digits": 1, "upper": 1}, seq_len=64, batch=8, packing="first_fit")
    source = make_train_source(cfg)
    batch = source.next_batch()
    source.close()
    model_cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, vocab_size=VOCAB, max_seq_len=64)
    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    packed = model(jnp.asarray(batch["inputs"]), positions_BxL=jnp.asarray(batch["positions"]),
                   segment_ids_BxL=jnp.asarray(batch["segment_ids"]))
    documents = []  # (row, its columns) of every packed document
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        documents += [(r, np.flatnonzero(seg == s)) for s in np.unique(seg) if s > 0]
    assert len(documents) > batch["inputs"].shape[0]  # rows really hold several documents
    # each document alone at the start of its own row, no packing information: causal attention keeps the
    # padding after it out of its logits, so one call runs them all
    alone_inputs = np.zeros((len(documents), 64), batch["inputs"].dtype)
    for i, (r, where) in enumerate(documents):
        alone_inputs[i, : where.size] = batch["inputs"][r, where]
    alone = np.asarray(model(jnp.asarray(alone_inputs)))
    for i, (r, where) in enumerate(documents):
        np.testing.assert_allclose(np.asarray(packed[r, where]), alone[i, : where.size], atol=1e-4)
