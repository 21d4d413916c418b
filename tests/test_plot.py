"""`mixlm plot` (mixlm.training_curves) on hand-written metrics of two runs, and the metrics sinks: the optional
Weights & Biases sink in offline mode (and its one-line error when wandb is missing)."""

import builtins
import json

import pytest
import yaml

from mixlm.cli import main as cli_main
from mixlm.errors import ConfigError
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

    # a run whose mixture never changes still has its mixture drawn (one stage)
    written = plot_runs([tmp_path / "a"], tmp_path / "only_a")
    assert sorted(p.name for p in written) == ["mixture.png", "train_loss.png", "val_loss.png"]


def _write_sweep_run(folder, index: int, rng) -> dict:
    """A proxy of a sweep: train loss every 10 steps, one eval (the final one) and a fixed mixture."""
    folder.mkdir(parents=True)
    weights = dict(zip(("code", "prose", "web"), (float(w) for w in rng.dirichlet([1.0, 1.0, 1.0]))))
    rows = [{"step": step, "loss": 5.0 - 0.01 * step - 0.05 * index} for step in range(10, 101, 10)]
    final = {"val_loss/code": 4.0 - 0.03 * index, "val_loss/prose": 4.4 + 0.01 * index, "val_loss": 4.2}
    rows.append({"step": 100, **final})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"mixture": weights}}))
    return {"weights": weights, **final}


def test_a_sweeps_runs_plot_readably(tmp_path):
    """16 proxies of a sweep (one final eval each, fixed mixtures): 16 distinct line styles with the legend
    outside the axes, a dot per run of its final validation losses, and mixture.png with each run's mixture
    as a stacked bar (the shares of one bar add up to 1)."""
    import numpy as np
    from matplotlib.colors import to_rgba

    from mixlm.training_curves import load_runs, mixture_figure, train_loss_figure, val_loss_figure

    rng = np.random.default_rng(0)
    truth = {f"{i:04d}": _write_sweep_run(tmp_path / "runs" / f"{i:04d}", i, rng) for i in range(1, 17)}
    runs = load_runs(sorted((tmp_path / "runs").iterdir()))

    fig = train_loss_figure(runs)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == list(truth)
    styles = {(to_rgba(line.get_color()), line.get_linestyle()) for line in lines}
    assert len(styles) == 16  # no two runs look alike
    assert ax.get_legend() is None and len(fig.legends) == 1  # the legend is the figure's, outside the axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(truth)
    fig.canvas.draw()
    assert fig.legends[0].get_window_extent().x0 >= ax.get_window_extent().x1  # right of the axes, not on them

    fig = val_loss_figure(runs)
    panels = {a.get_title(): a for a in fig.axes}
    assert set(panels) == {"val_loss/code (final, step 100)", "val_loss/prose (final, step 100)",
                           "val_loss (total) (final, step 100)"}
    code = panels["val_loss/code (final, step 100)"]
    (dots,) = code.collections
    np.testing.assert_allclose(dots.get_offsets()[:, 0], [t["val_loss/code"] for t in truth.values()])
    assert [t.get_text() for t in code.get_yticklabels()] == list(truth)

    fig = mixture_figure(runs, {name: [(0, t["weights"])] for name, t in truth.items()})
    (ax,) = fig.axes
    widths = np.zeros(16)
    for bar in ax.patches:
        widths[round(bar.get_y() + bar.get_height() / 2)] += bar.get_width()
    np.testing.assert_allclose(widths, 1.0, atol=1e-9)
    prose = [bar.get_width() for bar in ax.containers[1]]  # the second domain's segment of every run
    np.testing.assert_allclose(prose, [t["weights"]["prose"] for t in truth.values()])

    out = tmp_path / "plots"
    assert cli_main(["plot", *(str(p) for p in sorted((tmp_path / "runs").iterdir())), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mixture.png", "train_loss.png", "val_loss.png"]


def test_plot_says_why_a_figure_is_not_written(tmp_path, capsys):
    run = tmp_path / "synthetic"  # a run on synthetic data: no data.mixture, and no eval rows
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "mixlm plot: mixture.png not written: no run has a data.mixture in its config.yaml" in err
    assert "mixlm plot: val_loss.png not written: no run has validation losses" in err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["train_loss.png"]


def test_the_fits_loss_vs_weight_plot_shows_the_search_target(tmp_path):
    """Each domain's panel has its own loss and the target's loss against that domain's weight."""
    import numpy as np

    from mixlm.mixing.plots import loss_vs_weight_figure, plot_loss_vs_weight

    rng = np.random.default_rng(0)
    weights_NxD = rng.dirichlet([1.0, 1.0], size=12)
    own = {"code": 4.0 - weights_NxD[:, 0], "prose": 4.5 - weights_NxD[:, 1]}
    target_N = 5.0 - 0.5 * weights_NxD[:, 1]
    fig = loss_vs_weight_figure(weights_NxD, ["code", "prose"], own, ("metric/office_val_loss", target_N))
    for ax, domain in zip(fig.axes, ["code", "prose"]):
        assert ax.get_title() == domain
        by_label = {c.get_label(): c.get_offsets() for c in ax.collections}
        assert set(by_label) == {"the domain's own loss", "target: metric/office_val_loss"}
        np.testing.assert_allclose(by_label["target: metric/office_val_loss"][:, 1], target_N)
        np.testing.assert_allclose(by_label["the domain's own loss"][:, 1], own[domain])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["the domain's own loss",
                                                                  "target: metric/office_val_loss"]
    path = plot_loss_vs_weight(weights_NxD, ["code", "prose"], own, tmp_path / "lvw.png",
                               target=("metric/office_val_loss", target_N))
    assert path.read_bytes()[:8] == PNG


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


def test_an_online_runs_weights_come_from_its_metrics(tmp_path):
    """Online mixing logs its decisions as mixture/<domain> rows: the schedule and the stacked-area figure follow
    them (DoReMi's objective weights never reach the source's mixture updates)."""
    folder = tmp_path / "doremi"
    _write_run(folder, scale=1.0, mixture={"code": 0.5, "prose": 0.5})
    decisions = [{"step": step, "mixture/code": 0.5 + step / 400, "mixture/prose": 0.5 - step / 400}
                 for step in range(0, 101, 20)]
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in decisions))
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"mixture": {"code": 0.5, "prose": 0.5}},
                                                        "mixing": {"kind": "doremi"}}))
    schedule = mixture_schedule(folder)
    assert [s for s, _ in schedule] == [0, 20, 40, 60, 80, 100]
    assert schedule[2][1] == {"code": 0.6, "prose": 0.4}
    ado = tmp_path / "ado"  # first decision after step 30: the configured weights before it
    _write_run(ado, scale=1.0, mixture={"code": 0.25, "prose": 0.75})
    with open(ado / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "mixture/code": 0.4, "mixture/prose": 0.6}) + "\n")
    assert mixture_schedule(ado) == [(0, {"code": 0.25, "prose": 0.75}), (30, {"code": 0.4, "prose": 0.6})]
    written = plot_runs([folder, ado], tmp_path / "plots")
    assert (tmp_path / "plots" / "mixture.png") in written
