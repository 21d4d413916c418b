"""A study file is checked before anything runs: a bad key, value or combination is one line naming the file and
the dotted key, exit 2, nothing written. The shipped studies load, and stage keys follow their inputs only."""

from pathlib import Path

import pytest
import yaml

from mixlm.cli import main
from mixlm.study import Study, load_study, walk
from mixlm.study.graph import Stage

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "name": "s",
    "out": "runs/s",
    "data": {"demo": {"docs_per_domain": 50}, "target": ["office"]},
    "search": {"mixtures": 8, "scales": [{"name": "small", "config": "proxy.yaml"}], "fit": {"folds": 4}},
    "validation": {"config": "proxy.yaml"},
}


def write(folder: Path, tree: dict) -> Path:
    (folder / "proxy.yaml").write_text(yaml.safe_dump({"model": {"family": "llama"}, "train": {"steps": 5}}))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def with_(change: dict, base: dict = GOOD) -> dict:
    out = yaml.safe_load(yaml.safe_dump(base))
    for dotted, value in change.items():
        node, *parts = out, *dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return out


@pytest.mark.parametrize("change, message", [
    ({"serch": {}}, "study.yaml.serch: unknown key. Closest valid keys: search"),
    ({"search.mixtures": "many"}, "study.yaml.search.mixtures: expected an integer, got 'many'"),
    ({"search.scales": [{"config": "proxy.yaml"}]}, "study.yaml.search.scales[0].name: missing"),
    ({"search.scales": [{"name": "Small!", "config": "proxy.yaml"}]}, "search.scales[0].name='Small!': use lowercase"),
    ({"search.fit.regressors": ["xgboost"]}, "search.fit.regressors ['xgboost']: known are"),
    ({"search.mixtures": 6}, "search.mixtures=6 cannot be split into search.fit.folds=4 folds"),
    ({"data.target": []}, "data.target is empty"),
    ({"data.prepared_dir": "data/x"}, "data: give exactly one of prepared_dir"),
    ({"data.target": ["nowhere"]}, "data: ['nowhere'] are not demo-corpus domains"),
    ({"validation.seeds": [1, 1]}, "validation.seeds [1, 1]: give one or more distinct seeds"),
    ({"validation.baselines": ["natural", "human"]}, "validation.baselines[1] (human): not natural or uniform"),
    ({"validation.baselines": [{"name": "doremi", "online": "doremi"}]}, "online: doremi"),
    ({"validation": None}, "prior.token_budget is 'target' but the study has no validation run"),
    ({"search.scales": [{"name": "small", "config": "proxy.yaml", "overrides": ["train.stepz=3"]}]},
     "search.scales[0]: override 'train.stepz=3'"),
    ({"engine.kind": "spark"}, "engine.kind='spark': use local or ray"),
    ({"cost.compile_for": "b200-{devices}"}, "cost.compile_for='b200-{devices}' on 1 device(s): --compile-for"),
    ({"out": "gs://bucket/study"}, "out='gs://bucket/study': a study folder must be local for now"),
    ({"out": "hdfs://host/study"}, "the scheme hdfs:// is not supported"),
    ({"selection": {"domains": {"prose": {"keep": [1.0], "weights": {"a": 1}}}}}, "selection.domains.prose.keep"),
])
def test_a_bad_study_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, change, message):
    path = write(tmp_path, with_(change))
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(path)]) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixlm study: config error: "), printed.err
    assert message in lines[0]
    assert not (tmp_path / "runs").exists() and not printed.out


def test_a_bucket_study_folder_is_refused_in_one_line(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["study", "run", str(path), "--out", "s3://bucket/study"]) == 2
    printed = capsys.readouterr()
    assert printed.err.strip() == ("mixlm study: config error: --out='s3://bucket/study': a study folder must be "
                                   "local for now (mix sample, fit and optimize write local files); give a local "
                                   "folder, e.g. runs/my-study")


def test_overrides_on_the_command_line(tmp_path):
    path = write(tmp_path, GOOD)
    spec = load_study(path, ["validation.seeds=[0,1,2]", "search.fit.folds=2"])
    assert spec.validation.seeds == [0, 1, 2] and spec.search.fit.folds == 2
    assert spec.validation.baselines[0].name == "natural"  # `[natural, uniform]` by default
    with pytest.raises(Exception, match=r"override 'validation\.seeds': expected dotted.key=value"):
        load_study(path, ["validation.seeds"])


def test_stage_keys_follow_inputs_only(tmp_path):
    a = Stage("fit-r0", "fit", {"folds": 5})
    b = Stage("fit-r0", "fit", {"folds": 5})
    assert a.key == b.key and a.dirname == b.dirname and a.dirname.startswith("fit-r0-")
    assert Stage("fit-r0", "fit", {"folds": 4}).key != a.key
    up = Stage("sample-r0", "sample", {"n": 8})
    assert Stage("x", "fit", {}, deps=(up,)).key != Stage("x", "fit", {}, deps=(Stage("sample-r0", "sample", {"n": 9}),)).key
    # every stage of a walk is keyed by settings and upstream keys, not by where the study lives
    path = write(tmp_path, GOOD)
    here = walk(Study(load_study(path), out=str(tmp_path / "a"), mode="plan"))
    there = walk(Study(load_study(path), out=str(tmp_path / "b" / "c"), mode="plan"))
    assert [s.dirname for s in here.planned] == [s.dirname for s in there.planned]
    # a changed validation seed list changes only validation stages and the report
    more = walk(Study(load_study(path, ["validation.seeds=[0,1]"]), out=str(tmp_path / "a"), mode="plan"))
    changed = {s.name for s in more.planned} - {s.name for s in here.planned}
    changed |= {s.name for s in more.planned if s.name in {t.name for t in here.planned}
                and s.key != here.stage_of(s.name).key}
    assert changed == {"validate-proposed-seed1", "validate-natural-seed1", "validate-uniform-seed1", "report"}


@pytest.mark.parametrize("name", ["demo.yaml", "regmix-pile.yaml"])
def test_the_shipped_studies_load(name):
    spec = load_study(REPO / "configs" / "studies" / name)
    assert spec.validation is not None and len(spec.search.scales) >= 2
