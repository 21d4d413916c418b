"""`mixlm prepare` and `mixlm tokenizer train`: formats, malformed input, errors, determinism, resume."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mixlm.cli import main as cli_main
from mixlm.data import prepare as prepare_mod
from mixlm.data import tokenize_chunks as chunks_mod
from mixlm.data import tokenizer as tokenizer_mod
from mixlm.data.prepare import PrepareOptions, prepare_domain, prepare_domains
from mixlm.data.prepared import PreparedDomain
from mixlm.data.tokenizer import train_tokenizer_from_texts
from mixlm.errors import MalformedInputError, PrepareError, ShardError


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
    """The prepared data's files and bytes (not the host's stat cache, which records modification times)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != prepare_mod.STATS_FILE}


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


def test_tokenizer_train_says_what_it_skipped_and_stops_at_a_cut_file(tmp_path, capsys):
    import zstandard

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(50, "c")) + '{"text": 3}\n{oops\n')
    capsys.readouterr()
    assert cli_main(["tokenizer", "train", "--out", str(tmp_path / "t"), "--vocab-size", "280", "--no-progress",
                     "--domain", f"c={corpus}"]) == 0
    assert f"tokenizer train: skipped 2 malformed records in {corpus} (1 invalid json, 1 missing field)" in \
        capsys.readouterr().err
    whole = zstandard.ZstdCompressor().compress(corpus.read_bytes())
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    assert cli_main(["tokenizer", "train", "--out", str(tmp_path / "t2"), "--vocab-size", "280", "--no-progress",
                     "--domain", f"c={cut}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cut}: the zstd data ends in the middle of a compressed frame" in err
    assert not (tmp_path / "t2").exists()


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


def test_a_no_op_rerun_reads_no_input_or_shard_bytes_and_a_touched_input_is_hashed_again(tmp_path, tokenizer,
                                                                                          monkeypatch):
    from mixlm.data import inputs, prepared

    src = [str(_write_jsonl(tmp_path / f"{i}.jsonl", _texts(60, f"f{i}", seed=i))) for i in range(2)]
    opts = _opts(tokenizer, shard_tokens=1500)
    prepare_domain("d", src, tmp_path / "out", opts)
    before = _file_bytes(tmp_path / "out")
    hashed, checksummed = [], []
    real_digest, real_check = inputs.file_digest, prepared.check_shard

    def digest(path, known=None):
        if known is None:
            hashed.append(str(path))  # a read of every byte
        return real_digest(path, known)

    monkeypatch.setattr(inputs, "file_digest", digest)
    monkeypatch.setattr(prepared, "check_shard", lambda path, shard, checksum=False: (
        checksummed.append(path.name) if checksum else None) or real_check(path, shard, checksum))
    prepare_domain("d", src, tmp_path / "out", opts)
    assert hashed == [] and checksummed == []  # nothing read whole: sizes and mtimes as recorded
    assert _file_bytes(tmp_path / "out") == before
    # touched (same bytes, new mtime): that one input is hashed again, found unchanged, and nothing is redone
    os.utime(src[1], ns=(0, 10**9))
    prepare_domain("d", src, tmp_path / "out", opts)
    assert hashed == [src[1]] and checksummed == [] and _file_bytes(tmp_path / "out") == before
    # an output shard rewritten in place (same size): its sha256 is checked, the damage found, the domain rebuilt
    shard = min((tmp_path / "out" / "d").glob("train-*.array_record"))
    _corrupt_middle(shard)
    prepare_domain("d", src, tmp_path / "out", opts)
    assert shard.name in checksummed and _file_bytes(tmp_path / "out") == before


def test_interrupted_prepare_resumes(tmp_path, tokenizer, monkeypatch):
    src = [str(_write_jsonl(tmp_path / f"{i}.jsonl", _texts(150, f"f{i}", seed=i))) for i in range(2)]
    opts = _opts(tokenizer, shard_tokens=2000, chunk_docs=40, batch_docs=16)
    prepare_domain("d", src, tmp_path / "clean", opts)

    tokenized = []
    real_tokenize, real_write_chunk, real_write_shard = (
        chunks_mod._tokenize,
        chunks_mod._write_chunk,
        prepare_mod._write_shard,
    )
    monkeypatch.setattr(
        chunks_mod, "_tokenize", lambda item: tokenized.append(len(item[2])) or real_tokenize(item)
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
    monkeypatch.setattr(chunks_mod, "_write_chunk", crash_after(5, real_write_chunk))
    with pytest.raises(KeyboardInterrupt):
        prepare_domain("d", src, tmp_path / "resumed", opts)
    monkeypatch.setattr(chunks_mod, "_write_chunk", real_write_chunk)
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


# ---- compressed inputs cut short or mislabelled: an error naming the file, never a short read ------------
def _jsonl_bytes(texts) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _lines_before_the_cut(decompressed_prefix: bytes) -> int:
    return decompressed_prefix.count(b"\n")  # the complete lines a streaming reader got before the cut


def _prepare_cli(tmp_path, tokenizer, source, *extra):
    return cli_main(["prepare", "--out", str(tmp_path / "out"), "--tokenizer", tokenizer, "--no-progress",
                     "--validation-docs", "1", "--domain", f"z={source}", *extra])


@pytest.mark.parametrize("docs", [400, 20], ids=["several-blocks", "one-block"])
def test_a_cut_zstd_input_is_an_error_naming_the_file_and_the_documents_read(tmp_path, tokenizer, capsys, docs):
    import zstandard

    whole = zstandard.ZstdCompressor().compress(_jsonl_bytes(_texts(docs, "z")))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    read = _lines_before_the_cut(zstandard.ZstdDecompressor().decompressobj().decompress(cut.read_bytes()))
    assert read < docs // 2 + 20  # (the small file's one block decompresses to nothing before its end)
    for strict in ([], ["--strict"]):
        capsys.readouterr()
        assert _prepare_cli(tmp_path, tokenizer, cut, *strict) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mixlm prepare: error: "), err
        assert f"{cut}: the zstd data ends in the middle of a compressed frame: the file is cut short" in err
        assert f"stopped after {read:,} lines ({read:,} documents) read" in err
        assert not (tmp_path / "out" / "z" / "manifest.json").exists()


def test_zstd_frames_gzip_cuts_and_mislabelled_files(tmp_path, tokenizer, capsys):
    import zstandard

    texts = _texts(300, "f")
    frames = [zstandard.ZstdCompressor().compress(_jsonl_bytes(part)) for part in (texts[:100], texts[100:])]
    (tmp_path / "frames.jsonl.zst").write_bytes(frames[0] + frames[1])  # as pzstd / zstd -T writes
    m = prepare_domain("frames", [str(tmp_path / "frames.jsonl.zst")], tmp_path / "ok", _opts(tokenizer))
    assert m.documents == 300
    # cut inside the second frame: the first frame's documents and the second's complete lines were read
    cut_frames = tmp_path / "cut-frames.jsonl.zst"
    cut_frames.write_bytes(frames[0] + frames[1][: len(frames[1]) // 2])
    read = 100 + _lines_before_the_cut(
        zstandard.ZstdDecompressor().decompressobj().decompress(frames[1][: len(frames[1]) // 2]))
    with pytest.raises(PrepareError, match=f"stopped after {read:,} lines \\({read:,} documents\\) read"):
        prepare_domain("cut", [str(cut_frames)], tmp_path / "out", _opts(tokenizer))

    whole = gzip.compress(_jsonl_bytes(texts))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    import zlib

    read = _lines_before_the_cut(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut.read_bytes()))
    capsys.readouterr()
    assert _prepare_cli(tmp_path, tokenizer, cut) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cut}: the gzip data ends in the middle" in err, err
    assert f"stopped after {read:,} lines ({read:,} documents) read" in err

    plain = tmp_path / "plain.jsonl.zst"
    plain.write_bytes(_jsonl_bytes(texts))  # not compressed at all
    assert _prepare_cli(tmp_path, tokenizer, plain) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{plain}: is not zstd data although its name ends in .zst" in err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert _prepare_cli(tmp_path, tokenizer, broken) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{broken}: not a readable parquet file" in err, err


# ---- one prepare at a time in a domain folder ------------------------------------------------------------
def test_a_second_prepare_on_a_domain_folder_is_refused_naming_the_first(tmp_path, tokenizer):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import textwrap

    repo = Path(__file__).resolve().parents[1]
    src = _write_jsonl(tmp_path / "d.jsonl", _texts(60, "d"))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    # A real prepare, stopped while it tokenizes (it holds the folder's lock then, as a long run does).
    spec = tokenizer_mod.load_tokenizer_spec(tokenizer)  # handed over: the holder need not import transformers
    holder_code = textwrap.dedent(f"""
        import time
        from mixlm.data import prepare
        def stalled(*args, **kwargs):
            print("tokenizing", flush=True)
            time.sleep(600)
        prepare.tokenize_units = stalled
        prepare.prepare_domain("d", [{str(src)!r}], {str(out)!r},
                               prepare.PrepareOptions(tokenizer={tokenizer!r}, progress=False, validation_docs=3),
                               tokenizer=prepare.TokenizerSpec(*{(spec.name, spec.backend_json, spec.vocab_size,
                                                                 spec.eos_id, spec.bos_id)!r}))
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True, cwd=repo,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "tokenizing"
        before = _file_bytes(out)
        second = subprocess.run(
            [sys.executable, "-m", "mixlm.cli", "prepare", "--out", str(out), "--tokenizer", tokenizer,
             "--no-progress", "--validation-docs", "3", "--domain", f"d={src}"],
            capture_output=True, text=True, cwd=repo, env=env, timeout=300, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert lines[0].startswith(f"mixlm prepare: error: {out / 'd'} is being written by another mixlm prepare "
                                   f"(host {socket.gethostname()}, pid {holder.pid}, since ")
        assert "wait for it to finish" in lines[0] and "choose another --out" in lines[0]
        assert _file_bytes(out) == before  # the refused prepare touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The kernel dropped the killed holder's lock: a rerun finishes, as an undisturbed prepare would.
    prepare_domain("d", [str(src)], out, _opts(tokenizer))
    prepare_domain("d", [str(src)], tmp_path / "clean", _opts(tokenizer))
    assert _file_bytes(out) == _file_bytes(tmp_path / "clean")


# ---- long documents: tokenized in pieces when that gives the same ids, else refused over a limit --------
def _tokenizer_variant(base: str, out: Path, edit) -> str:
    """A copy of the tokenizer folder `base` with its tokenizer.json edited by `edit(dict)`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((Path(base) / "tokenizer.json").read_text())
    edit(spec)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(str(out))
    return str(out)


def _tricky_text(n_fragments: int, seed: int) -> str:
    """Text that exercises the pre-tokenizer at cuts: contractions, digits, punctuation, whitespace runs of
    every kind, non-Latin scripts, combining marks, emoji, special tokens, underscores."""
    fragments = ["it's", "don't", "we'll", "O'Neil", "naïve", "cafe\u0301", "中文字", "ß", "Ω", "12345", "3.14", "...",
                 "!!", "--", "_x_", "a_b", "hello", "World", "x", "😀", "<|endoftext|>", "'s", "\u00a0", "\u2003",
                 "e\u0301", "(see", "ok)", "$9", "#tag"]
    separators = [" ", " ", " ", "", "  ", "   ", "\n", "\n\n", " \n ", "\t", " \t ", "\r\n"]
    rng = np.random.default_rng(seed)
    return "".join(str(rng.choice(fragments)) + str(rng.choice(separators)) for _ in range(n_fragments))


def test_pieces_cut_before_a_space_between_words_give_the_ids_of_the_whole_text(tmp_path, tokenizer):
    from tokenizers import Tokenizer

    def neox_like(spec):  # GPT-NeoX's differences: NFC, whitespace-run added tokens; and a prefix space
        spec["normalizer"] = {"type": "NFC"}
        spec["pre_tokenizer"]["add_prefix_space"] = True
        for i, content in enumerate(["  ", "   ", "<|x|>"]):
            spec["added_tokens"].append({"id": 320 + i, "content": content, "single_word": False,
                                         "lstrip": content == "<|x|>", "rstrip": False, "normalized": True,
                                         "special": False})

    variants = {"trained": tokenizer, "neox-like": _tokenizer_variant(tokenizer, tmp_path / "neox", neox_like)}
    text = _tricky_text(1500, seed=0) + " <|x|> end"
    for name, folder in variants.items():
        spec = tokenizer_mod.load_tokenizer_spec(folder)
        assert tokenizer_mod.piecewise_problem(spec) is None, name
        tok = Tokenizer.from_str(spec.backend_json)
        whole = tok.encode(text, add_special_tokens=False).ids
        for piece_chars in (1, 7, 64):  # 1: a cut at every place one is allowed
            pieces = tokenizer_mod.document_pieces(text, piece_chars)
            assert "".join(pieces) == text and len(pieces) > 1
            assert all(p[0] == " " and p[1] != " " for p in pieces[1:])
            ids = [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False).ids]
            assert ids == whole, (name, piece_chars)

    def lowercase(spec):
        spec["normalizer"] = {"type": "Lowercase"}

    def spaced_token(spec):
        spec["added_tokens"].append({"id": 320, "content": "New York", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": False})

    for edit, reason in ((lowercase, "normalizer is Lowercase"), (spaced_token, "'New York' could span a cut")):
        spec = tokenizer_mod.load_tokenizer_spec(_tokenizer_variant(tokenizer, tmp_path / edit.__name__, edit))
        assert reason in tokenizer_mod.piecewise_problem(spec)


def test_long_documents_are_tokenized_in_pieces_or_refused_over_the_limit(tmp_path, tokenizer, monkeypatch, capsys):
    from transformers import AutoTokenizer

    long_text = " ".join(_texts(120, "long"))  # ~11,000 characters
    src = _write_jsonl(tmp_path / "long.jsonl", ["short one", long_text, "short two"])
    seen = []
    real_tokenize = chunks_mod._tokenize
    monkeypatch.setattr(chunks_mod, "_tokenize", lambda item: seen.extend(len(piece) for doc in item[2] for piece in doc)
                        or real_tokenize(item))
    opts = _opts(tokenizer, validation_docs=0, max_document_chars=100)
    prepare_domain("long", [str(src)], tmp_path / "out", opts)
    assert max(seen) <= 100 and sum(seen) == len(long_text) + len("short one") + len("short two")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    docs = {tuple(d.tolist()) for d in _all_docs(PreparedDomain(tmp_path / "out", "long"))}
    assert tuple(tok(long_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) in docs
    # the limit does not change the output: a domain prepared with the default is up to date
    prepare_domain("long", [str(src)], tmp_path / "out", _opts(tokenizer, validation_docs=0))

    # a stretch with no space between two words to cut at, over the limit: refused naming file, line, size
    unbroken = _write_jsonl(tmp_path / "unbroken.jsonl", ["fine", "ab " + "x" * 150 + " cd"])
    with pytest.raises(PrepareError, match=(f"{unbroken}: the document at line 2 \\(156 characters\\) holds a "
                                            "stretch of 15[0-9] characters with no space")):
        prepare_domain("unbroken", [str(unbroken)], tmp_path / "out", opts)
    # a tokenizer that cannot be cut safely: a document over the limit is refused, one line in the CLI
    lower = _tokenizer_variant(tokenizer, tmp_path / "lower", lambda s: s.update(normalizer={"type": "Lowercase"}))
    capsys.readouterr()
    assert cli_main(["prepare", "--out", str(tmp_path / "out2"), "--tokenizer", lower, "--no-progress",
                     "--max-document-chars", "1000", "--domain", f"long={src}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{src}: the document at line 2 ({len(long_text):,} characters) cannot be tokenized in pieces" in err
    assert "its normalizer is Lowercase" in err and "over --max-document-chars 1,000" in err
    assert cli_main(["prepare", "--out", str(tmp_path / "out2"), "--tokenizer", lower, "--no-progress",
                     "--max-document-chars", "20000", "--domain", f"long={src}"]) == 0
