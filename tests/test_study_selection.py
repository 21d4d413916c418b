"""Selection knobs searched with the mixture: a domain's top fraction by a rater weighting becomes a domain
variant (`select pick`, then `prepare`) that the sampler, the fit and the proposal treat as a domain; the
variant is prepared once, in a stage keyed by its signals, weighting and fraction, and a study that changes
its search reuses it. Each stage also runs alone (`--stage`, a cluster job), a sweep as shards (`--shard I/N`)."""

import gzip
import io
import json
import re

import yaml
import zstandard
from tiny_study import PROXY, stage_folder

from mixlm.cli import main
from mixlm.study import Study, load_study, walk

KNOB_STUDY = {
    "name": "knob",
    "out": "unused",
    "data": {"demo": {"docs_per_domain": 150, "vocab_size": 320, "targets": ["office"]}, "target": ["office"]},
    "prior": {"max_epochs": 50, "token_budget": "data"},
    "selection": {"domains": {"records": {"weights": {"num_lines": {"weight": 1, "higher_is_better": True}},
                                          "keep": [0.5]}}},
    "search": {"mixtures": 8, "scales": [{"name": "small", "config": "proxy.yaml", "swarm": 4}],
               "fit": {"regressors": ["linear", "loglinear"], "folds": 4},
               "propose": {"samples": 2000, "top_k": 16}},
    "report": {"bootstrap": 100},
}


def _lines(path) -> list[str]:
    raw = path.read_bytes()
    if path.suffix == ".zst":
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    elif path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode().splitlines()


def test_a_selection_knob_is_a_domain_variant_prepared_once_and_stages_run_as_jobs(tmp_path, capsys):
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(PROXY))
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(KNOB_STUDY))
    out = tmp_path / "out"
    run = ["study", "run", str(spec), "--out", str(out)]
    # each stage as a job of its own; the sweep as two shards (one swarm each), then once to record it
    for name in ("data", "score-records", "select-records_top50", "prepared", "sample-r0"):
        assert main([*run, "--stage", name]) == 0
    assert main([*run, "--stage", "fit-r0"]) == 2  # its inputs are not done: one line, exit 2
    for trained_runs, shard in ((4, "0/2"), (8, "1/2")):
        assert main([*run, "--stage", "sweep-small-r0", "--shard", shard]) == 0
        sweep = stage_folder(out, "sweep-small-r0")
        assert not (sweep / "results.csv").exists() and not (sweep / "stage.json").exists()
        # status counts a sweep's runs by their result.json (a shard writes no results.csv)
        capsys.readouterr()
        assert main(["study", "status", str(spec), "--out", str(out)]) == 0
        assert re.search(rf"sweep-small-r0 +started +stages/\S+  runs {trained_runs}/8\n", capsys.readouterr().out)
    trained = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("runs/*/metrics.jsonl")}
    assert len(trained) == 8
    first = walk(Study(load_study(spec), out=str(out), log=lambda _: None))
    assert first.ran == ["sweep-small-r0", "fit-r0", "propose-r0", "report"]
    assert {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("runs/*/metrics.jsonl")} == trained
    # the variant holds the half of records with the most lines, prepared as a domain of its own
    raw = [json.loads(line)["text"] for line in _lines(stage_folder(out, "data") / "data" / "raw" / "records.jsonl")]
    selected = [json.loads(line)["text"] for line in
                _lines(stage_folder(out, "select-records_top50") / "selection" / "documents.jsonl.zst")]
    assert len(selected) == len(raw) // 2
    kept_lines = sorted(t.count("\n") + 1 for t in selected)
    dropped = sorted(t.count("\n") + 1 for t in raw if t not in selected)
    assert kept_lines[0] >= dropped[-1]  # the cut is on line counts (ties may fall either side)
    manifest = json.loads((stage_folder(out, "prepared") / "prepared" / "records_top50" / "manifest.json").read_text())
    assert manifest["documents"]["train"] + manifest["documents"]["validation"] == len(selected)
    # the search mixes the variant beside the whole domains
    header = (stage_folder(out, "sample-r0") / "mixtures.csv").read_text().splitlines()[0].split(",")
    assert header == ["index", "arithmetic", "code", "prose", "records", "records_top50"]
    assert "metric/records_top50_val_loss" in (sweep / "results.csv").read_text().splitlines()[0]
    report = (out / "report" / "report.md").read_text()
    assert "## Selection knobs" in report and "records_top50" in report
    # another search over the same data reuses the selection and its prepared variant
    again = walk(Study(load_study(spec, ["search.seed=1"]), out=str(out), log=lambda _: None))
    assert again.ran == ["sample-r0", "sweep-small-r0", "fit-r0", "propose-r0", "report"]
