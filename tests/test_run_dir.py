"""The io layer (mixlm.storage) and the run folder (mixlm.run_dir) on a local disk; the object-store forms are
tested against emulators in tests/test_object_store.py."""

import json
import os

import pytest

from mixlm import storage
from mixlm.errors import ConfigError
from mixlm.run_dir import RunDir, parse_metrics


def test_schemes_and_locations():
    assert storage.scheme("gs://b/run") == "gs" and storage.is_remote("gs://b/run")
    assert storage.scheme("s3://b/run") == "s3" and storage.is_remote("S3://b/run")
    assert storage.scheme("runs/a") == "" and not storage.is_remote("/tmp/x")
    assert storage.scheme("file:///tmp/x") == "" and str(storage.location("file:///tmp/x")) == "/tmp/x"
    for ok in ("runs/a", "/abs", "gs://bucket/run", "s3://bucket", "file:///tmp/x", "name:with-colon"):
        storage.check_location(ok, "train.output_dir")
    for bad, says in (("hdfs://nn/run", "hdfs:// is not supported"), ("gs:/bucket/run", "gs://BUCKET/PATH"),
                      ("s3:bucket", "s3://BUCKET/PATH"), ("gs://", "gs://BUCKET/PATH")):
        with pytest.raises(ConfigError, match=says):
            storage.check_location(bad, "train.output_dir")


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "doc.json"
    storage.write_json(target, {"a": 1})
    storage.write_atomic(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["doc.json"]
    with pytest.raises(ConfigError, match="local files only"):
        storage.local_file("gs://b/x", "data.prepared_dir")


def test_metrics_parser_skips_a_torn_tail_and_counts_bad_lines():
    text = '{"step": 1, "loss": 2.0}\nnot json\n{"no_step": 1}\n{"step": 2, "val_loss": 1.5}\n{"step": 3, "lo'
    parsed = parse_metrics(text)
    assert [r["step"] for r in parsed.rows] == [1, 2]
    assert parsed.bad_lines == 2 and parsed.torn_tail


def test_run_dir_result_final_eval_and_trim(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.result() is None and run.metrics() == [] and run.final_eval() is None
    run.path.mkdir()
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "val_loss": 2.4, "val_loss/a": 2.3},
            {"step": 3, "loss": 2.0}]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert run.final_eval() == {"val_loss": 2.4, "val_loss/a": 2.3}
    assert run.final_eval(step=3) is None
    run.trim_metrics(2)
    assert [r["step"] for r in run.metrics()] == [1, 2, 2]
    assert run.metrics_file.read_text().endswith("\n")
    doc = run.write_result(step=2, eval={"val_loss": 2.4}, tokens_seen={"a": 10})
    assert run.result() == doc and run.is_done() and doc["status"] == "finished"
    run.result_file.write_text('{"version": 1, "sta')  # torn by some other writer: not a result
    assert run.result() is None
