"""`mixlm prepare` and `mixlm tokenizer train`: formats, malformed input, errors, determinism, resume."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from mixlm.cli import main as cli_main
from mixlm.data import prepare as prepare_mod
from mixlm.data.prepare import PrepareOptions, prepare_domain, prepare_domains
from mixlm.data.prepared import PreparedDomain, ShardError
from mixlm.data.sources import MalformedInputError, PrepareError
from mixlm.data.tokenizer_train import train_tokenizer_from_texts


def _texts(n, tag, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", tag]
    return [f"{tag} {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for i in range(n)]


def _write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        f.writelines(json.dumps({field: t}) + "\n" for t in texts)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return str(
        train_tokenizer_from_texts(
            _texts(400, "train") + ["0123456789 ñ é 中文"], out / "bpe", vocab_size=320
        )
    )


def _opts(tokenizer, **kw):
    return PrepareOptions(**{"tokenizer": tokenizer, "progress": False, "validation_docs": 3, **kw})


def _all_docs(domain: PreparedDomain):
    docs = []
    for split in (domain.train, domain.validation):
        docs += [np.asarray(d) for d in split.read(range(split.num_documents))]
    return docs


def _file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tokenizer_train_loads_with_auto_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    text = "alpha beta 42 ñ 中文"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None and len(tok) == 320
    # The CLI verb writes a folder that loads the same way.
    corpus = _write_jsonl(tmp_path / "c.jsonl", _texts(50, "cli"))
    assert (
        cli_main(
            [
                "tokenizer",
                "train",
                "--out",
                str(tmp_path / "t"),
                "--vocab-size",
                "280",
                "--domain",
                f"c={corpus}",
            ]
        )
        == 0
    )
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "t"))) == 280


def test_every_input_format_round_trips(tmp_path, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from transformers import AutoTokenizer

    texts = {
        name: _texts(12, name, seed=i) for i, name in enumerate(["jl", "gz", "zst", "pq", "txt", "hf", "tf"])
    }
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_jsonl(raw / "a.jsonl", texts["jl"], field="body")
    with gzip.open(raw / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts["gz"])
    (raw / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": t}) + "\n" for t in texts["zst"]).encode()
        )
    )
    pq.write_table(pa.table({"text": texts["pq"], "id": list(range(12))}), raw / "d.parquet")
    (raw / "txt").mkdir()
    for i, t in enumerate(texts["txt"]):
        (raw / "txt" / f"{i:02d}.txt").write_text(t)
    (raw / "txt" / ".hidden").write_text("skipped")
    datasets.Dataset.from_dict({"content": texts["hf"]}).save_to_disk(str(raw / "hf"))
    tfds_dir = _tiny_tfds(tmp_path / "tfds", texts["tf"])
    domains = {
        "jl": [f"{raw / 'a.jsonl'}?text_field=body"],
        "gz": [str(raw / "b.jsonl.gz")],
        "zst": [str(raw / "c.jsonl.zst")],
        "pq": [str(raw / "d.parquet")],
        "txt": [str(raw / "txt")],
        "hf": [f"hf:{raw / 'hf'}?text_field=content"],
        "tf": [f"tfds:mixlm_tiny_text?split=train&data_dir={tfds_dir}"],
    }
    manifests = prepare_domains(domains, tmp_path / "out", _opts(tokenizer))
    tok = AutoTokenizer.from_pretrained(tokenizer)
    for name, m in manifests.items():
        assert m.documents == 12 and m.splits["validation"].documents == 3, name
        assert m.tokenizer["vocab_size"] == 320 and len(m.tokenizer["fingerprint"]) == 64
        assert all(s["sha256"] and s["bytes"] > 0 for s in m.sources), name
        docs = _all_docs(PreparedDomain(tmp_path / "out", name))
        assert all(d[-1] == tok.eos_token_id for d in docs)
        assert sorted(tok.decode(d[:-1]) for d in docs) == sorted(texts[name]), name
    assert manifests["txt"].sources[0]["path"].endswith("00.txt") and len(manifests["txt"].sources) == 12
    assert (
        manifests["pq"].tokens
        == sum(s.tokens for s in manifests["pq"].splits["train"].shards)
        + manifests["pq"].splits["validation"].tokens
    )


def _tiny_tfds(data_dir, texts):
    import tensorflow_datasets as tfds

    class MixlmTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(texts):
                yield i, {"text": t}

    MixlmTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_malformed_input_is_counted_per_file_and_strict_raises(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    with open(bad, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{"text": "broken json\n')
        f.write(b'{"other": "no text field"}\n')
        f.write(b'{"text": 17}\n')
        f.write(b'{"text": "bad \xff\xfe utf8"}\n')
        f.write(b'{"text": "   "}\n')
        f.write(b"\n")  # a blank line is not a record
        f.write(b'{"text": "good two"}\n')
    good = _write_jsonl(tmp_path / "good.jsonl", ["fine", "also fine"])
    (tmp_path / "empty.txt").write_text("")
    m = prepare_domain(
        "mixed",
        [str(bad), str(good), str(tmp_path / "empty.txt")],
        tmp_path / "out",
        _opts(tokenizer, validation_docs=1),
    )
    per_file = {Path(s["path"]).name: (s["documents"], s["malformed"]) for s in m.sources}
    assert per_file["bad.jsonl"] == (
        2,
        {"invalid_json": 1, "missing_field": 2, "invalid_utf8": 1, "empty": 1},
    )
    assert per_file["good.jsonl"] == (
        2,
        {"invalid_json": 0, "missing_field": 0, "invalid_utf8": 0, "empty": 0},
    )
    assert per_file["empty.txt"][1]["empty"] == 1
    assert m.malformed == {"invalid_json": 1, "missing_field": 2, "invalid_utf8": 1, "empty": 2}
    assert (
        "bad.jsonl: 1 invalid json, 2 missing field, 1 invalid utf8, 1 empty"
        in prepare_mod.malformed_report(m)
    )
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl:line 2: invalid json"):
        prepare_domain("strict", [str(bad)], tmp_path / "out", _opts(tokenizer, strict=True))


def test_missing_domain_path_names_the_domain(tmp_path, tokenizer, capsys):
    with pytest.raises(PrepareError, match=r"domain 'webtext': source path .*nowhere.* does not exist"):
        prepare_domain("webtext", [str(tmp_path / "nowhere")], tmp_path / "out", _opts(tokenizer))
    rc = cli_main(
        [
            "prepare",
            "--out",
            str(tmp_path / "out"),
            "--tokenizer",
            tokenizer,
            "--no-progress",
            "--domain",
            f"webtext={tmp_path / 'nowhere'}",
        ]
    )
    assert rc == 1 and "domain 'webtext'" in capsys.readouterr().err


def test_prepare_twice_is_byte_identical_and_workers_do_not_matter(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "d.jsonl", _texts(300, "d"))
    opts = _opts(tokenizer, shard_tokens=1500, chunk_docs=64, batch_docs=16)
    prepare_domain("d", [str(src)], tmp_path / "a", opts)
    prepare_domain("d", [str(src)], tmp_path / "b", opts)
    prepare_domain("d", [str(src)], tmp_path / "c", PrepareOptions(**{**vars(opts), "workers": 2}))
    a = _file_bytes(tmp_path / "a")
    assert len([f for f in a if f.endswith(".array_record")]) > 3
    assert a == _file_bytes(tmp_path / "b") == _file_bytes(tmp_path / "c")
    # Same inputs and options again: nothing to do. Other options: refused without --overwrite.
    prepare_domain("d", [str(src)], tmp_path / "a", opts)
    assert _file_bytes(tmp_path / "a") == a
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare_domain("d", [str(src)], tmp_path / "a", PrepareOptions(**{**vars(opts), "seed": 1}))
    prepare_domain(
        "d", [str(src)], tmp_path / "a", PrepareOptions(**{**vars(opts), "seed": 1, "overwrite": True})
    )
    assert _file_bytes(tmp_path / "a") != a


def test_interrupted_prepare_resumes(tmp_path, tokenizer, monkeypatch):
    src = [str(_write_jsonl(tmp_path / f"{i}.jsonl", _texts(150, f"f{i}", seed=i))) for i in range(2)]
    opts = _opts(tokenizer, shard_tokens=2000, chunk_docs=40, batch_docs=16)
    prepare_domain("d", src, tmp_path / "clean", opts)

    tokenized = []
    real_tokenize, real_write_chunk, real_write_shard = (
        prepare_mod._tokenize,
        prepare_mod._write_chunk,
        prepare_mod._write_shard,
    )
    monkeypatch.setattr(
        prepare_mod, "_tokenize", lambda item: tokenized.append(len(item[2])) or real_tokenize(item)
    )

    def crash_after(n, real):
        calls = []

        def wrapper(*a, **k):
            if len(calls) == n:
                raise KeyboardInterrupt("simulated crash")
            calls.append(1)
            return real(*a, **k)

        return wrapper

    # 1) killed while tokenizing (after 5 chunks), 2) killed while writing shards (after 2 shards).
    monkeypatch.setattr(prepare_mod, "_write_chunk", crash_after(5, real_write_chunk))
    with pytest.raises(KeyboardInterrupt):
        prepare_domain("d", src, tmp_path / "resumed", opts)
    monkeypatch.setattr(prepare_mod, "_write_chunk", real_write_chunk)
    monkeypatch.setattr(prepare_mod, "_write_shard", crash_after(2, real_write_shard))
    tokenized.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_domain("d", src, tmp_path / "resumed", opts)
    assert sum(tokenized) == 300 - (150 + 40)  # 5 finished chunks (4 of file 0, 1 of file 1) not redone
    shards_written = []
    monkeypatch.setattr(
        prepare_mod, "_write_shard", lambda *a: shards_written.append(1) or real_write_shard(*a)
    )
    tokenized.clear()
    prepare_domain("d", src, tmp_path / "resumed", opts)
    assert sum(tokenized) == 0
    total_shards = len(list((tmp_path / "clean" / "d").glob("*.array_record")))
    assert len(shards_written) == total_shards - 2
    assert _file_bytes(tmp_path / "resumed") == _file_bytes(tmp_path / "clean")


def test_truncated_shard_names_the_file(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "d.jsonl", _texts(200, "t"))
    prepare_domain("t", [str(src)], tmp_path / "out", _opts(tokenizer, shard_tokens=2000))
    shard = sorted((tmp_path / "out" / "t").glob("train-*.array_record"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{shard.name}: shard is truncated"):
        PreparedDomain(tmp_path / "out", "t")
    shard.write_bytes(data[:-1])  # one byte short
    with pytest.raises(ShardError, match=shard.name):
        PreparedDomain(tmp_path / "out", "t")
    # Re-running prepare notices and rewrites the domain.
    prepare_domain("t", [str(src)], tmp_path / "out", _opts(tokenizer, shard_tokens=2000))
    assert shard.read_bytes() == data


def _corrupt_middle(shard: Path) -> bytes:
    """Overwrites 8 bytes in the middle of the shard's records (same size: the manifest's byte count still
    matches, and so does the record count in the footer). Returns the original bytes."""
    data = shard.read_bytes()
    used = len(data[:65536].rstrip(b"\0"))  # riegeli pads the first 64 KiB block; the records come first
    mid = used // 2
    shard.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 8]) + data[mid + 8 :])
    return data


def test_corrupt_shard_during_training_is_one_line_naming_the_file(tmp_path, tokenizer, capsys):
    src = _write_jsonl(tmp_path / "d.jsonl", _texts(200, "t"))
    opts = _opts(tokenizer, shard_tokens=2000)
    prepare_domain("t", [str(src)], tmp_path / "prep", opts)
    shards = sorted((tmp_path / "prep" / "t").glob("train-*.array_record"))
    originals = {shard: _corrupt_middle(shard) for shard in shards}
    PreparedDomain(tmp_path / "prep", "t")  # size and record count still pass: only reading finds it
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "model": {"num_layers": 1, "d_model": 32, "num_heads": 4, "mlp_dim": 64, "vocab_size": 320,
                  "max_seq_len": 16, "vocab_multiple": 8},
        "data": {"source": "prepared", "prepared_dir": str(tmp_path / "prep"), "mixture": {"t": 1}, "seq_len": 16},
        # 8 steps of 64 x 16 tokens read every document (one per chunk: group_size 1), the corrupt ones too
        "train": {"steps": 8, "global_batch_size": 64, "output_dir": str(tmp_path / "run")},
        "eval": {"batches": 0}, "checkpoint": {"save_at_end": False},
        "logging": {"progress": False, "tensorboard": False, "peak_flops": 1e9},
    }))
    capsys.readouterr()
    assert cli_main(["train", str(config)]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mixlm train: data error: "), err
    assert "train-0000" in err and ".array_record: shard of domain 't' is corrupt" in err
    assert "re-run `mixlm prepare` for domain 't'" in err
    # ...and re-running prepare finds the same-size corruption by checksum and rewrites the domain.
    prepare_domain("t", [str(src)], tmp_path / "prep", opts)
    assert all(shard.read_bytes() == data for shard, data in originals.items())
