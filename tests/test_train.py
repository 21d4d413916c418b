"""The train step: sharded equals single-device, accumulation equals the large batch, a tiny model
memorises, a non-finite loss stops the run, and `train()` writes its outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from mixlm.cli import main
from mixlm.config import ExperimentConfig, MeshConfig, ModelConfig, load_config
from mixlm.data.synthetic import SyntheticSource
from mixlm.sharding import make_mesh, to_global_batch
from mixlm.train import NonFiniteLossError, batch_sums, build_setup, evaluate, token_losses, train

TINY = ModelConfig(family="llama", num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                   vocab_size=200, max_seq_len=16, vocab_multiple=8)


def make_cfg(**train_kw) -> ExperimentConfig:
    cfg = load_config(None, ["data.seq_len=16", "train.global_batch_size=8", "train.steps=3",
                             "optimizer.lr=1e-2", "schedule.kind=constant", "logging.progress=false",
                             "logging.tensorboard=false", "eval.batches=1"])
    # Adam divides by sqrt(v) + eps: with eps=1e-8 a rarely seen token's near-zero gradient turns float
    # rounding into visible update differences, so equality tests compare updates with a moderate eps.
    return cfg.replace(model=TINY, train=cfg.train.__class__(**{**cfg.train.__dict__, **train_kw}),
                       optimizer=cfg.optimizer.__class__(lr=1e-2, eps=1e-3))


def batches(cfg, n):
    src = SyntheticSource(vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len,
                          batch_size=cfg.train.global_batch_size, seed=1)
    return [src.next_batch() for _ in range(n)]


def run_steps(cfg, mesh, host_batches):
    setup = build_setup(cfg, mesh)
    state = setup.init_state(jax.random.key(0))
    grads = jax.jit(jax.grad(lambda p, b: batch_sums(setup.graphdef, p, b, vocab_size=200, z_loss=0.0)[0]))(
        state.params, to_global_batch(host_batches[0], mesh))
    losses = []
    for b in host_batches:
        state, m = setup.train_step(state, to_global_batch(b, mesh))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(grads), jax.device_get(state.params)


def test_sharded_222_equals_single_device():
    cfg = make_cfg()
    data = batches(cfg, 3)
    mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    mesh1 = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    loss8, grads8, params8 = run_steps(cfg, mesh8, data)
    loss1, grads1, params1 = run_steps(cfg, mesh1, data)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads8, grads1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params8, params1)
    # the state really is sharded: some parameter is split over the mesh
    setup = build_setup(cfg, mesh8)
    specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
    assert any(any(p is not None for p in spec) for spec in specs)


def test_grad_accumulation_equals_large_batch():
    cfg1 = make_cfg()
    cfg4 = make_cfg(grad_accum_steps=4)
    data = batches(cfg1, 2)
    data[0]["loss_mask"][0, :5] = 0.0  # uneven token counts per micro-batch must still match
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    loss1, _, params1 = run_steps(cfg1, mesh, data)
    loss4, _, params4 = run_steps(cfg4, mesh, data)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params4, params1)


def test_token_losses_hand_computed_and_padding_excluded():
    logits = jnp.array([[[1.0, 2.0, 3.0, 50.0]]])  # last column is vocabulary padding
    nll, log_z = token_losses(logits, jnp.array([[2]]), vocab_size=3)
    expected_log_z = np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))
    np.testing.assert_allclose(log_z, [[expected_log_z]], rtol=1e-6)
    np.testing.assert_allclose(nll, [[expected_log_z - 3.0]], rtol=1e-6)


def test_tiny_model_memorises_a_fixed_batch():
    cfg = make_cfg()
    mesh = make_mesh(MeshConfig())
    setup = build_setup(cfg, mesh)
    state = setup.init_state(jax.random.key(0))
    batch = to_global_batch(batches(cfg, 1)[0], mesh)
    losses = []
    for _ in range(60):  # each step's loss read, as the train loop does: never 32 unread steps (see conftest)
        state, m = setup.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > 4.5  # ≈ log(200) at init
    assert losses[-1] < 0.3 * losses[0]


def test_train_writes_outputs_and_stops_on_nonfinite(tmp_path):
    cfg = make_cfg(steps=4, output_dir=str(tmp_path / "run"))
    cfg = cfg.replace(logging=cfg.logging.__class__(every=2, progress=False, tensorboard=True, peak_flops=1e9))
    result = train(cfg)
    assert (tmp_path / "run" / "config.yaml").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for key in ("grad_norm", "param_norm", "update_norm", "lr", "tokens_per_s", "mfu"):
        assert logged[-1][key] > 0
    # tokens: per step and cumulative, named as such; the z statistic is not called a loss
    assert [(r["tokens_step"], r["tokens_total"]) for r in logged] == [(8 * 16, 2 * 8 * 16), (8 * 16, 4 * 8 * 16)]
    assert "log_z_sq" in logged[-1] and "z_loss" not in logged[-1] and "tokens" not in logged[-1]
    assert "val_loss/synthetic" in rows[-1] and result.eval["val_loss"] > 0
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    bad = make_cfg(steps=3, output_dir=str(tmp_path / "bad"))
    bad = bad.replace(optimizer=bad.optimizer.__class__(lr=1e30, clip_norm=0.0))
    # The loss of step 1 is still finite (computed before the update); the updated params are not.
    with pytest.raises(NonFiniteLossError, match=r"param_norm is inf.* at step 1: stopping"):
        train(bad)
    saved = tmp_path / "bad" / "checkpoints"
    assert not saved.exists() or not [p for p in saved.iterdir() if p.name.isdigit()]  # nothing non-finite saved


def test_relative_output_dir_checkpoints_and_exports(tmp_path, monkeypatch):
    """`train.output_dir=runs/x` (relative, as in the demo) must checkpoint, resume and export:
    Orbax itself only accepts absolute paths."""
    from mixlm.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(steps=2, output_dir="runs/rel")
    cfg = cfg.replace(checkpoint=cfg.checkpoint.__class__(every=1, keep_last=2, async_save=False))
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "runs/rel/checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert main(["export", "runs/rel", "hf_rel"]) == 0
    assert (tmp_path / "hf_rel" / "config.json").is_file()


def test_evaluate_reports_eval_only_domains_but_leaves_them_out_of_the_total():
    cfg = make_cfg()
    setup = build_setup(cfg, make_mesh(cfg.mesh))
    params = setup.init_state(jax.random.key(0)).params
    src = SyntheticSource(vocab_size=200, seq_len=16, batch_size=8, seed=1)
    one = src.next_batch()
    half = {**one, "loss_mask": np.concatenate([np.ones((4, 16), np.float32), np.zeros((4, 16), np.float32)])}
    evals = {"a": [one, one], "b": [half], "target": [src.next_batch()]}
    every = evaluate(setup, params, evals)
    some = evaluate(setup, params, evals, eval_only=["target"])
    assert {k: v for k, v in some.items() if k != "val_loss"} == {k: v for k, v in every.items() if k != "val_loss"}
    # token-weighted over a (2 x 128 target tokens) and b (64): the target's own loss is not in it
    expected = (2 * 128 * some["val_loss/a"] + 64 * some["val_loss/b"]) / (2 * 128 + 64)
    assert some["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert every["val_loss"] == pytest.approx((2 * 128 * every["val_loss/a"] + 64 * every["val_loss/b"]
                                               + 128 * every["val_loss/target"]) / (3 * 128 + 64), rel=1e-6)
    assert some["val_loss"] != pytest.approx(every["val_loss"], rel=1e-6)


def write_tiny_config(path: Path, **sections) -> Path:
    """make_cfg's run as a YAML for `mixlm train` (section -> {key: value} updates on top)."""
    tree = {"model": {k: v for k, v in TINY.__dict__.items() if k in ("family", "num_layers", "d_model", "num_heads",
                                                                     "num_kv_heads", "mlp_dim", "vocab_size",
                                                                     "max_seq_len", "vocab_multiple")},
            "data": {"seq_len": 16}, "optimizer": {"lr": 1e-2, "eps": 1e-3}, "schedule": {"kind": "constant"},
            "train": {"global_batch_size": 8, "steps": 2}, "eval": {"batches": 1},
            "logging": {"every": 1, "progress": False, "tensorboard": False, "peak_flops": 1e9}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


def test_rerunning_a_finished_run_appends_nothing_and_says_so(tmp_path, capsys):
    """A finished run rerun trains nothing, appends no second final val_loss row and prints its loss from its
    result.json (it printed `done: step 2, loss nan`), also when it kept no checkpoint (it trained again from
    step 0); one killed after the last checkpoint but before its final eval and result.json writes that eval,
    once; a changed config on a finished run is refused naming the key."""
    config = write_tiny_config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    argv = ["train", str(config), f"train.output_dir={out}"]
    assert main(argv) == 0
    log = out / "metrics.jsonl"
    finished = log.read_text()
    rows = [json.loads(line) for line in finished.splitlines()]
    loss = [r for r in rows if "loss" in r][-1]["loss"]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished" and result["step"] == 2 and result["loss"] == pytest.approx(loss)
    assert result["eval"]["val_loss"] == pytest.approx(val[0]["val_loss"])
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"already finished: step 2, loss {loss:.4f}, val_loss {val[0]['val_loss']:.4f} (from result.json)" \
        in printed and "nan" not in printed
    assert log.read_text() == finished

    # killed after the step-2 checkpoint committed, before the final eval (and result.json) was written
    log.write_text("".join(line + "\n" for line in finished.splitlines() if "val_loss" not in line))
    (out / "result.json").unlink()
    assert main(argv) == 0
    again = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in again if "val_loss" in r] == [2]
    assert next(r for r in again if "val_loss" in r)["val_loss"] == pytest.approx(val[0]["val_loss"], rel=1e-6)
    assert (out / "result.json").is_file()
    assert main(argv) == 0 and log.read_text().count("val_loss") == finished.count("val_loss")
    assert main([*argv, "optimizer.lr=0.5"]) == 2
    assert "optimizer.lr: 0.01 -> 0.5" in capsys.readouterr().err

    # no checkpoint kept (as a sweep's proxies): the rerun reads result.json and trains nothing either
    bare = tmp_path / "bare"
    bare_argv = ["train", str(config), f"train.output_dir={bare}", "checkpoint.every=0", "checkpoint.save_at_end=false"]
    assert main(bare_argv) == 0
    assert not (bare / "checkpoints").exists() or not list((bare / "checkpoints").iterdir())
    written = (bare / "metrics.jsonl").stat().st_mtime_ns, (bare / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(bare_argv) == 0
    assert "already finished: step 2" in capsys.readouterr().out
    assert ((bare / "metrics.jsonl").stat().st_mtime_ns, (bare / "metrics.jsonl").read_text()) == written


def test_a_full_disk_under_the_metrics_log_is_one_line_and_exit_4(tmp_path, capsys):
    """metrics.jsonl on a full disk (here the kernel's /dev/full: every write fails with ENOSPC, checkpoint.every=0
    so nothing else is written during the run): one line naming the file, what happened and what to do, exit 4
    as for a checkpoint that cannot be written (it was a raw OSError traceback, exit 1)."""
    config = write_tiny_config(tmp_path / "tiny.yaml", checkpoint={"every": 0, "save_at_end": False})
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    assert main(["train", str(config), f"train.output_dir={out}"]) == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mixlm train: writing the metrics log {out / 'metrics.jsonl'} failed at step 1 "
                               "(No space left on device)"), lines
    assert "free space there or fix its permissions, then rerun the same command" in lines[0]


def test_trimming_the_metrics_log_on_a_full_disk_keeps_it_whole(tmp_path):
    """A resumed run rewrites metrics.jsonl up to its checkpoint's step; when the disk is full that rewrite
    must fail without cutting the log (it was rewritten in place: truncated, then a partial write). The child
    process's file-size limit makes the rewrite fail for real (EFBIG) once it passes 4 KB."""
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "pad": "x" * 80}) + "\n" for s in range(1, 101)))
    whole = log.read_text()
    assert len(whole) > 8000
    trim = ("import resource, signal, sys; from pathlib import Path; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); from mixlm.run_dir import RunDir; "
            "RunDir(Path(sys.argv[1]).parent).trim_metrics(90)")
    proc = subprocess.run([sys.executable, "-c", trim, str(log)], capture_output=True, text=True, check=False,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert log.read_text() == whole and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    from mixlm.run_dir import RunDir

    RunDir(tmp_path).trim_metrics(90)  # without the limit: the rows up to step 90, each line as it was
    assert log.read_text() == "".join(whole.splitlines(keepends=True)[:90])
