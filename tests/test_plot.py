"""`mixlm plot` (mixlm.training_curves) on hand-written metrics of two runs, and the metrics sinks: the optional
Weights & Biases sink in offline mode (and its one-line error when wandb is missing)."""

import builtins
import json

import pytest
import yaml

from mixlm.cli import main as cli_main
from mixlm.config import ConfigError
from mixlm.metrics import MetricsLog
from mixlm.training_curves import mixture_schedule, plot_runs, read_metrics, val_domains

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, *, scale: float, mixture: dict):
    folder.mkdir(parents=True)
    rows = []
    for step in range(10, 101, 10):
        rows.append({"step": step, "loss": scale * 5.0 / step ** 0.3, "tokens_step": 512.0,
                     "tokens_total": 512.0 * step, "lr": 1e-3})
        if step % 50 == 0:
            rows.append({"step": step, "val_loss/code": scale * 4.0 / step ** 0.2,
                         "val_loss/prose": scale * 4.5 / step ** 0.2, "val_loss": scale * 4.2 / step ** 0.2})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"mixture": mixture}}))


def test_plot_two_runs_writes_pngs(tmp_path, capsys):
    _write_run(tmp_path / "a", scale=1.0, mixture={"code": 0.5, "prose": 0.5})
    _write_run(tmp_path / "b", scale=0.9, mixture={"weights": {"code": 0.2, "prose": 0.8},
                                                    "stages": [{"step": 50, "weights": {"code": 0.7, "prose": 0.3}}]})
    rows = read_metrics(tmp_path / "a")
    assert len(rows) == 12 and val_domains(rows) == ["code", "prose"]
    assert [s for s, _ in mixture_schedule(tmp_path / "b")] == [0, 50]
    assert mixture_schedule(tmp_path / "b")[1][1]["code"] == pytest.approx(0.7)

    out = tmp_path / "plots"
    assert cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    for name in ("train_loss.png", "val_loss.png", "mixture.png"):  # run b's mixture changes at step 50
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000, name
    assert "wrote" in capsys.readouterr().err

    # a run whose mixture never changes: no mixture plot
    written = plot_runs([tmp_path / "a"], tmp_path / "only_a")
    assert sorted(p.name for p in written) == ["train_loss.png", "val_loss.png"]


def test_plot_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0]


def test_wandb_sink_offline_writes_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from mixlm.config import load_config
    from mixlm.train import train

    cfg = load_config(None, ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64",
                             "model.max_seq_len=16", "data.seq_len=16", "train.global_batch_size=8",
                             "train.steps=2", "eval.batches=1", "logging.every=1", "logging.progress=false",
                             "logging.tensorboard=false", "logging.wandb=true", "logging.wandb_project=mixlm-test",
                             f"train.output_dir={tmp_path}"])
    train(cfg, log_fn=lambda _: None)  # the run's own config switches the sink on
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = [p for p in runs[0].rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in files), files
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3  # 2 steps + the final eval


def test_wandb_enabled_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"logging.wandb=true needs the wandb package"):
        MetricsLog(tmp_path, total_steps=1, start_step=0, jsonl=False, tensorboard=False, progress=False, wandb=True)
