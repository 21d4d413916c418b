"""A new user's rough edges (issue 14): the CPU proxy recipe on any prepared folder, the one-device mesh
error, progress and summaries, help defaults, key synonyms, what a prepare refusal names, negligible mixture
weights, plurals, whole bad-line details, the repetition warning's one line, the release card preview."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import yaml

from mixlm.cli import main
from mixlm.config import MeshConfig, load_config, load_config_and_origin
from mixlm.errors import ConfigError
from mixlm.run_config import load_run_config
from mixlm.sharding import resolve_mesh_shape

REPO = Path(__file__).resolve().parent.parent
CPU_PROXY = REPO / "configs/experiments/cpu-proxy.yaml"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """A small demo corpus prepared with a 300-token tokenizer: not the vocabulary of any model config."""
    from mixlm.data.demo_corpus import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("ux") / "demo", docs_per_domain=80, vocab_size=300)


# --- 1. the CPU proxy recipe --------------------------------------------------------------------------------
def test_cpu_proxy_takes_the_vocabulary_of_any_prepared_folder_and_trains(demo_data, tmp_path):
    overrides = [f"data.prepared_dir={demo_data['prepared']}", "data.mixture={prose: 1, code: 1}",
                 "train.steps=2", "train.global_batch_size=8", f"train.output_dir={tmp_path / 'run'}",
                 "eval.batches=1", "logging.progress=false", "logging.tensorboard=false",
                 "checkpoint.save_at_end=false"]
    assert "model.vocab_size" not in load_config_and_origin(CPU_PROXY, overrides)[1]
    assert load_config(CPU_PROXY, overrides).model.vocab_size == 256  # the file's placeholder, as written
    cfg = load_run_config(CPU_PROXY, overrides)
    vocab = json.loads((demo_data["prepared"] / "prose" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert cfg.model.vocab_size == vocab and cfg.data.tokenizer == str(demo_data["tokenizer"])
    from mixlm.cli import main

    assert main(["train", str(CPU_PROXY), *overrides]) == 0  # `mixlm train` resolves the vocabulary itself
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_loss", "val_loss/prose", "val_loss/code"} <= set(rows[-1])

    # A vocabulary set explicitly (an override, or a model file such as the demo's) is kept.
    assert "model.vocab_size" in load_config_and_origin(REPO / "configs/experiments/demo.yaml")[1]
    kept = load_run_config(CPU_PROXY, [*overrides, "model.vocab_size=512"])
    assert kept.model.vocab_size == 512


def test_gpu_proxy_config_loads_and_fills_the_mesh():
    cfg = load_config(REPO / "configs/experiments/gpu-proxy.yaml")
    assert cfg.mesh.data == 1 and cfg.mesh.fsdp == -1 and cfg.model.compute_dtype == "bfloat16"
    assert "model.vocab_size" not in load_config_and_origin(REPO / "configs/experiments/gpu-proxy.yaml")[1]


# --- 2. one device ------------------------------------------------------------------------------------------
def test_one_device_error_says_how_to_fix_it_and_the_recipes_fill_the_mesh():
    with pytest.raises(ConfigError, match=r"1 device present, not divisible by the fixed axes' product 2") as e:
        resolve_mesh_shape(MeshConfig(data=2, fsdp=-1), 1)
    assert "mesh.data=1" in str(e.value) and "XLA_FLAGS=--xla_force_host_platform_device_count=2" in str(e.value)
    for path in sorted((REPO / "configs/experiments").glob("*.yaml")):
        assert resolve_mesh_shape(load_config(path).mesh, 1) == (1, 1, 1), path.name


# --- 4. progress and summaries ------------------------------------------------------------------------------
def test_tokenizer_train_shows_a_progress_bar_and_a_summary(tmp_path, capsys):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} says hello to {i * 7}"}) + "\n" for i in range(50)))
    assert main(["tokenizer", "train", "--out", str(tmp_path / "tok"), "--vocab-size", "280",
                 "--min-frequency", "1", "--domain", f"tiny={corpus}"]) == 0
    err = capsys.readouterr().err
    assert "tokenizer train: read: 100%" in err and "50.0/50.0" in err  # a bar with a total, so an ETA
    summary = [line for line in err.splitlines() if line.startswith("tokenizer train: 50 documents")]
    assert summary and "from 1 domain," in summary[0] and "vocab 280" in summary[0] and "s -> " in summary[0]


# --- 5. help ------------------------------------------------------------------------------------------------
def test_help_shows_defaults_and_the_whole_description(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "-h"])
    text = capsys.readouterr().out
    assert "(default: 0.01)" in text and "(default: 50000000)" in text
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "-h"])  # a sub-verb too
    assert "(default: 8192)" in capsys.readouterr().out
    assert main(["-h"]) == 0
    assert "shows a verb's flags and their defaults." in capsys.readouterr().out


# --- 6. synonyms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,first", [
    ("optimizer.learning_rate=1e-3", "lr"), ("train.batch_size=8", "global_batch_size"),
    ("train.num_steps=10", "steps"), ("train.max_steps=10", "steps"), ("model.n_layer=2", "num_layers"),
    ("model.layers=2", "num_layers"), ("model.hidden_size=64", "d_model"), ("schedule.warmup=10", "warmup_steps"),
    ("optimizer.weight_decy=0.1", "weight_decay"),
])
def test_unknown_key_suggests_synonyms_first(override, first):
    with pytest.raises(ConfigError, match=rf"Closest valid keys: {first}\b"):
        load_config(None, [override])


# --- 7. prepare's refusal -----------------------------------------------------------------------------------
def test_prepare_refusal_names_the_changed_input_and_option(demo_data, tmp_path):
    from mixlm.data.prepare import PrepareOptions, prepare_domain
    from mixlm.errors import PrepareError

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i} of the domain"}) + "\n" for i in range(20)))
    opts = PrepareOptions(tokenizer=str(demo_data["tokenizer"]), progress=False)
    prepare_domain("d", [str(src)], tmp_path / "out", opts)
    with src.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(PrepareError, match="other inputs or options") as e:
        prepare_domain("d", [str(src)], tmp_path / "out", opts)
    assert f"input {src}: size " in str(e.value) and "sha256 " in str(e.value) and "--overwrite" in str(e.value)
    src.write_text(src.read_text().rsplit("\n", 2)[0] + "\n")  # back to the prepared content
    with pytest.raises(PrepareError, match=r"option seed: 0 -> 3"):
        prepare_domain("d", [str(src)], tmp_path / "out", dataclasses.replace(opts, seed=3))


# --- 9. weights, plurals, bad lines, the repetition warning, the release preview ------------------------------
def test_negligible_mixture_weights_are_written_as_zero(tmp_path):
    from mixlm.mixing.tables import clean_weights, write_mixture_yaml

    cleaned = clean_weights({"a": 0.6, "b": 1.456e-37, "c": 0.4 - 1.456e-37})
    assert cleaned["b"] == 0.0 and abs(sum(cleaned.values()) - 1) < 1e-12 and list(cleaned) == ["a", "b", "c"]
    assert clean_weights({"a": 0.25, "b": 0.75}) == {"a": 0.25, "b": 0.75}
    write_mixture_yaml(tmp_path / "m.yaml", {"a": 0.5, "b": 3e-9, "c": 0.5})
    assert yaml.safe_load((tmp_path / "m.yaml").read_text()) == {"a": 0.5, "c": 0.5}


def test_select_signals_says_one_document_and_shows_whole_bad_lines(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "a perfectly fine document of words"}) + "\n" + '{"text": "broken\n')
    assert main(["select", "signals", str(docs), "--out", str(tmp_path / "sig"), "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    assert "1 document in 1 shard →" in captured.out
    assert "skipped 1 bad line (1 invalid json)" in captured.err
    assert f"{docs}:2: invalid json: Invalid control character at: line 1 column" in captured.err


def test_repetition_warning_is_one_line_without_source():
    from mixlm.data.pipeline import RepetitionWarning, _warn_repetition

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_repetition("domain 'x' starts repeating (epoch 2) at step 9")
    (w,) = caught
    assert issubclass(w.category, RepetitionWarning)
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    assert shown.count("\n") == 1 and "starts repeating" in shown


def test_release_dry_run_writes_a_card_preview_beside_the_folder(demo_data, tmp_path, capsys):
    from flax import nnx

    from mixlm.config import DataConfig, ExperimentConfig, ModelConfig
    from mixlm.hf.export import export_hf
    from mixlm.hf.param_readers import MemoryReader
    from mixlm.models import build_model, split_params

    cfg = ExperimentConfig(model=ModelConfig(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, vocab_size=300),
                           data=DataConfig(seq_len=16, tokenizer=str(demo_data["tokenizer"]), mixture={"a": 1.0}))
    _, params = split_params(build_model(cfg.model, rngs=nnx.Rngs(0)))
    folder = tmp_path / "model"
    export_hf(MemoryReader(cfg, params, step=1, meta={}), folder)
    card = (folder / "README.md").read_text()
    assert main(["release", str(folder), "--repo-id", "org/model", "--dry-run", "--name", "renamed"]) == 0
    preview = tmp_path / "model.README.preview.md"
    assert str(preview) in capsys.readouterr().out and "renamed" in preview.read_text()
    assert (folder / "README.md").read_text() == card and not (folder / "README.preview.md").exists()
    assert main(["release", str(folder), "--repo-id", "org/model", "--dry-run", "--preview", "-"]) == 0
    assert "library_name: transformers" in capsys.readouterr().out  # the card itself, printed


# --- issue 24: overrides anywhere on the command line; params resolves the vocabulary as train does ------------
TINY = {"model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 4, "mlp_dim": 64, "vocab_size": 200,
                  "max_seq_len": 16, "vocab_multiple": 8},
        "data": {"seq_len": 16}, "train": {"steps": 2, "global_batch_size": 8}}


@pytest.mark.parametrize("verb,flags", [
    ("train", [["--allow-config-change"], ["--num-processes", "0"]]),
    ("sweep", [["--mixtures", "MIXTURES"], ["--out", "OUT"], ["--limit", "1"]]),
    ("plan", [["--devices", "8"], ["--analytic-only"]]),
    ("params", [["--seq-len", "16"], ["--vocab-multiple-of", "8"]]),
])
def test_overrides_are_taken_before_between_and_after_flags(verb, flags, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    (tmp_path / "mix.csv").write_text("index,a,b\n1,0.5,0.5\n")
    named = {"MIXTURES": str(tmp_path / "mix.csv"), "OUT": str(tmp_path / "sweep")}
    first, *rest = [[named.get(f, f) for f in group] for group in flags]
    rest = [f for group in rest for f in group]
    bad = "model.num_heads=0"  # refused by load_config, so it shows the override reached the config
    for argv in ([*first, *rest, "train.steps=3", bad], [bad, *first, *rest], [*first, bad, *rest]):
        assert main([verb, str(config), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "config error: " in err and f"override '{bad}': model.num_heads=0 is out of range" in err, (argv, err)
        assert "unrecognized arguments" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # an unknown flag is still an error
        main([verb, str(config), *first, *rest, "--no-such-flag", "train.steps=3"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_params_takes_overrides_and_the_vocabulary_of_the_prepared_data(demo_data, capsys):
    vocab = json.loads((demo_data["prepared"] / "prose" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert main(["params", str(CPU_PROXY), "--vocab-multiple-of", "8", f"data.prepared_dir={demo_data['prepared']}",
                 "model.num_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "(llama, 3 layers, d_model 128)" in out
    assert f"vocab           {vocab:,} -> " in out and "from the tokenizer of the prepared data in" in out
    assert main(["params", str(CPU_PROXY)]) == 0  # no prepared folder reachable: the placeholder, said plainly
    out = capsys.readouterr().out
    assert "vocab           256 -> 256 padded rows (the config's placeholder: train takes it from the prepared " \
           "data's tokenizer, but data.prepared_dir is not set" in out
    assert main(["params", str(CPU_PROXY), "model.vocab_size=1000"]) == 0
    assert "1,000 -> 1,024 padded rows (set by the config)" in capsys.readouterr().out
    models = REPO / "configs/models/gpt2-70m.yaml"
    assert main(["params", str(models), "--seq-len", "64", "model.num_layers=2"]) == 0
    assert "(gpt2, 2 layers, d_model 512)" in capsys.readouterr().out
    assert main(["params", str(models), "train.steps=3"]) == 2
    assert "is a model YAML, which takes model.* overrides only" in capsys.readouterr().err
