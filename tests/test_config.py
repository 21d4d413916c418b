"""Config files compose, overrides are type-checked, mistakes name the file, the key and close keys."""

import pytest

from mixlm.config import config_diff, config_from_dict, load_config, save_config
from mixlm.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def exp(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "mixtures").mkdir()
    write(tmp_path / "models" / "m.yaml", "family: llama\nnum_layers: 3\nd_model: 32\nnum_heads: 4\nvocab_size: 100\n")
    write(tmp_path / "mixtures" / "mix.yaml", "a: 0.5\nb: 0.5\n")
    write(tmp_path / "recipe.yaml", "optimizer:\n  lr: 1e-3\n  weight_decay: 0.05\nschedule:\n  kind: cosine\n  warmup_steps: 5\n")
    return write(
        tmp_path / "exp.yaml",
        "base: recipe.yaml\nmodel: models/m.yaml\ndata:\n  mixture: mixtures/mix.yaml\n  seq_len: 16\n"
        "optimizer:\n  lr: 2e-3\ntrain:\n  steps: 7\n",
    )


def test_composition_and_precedence(exp):
    cfg = load_config(exp)
    assert cfg.model.num_layers == 3 and cfg.model.d_model == 32
    assert cfg.data.mixture == {"a": 0.5, "b": 0.5}
    assert cfg.optimizer.lr == 2e-3  # the experiment wins over its base recipe
    assert cfg.optimizer.weight_decay == 0.05  # ...which still supplies the rest
    assert cfg.schedule.warmup_steps == 5 and cfg.train.steps == 7


def test_overrides_are_typed(exp):
    cfg = load_config(exp, ["optimizer.lr=5e-4", "train.steps=3", "model.tie_embeddings=true", "mesh.fsdp=-1"])
    assert cfg.optimizer.lr == 5e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 3 and cfg.model.tie_embeddings is True
    assert load_config(exp, ["optimizer.lr=1"]).optimizer.lr == 1.0  # ints widen to floats
    with pytest.raises(ConfigError, match=r"override 'train.steps=abc'.*train.steps: expected int"):
        load_config(exp, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(exp, ["train.steps"])


def test_unknown_key_names_file_key_and_closest(exp, tmp_path):
    bad = write(tmp_path / "bad.yaml", "base: exp.yaml\noptimizer:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "bad.yaml" in msg and "optimizer.lrr" in msg and "Closest valid keys: lr" in msg
    with pytest.raises(ConfigError, match=r"unknown section 'optimiser'.*optimizer"):
        load_config(write(tmp_path / "bad2.yaml", "optimiser:\n  lr: 1.0\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'warmup'.*warmup_steps"):
        load_config(exp, ["schedule.warmup=3"])


def test_bad_value_names_the_file(exp, tmp_path):
    with pytest.raises(ConfigError, match=r"schedule.kind must be"):
        load_config(exp, ["schedule.kind=cosinus"])
    write(tmp_path / "models" / "m.yaml", "d_model: 3.5\n")
    with pytest.raises(ConfigError, match=r"models/m.yaml: model.d_model: expected int"):
        load_config(exp)


def test_no_side_effects_and_round_trip(exp, tmp_path):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cfg = load_config(exp, ["train.output_dir=" + str(tmp_path / "run")])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # loading created nothing
    save_config(cfg, tmp_path / "saved.yaml")
    import yaml

    restored = config_from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text()))
    assert restored == cfg
    assert config_diff(cfg, restored) == []  # the saved file holds every setting...
    defaults = load_config(None)
    changed = config_diff(defaults, restored)  # ...including those that differ from the defaults
    for key in ("model.num_layers", "model.d_model", "model.vocab_size", "optimizer.lr", "optimizer.weight_decay",
                "schedule.warmup_steps", "data.seq_len", "data.mixture", "train.steps", "train.output_dir"):
        assert key in changed, key
    assert "model.family" not in changed and "optimizer.b1" not in changed
    assert config_diff(cfg, load_config(exp, ["train.steps=9"])) == ["train.output_dir", "train.steps"]
