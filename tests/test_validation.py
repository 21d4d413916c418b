"""Sizes and ranges are validated up front: every nonsense value ends in one line
`mixlm train: config error: ...` and exit 2, before anything is compiled or written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import xla_flags

from mixlm.cli import main
from mixlm.config import load_config, validate_for_mesh
from mixlm.errors import ConfigError
from mixlm.train import train

TINY = {
    "model": {"family": "llama", "num_layers": 1, "d_model": 32, "num_heads": 4, "mlp_dim": 64,
              "vocab_size": 200, "max_seq_len": 16, "vocab_multiple": 8},
    "data": {"seq_len": 16},
    "train": {"steps": 2, "global_batch_size": 8},
    "eval": {"batches": 0},
    "logging": {"progress": False, "tensorboard": False, "peak_flops": 1e9},
}

# (override, what the message must say)
BAD_VALUES = [
    ("train.steps=-5", r"train.steps=-5 is out of range: must be in \[1, 2147483647\] \(the number of optimizer"),
    ("train.steps=0", r"train.steps=0 is out of range"),
    ("optimizer.lr=-0.01", r"optimizer.lr=-0.01 is out of range: must be >= 0 \(a negative learning rate"),
    ("optimizer.lr=.nan", r"optimizer.lr=nan is out of range"),
    ("data.seq_len=0", r"data.seq_len=0 is out of range: must be in \[1, 2147483647\]"),
    ("data.seq_len=32", r"data.seq_len=32 is longer than model.max_seq_len=16; lower data.seq_len or raise"),
    ("train.global_batch_size=0", r"train.global_batch_size=0 is out of range: must be in \[1, 2147483647\]"),
    ("train.grad_accum_steps=0", r"train.grad_accum_steps=0 is out of range"),
    ("train.grad_accum_steps=3", r"train.grad_accum_steps=3 does not divide train.global_batch_size=8"),
    ("eval.batches=-1", r"eval.batches=-1 is out of range: must be >= 0"),
    ("eval.every=-2", r"eval.every=-2 is out of range"),
    ("eval.limit=-1", r"eval.limit=-1 is out of range"),
    ("schedule.warmup_steps=-1", r"schedule.warmup_steps=-1 is out of range"),
    ("schedule.warmup_fraction=1.5", r"schedule.warmup_fraction=1.5 is out of range: must be in \[0, 1\]"),
    ("schedule.min_lr=1.0", r"schedule.min_lr=1 is above optimizer.lr"),
    ("optimizer.weight_decay=-0.1", r"optimizer.weight_decay=-0.1 is out of range"),
    ("optimizer.clip_norm=-1", r"optimizer.clip_norm=-1.0 is out of range"),
    ("optimizer.b1=1.0", r"optimizer.b1=1.0 is out of range: must be in \[0, 1\)"),
    ("optimizer.b2=-0.5", r"optimizer.b2=-0.5 is out of range"),
    ("optimizer.eps=0", r"optimizer.eps=0.0 is out of range: must be > 0"),
    ("logging.every=0", r"logging.every=0 is out of range: must be >= 1"),
    ("checkpoint.every=-1", r"checkpoint.every=-1 is out of range"),
    ("checkpoint.keep_last=-1", r"checkpoint.keep_last=-1 is out of range"),
    ("data.max_epochs=-1", r"data.max_epochs=-1.0 is out of range"),
    ("data.packing=zigzag", r"data.packing='zigzag' is not known"),
    ("data.source=web", r"data.source='web' is not known"),
    ("mesh.data=0", r"mesh.data=0 is out of range: must be >= 1 or -1"),
    ("mesh.data=-1", r"mesh: at most one axis may be -1"),
    ("model.num_heads=0", r"model.num_heads=0 is out of range"),
    ("model.max_seq_len=0", r"model.max_seq_len=0 is out of range"),
]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_one_line_config_error(config_file, tmp_path, capsys, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, [override])
    out_dir = tmp_path / "run"
    assert main(["train", str(config_file), override, f"train.output_dir={out_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixlm train: config error: ") and err.count("\n") == 1
    assert f"override {override!r}" in err  # where the value came from
    assert not out_dir.exists()


def test_values_in_range_load(config_file):
    cfg = load_config(config_file, ["optimizer.lr=0", "eval.batches=0", "checkpoint.keep_last=0", "mesh.tensor=-1",
                                    "mesh.fsdp=1", "train.grad_accum_steps=4", "data.seq_len=16"])
    assert cfg.optimizer.lr == 0.0 and cfg.train.grad_accum_steps == 4


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "neg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "optimizer": {"lr": -1e-3}}))
    with pytest.raises(ConfigError, match=r"neg.yaml: optimizer.lr=-0.001 is out of range"):
        load_config(path)


def test_mesh_rules_with_plain_ints():
    cfg = load_config(None, ["train.global_batch_size=12", "train.grad_accum_steps=2"])
    validate_for_mesh(cfg, data_parallel=4, process_count=2)  # 12 rows: 3 per device, 6 per host, 3 per micro-batch
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by the data-parallel size 8.*e\.g\. 16"):
        validate_for_mesh(cfg, data_parallel=8, process_count=1)
    with pytest.raises(ConfigError, match=r"grad_accum_steps=2 does not divide the per-host batch 3"):
        validate_for_mesh(cfg, data_parallel=4, process_count=4)
    with pytest.raises(ConfigError, match=r"not divisible by the 8 processes"):
        validate_for_mesh(load_config(None, ["train.global_batch_size=4"]), data_parallel=4, process_count=8)
    with pytest.raises(ConfigError, match=r"train.steps=0"):  # the pure rules too: train() may get any config
        validate_for_mesh(load_config(None).replace(train=cfg.train.__class__(steps=0)), 1, 1)


def test_batch_indivisible_by_the_mesh_fails_before_anything_is_built(config_file, tmp_path, monkeypatch):
    import mixlm.train as train_mod

    def never(*a, **k):
        raise AssertionError("build_setup ran")

    monkeypatch.setattr(train_mod, "build_setup", never)
    cfg = load_config(config_file, ["train.global_batch_size=7", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"global_batch_size=7 is not divisible by the data-parallel size 8"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def _cli(config_file, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    return subprocess.run([sys.executable, "-m", "mixlm.cli", "train", str(config_file), *overrides],
                          check=False, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("override", ["train.global_batch_size=7", "optimizer.lr=-0.01"])
def test_cli_subprocess_exits_2_with_one_line_and_writes_nothing(config_file, tmp_path, override):
    out_dir = tmp_path / "run"
    proc = _cli(config_file, override, f"train.output_dir={out_dir}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixlm train: config error: "), proc.stderr
    assert override.split("=")[0] in lines[0]
    assert "mixlm train: llama" not in proc.stdout  # the run banner: nothing was set up
    assert not out_dir.exists()
