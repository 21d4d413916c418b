"""Checkpoints: exact resume after SIGKILL, a clean stop on SIGTERM, corrupt steps skipped with a warning,
restore onto another mesh, retention, no deletion before a newer step commits, the config-mismatch
refusal, params-only initialisation, and two processes checkpointing together."""

import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from conftest import xla_flags
from etils import epath
from ports import free_port

from mixlm.checkpoint import (
    FILE_LIST,
    VALUE_SUMS,
    CheckpointCorruptWarning,
    CheckpointError,
    CheckpointSaveError,
    ConfigMismatchError,
    RunCheckpoints,
    checkpoint_dir,
    file_problem,
    restore_params,
    run_metadata,
)
from mixlm.config import CheckpointConfig, MeshConfig, load_config
from mixlm.data.synthetic import SyntheticSource
from mixlm.folder_lock import RunFolderLock
from mixlm.sharding import make_mesh, to_global_batch
from mixlm.train import build_setup, initial_state, train

TINY_MODEL = [
    "model.family=llama", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
    "model.num_kv_heads=2", "model.mlp_dim=64", "model.vocab_size=200", "model.max_seq_len=16",
    "model.vocab_multiple=8",
]
RUN = [
    "data.seq_len=16", "train.global_batch_size=8", "optimizer.lr=1e-2", "optimizer.eps=1e-3",
    "schedule.kind=cosine", "schedule.warmup_steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    "eval.batches=1", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
    "logging.peak_flops=1e9",
]


def tiny_cfg(out_dir, *overrides):
    return load_config(None, [*TINY_MODEL, *RUN, f"train.output_dir={out_dir}", *overrides])


def write_config(path: Path, *overrides) -> Path:
    """The tiny run as an experiment YAML (for `mixlm train` in a subprocess)."""
    tree: dict = {}
    for text in [*TINY_MODEL, *RUN, *overrides]:
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def quiet(_text):
    pass


def leaves_equal(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def trained_state(setup, steps=2):
    """A state with non-zero Adam moments (so a restore that dropped them would show)."""
    state = setup.init_state(jax.random.key(0))
    src = SyntheticSource(vocab_size=setup.cfg.model.vocab_size, seq_len=16, batch_size=8)
    for _ in range(steps):
        state, _ = setup.train_step(state, to_global_batch(src.next_batch(), setup.mesh))
    return state


# ---- in-process: the RunCheckpoints API ---------------------------------------------------------------


def test_restore_onto_other_meshes_and_params_only(tmp_path):
    # vocab_multiple=1: the embedding is padded for the mesh axis that splits the vocabulary (tensor): 202 rows
    # with tensor=2, 201 without; a checkpoint padded differently restores (its real rows) onto either.
    cfg = tiny_cfg(tmp_path / "run", "model.vocab_size=201", "model.vocab_multiple=1")
    setup8 = build_setup(cfg, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    state8 = trained_state(setup8)
    assert state8.params["embed_tokens"].shape == (202, 32)
    ckpts = RunCheckpoints(checkpoint_dir(cfg.train.output_dir), cfg.checkpoint, log=quiet)
    ckpts.save(2, state8, data_state={"step": 2}, meta=run_metadata(cfg, 2, tokens_seen={"a": 256}))
    ckpts.close()
    host8 = jax.device_get(state8)

    def same_up_to_padding(saved, restored):
        for (path, a), b in zip(jax.tree.flatten_with_path(saved)[0], jax.tree.leaves(restored)):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:  # vocabulary rows: the real 201 rows must be identical
                assert "embed_tokens" in str(path) or "lm_head" in str(path), path
                axis = next(i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n)
                a, b = np.take(a, range(201), axis=axis), np.take(b, range(201), axis=axis)
            assert np.array_equal(a, b), path

    for mesh_cfg, devices, rows in ((MeshConfig(data=4, fsdp=1, tensor=1), 4, 201),
                                    (MeshConfig(data=1, fsdp=1, tensor=1), 1, 201)):
        setup = build_setup(cfg, make_mesh(mesh_cfg, devices=jax.devices()[:devices]))
        reader = RunCheckpoints(checkpoint_dir(cfg.train.output_dir), cfg.checkpoint, log=quiet)
        restored = reader.restore_latest(setup.abstract_state, cfg)
        reader.close()  # releases the run folder's lock
        assert restored.step == 2 and restored.data_state == {"step": 2}
        assert restored.meta["tokens_seen"] == {"a": 256} and restored.meta["config"] == cfg.to_dict()
        assert restored.state.params["embed_tokens"].shape == (rows, 32)
        for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(setup.state_shardings)):
            assert leaf.sharding == want  # born on the new mesh, with its shardings
        same_up_to_padding(host8.params, restored.state.params)
        same_up_to_padding(host8.opt_state, restored.state.opt_state)

        # checkpoint.init_from: the params only; step 0 and a fresh optimizer
        init_cfg = cfg.replace(checkpoint=CheckpointConfig(init_from=str(tmp_path / "run")))
        new_ckpts = RunCheckpoints(tmp_path / f"new{devices}" / "checkpoints", cfg.checkpoint, log=quiet)
        fresh, _, _ = initial_state(dataclasses.replace(setup, cfg=init_cfg), [init_cfg], new_ckpts,
            [SyntheticSource(vocab_size=201, seq_len=16, batch_size=8)], allow_config_change=False, say=quiet)
        new_ckpts.close()
        assert int(fresh.step) == 0
        same_up_to_padding(host8.params, fresh.params)
        mu = fresh.opt_state[1][0].mu  # (EmptyState, (ScaleByAdamState, ...)): the clip / adam chain
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(mu))

    other = tiny_cfg(tmp_path / "run", "model.vocab_size=201", "model.vocab_multiple=1", "model.mlp_dim=96")
    setup_other = build_setup(other, make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    with pytest.raises(CheckpointError, match=r"mlp.*shape"):
        restore_params(Path(tmp_path / "run" / "checkpoints" / "2"), setup_other.abstract_state.params, 201)


def small_state(step):
    return {"w": jnp.full((4, 3), float(step)), "step": jnp.int32(step)}


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    ckpts = RunCheckpoints(tmp_path / "c", CheckpointConfig(every=2, keep_last=2, keep_every=4), log=quiet)
    saved = [s for s in range(1, 15) if ckpts.should_save(s, last_step=15)] + [15]
    assert saved == [2, 4, 6, 8, 10, 12, 14, 15]
    for s in saved:
        ckpts.save(s, small_state(s), data_state={"step": s}, meta={"step": s})
    ckpts.close()
    assert sorted(int(p.name) for p in (tmp_path / "c").iterdir()) == [4, 8, 12, 14, 15]


def test_failed_save_never_deletes_the_older_checkpoint(tmp_path, monkeypatch):
    ckpts = RunCheckpoints(tmp_path / "c", CheckpointConfig(every=1, keep_last=1), log=quiet)
    ckpts.save(1, small_state(1), data_state={"step": 1}, meta={"step": 1})
    ckpts.wait()
    real_save = ocp.JsonCheckpointHandler._save_fn

    async def failing_save(self, x, directory):  # the commit of step 2 dies half-way (in the background)
        if x.get("step") == 2:
            raise OSError("disk full")
        return await real_save(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing_save)
    ckpts.save(2, small_state(2), data_state={"step": 2}, meta={"step": 2})  # keep_last=1 would delete step 1
    kept = rf"saving checkpoint step 2 to {tmp_path / 'c' / '2'} failed \(OSError: disk full\); the previous checkpoint \(step 1"
    with pytest.raises(CheckpointSaveError, match=kept):
        ckpts.wait()
    ckpts.close()  # the failure was reported once; closing releases the lock
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.isdigit()] == ["1"]
    reader = RunCheckpoints(tmp_path / "c", CheckpointConfig(keep_last=1), log=quiet)
    assert reader.steps() == [1] and reader.read_meta(1)["step"] == 1
    reader.close()


def test_corrupt_steps_are_skipped_with_a_warning_until_none_is_left(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    setup = build_setup(cfg, make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    state = setup.init_state(jax.random.key(0))
    ckpts = RunCheckpoints(checkpoint_dir(tmp_path / "run"), CheckpointConfig(keep_last=0), log=quiet)
    for s in (1, 2, 3):
        ckpts.save(s, state.replace(step=jnp.int32(s)), data_state={"step": s},
                   meta=run_metadata(cfg, s, tokens_seen={}))
    ckpts.close()
    root = tmp_path / "run" / "checkpoints"
    # step 3: killed right after its commit (no file list yet) and a metadata file cut short
    (root / "3" / "mixlm_files.json").unlink()
    meta_file = root / "3" / "state" / "_METADATA"
    meta_file.write_bytes(meta_file.read_bytes()[:100])
    # step 2: a data file is missing (caught by the file list)
    victim = max((p for p in (root / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.unlink()

    def resume():
        reader = RunCheckpoints(root, cfg.checkpoint, log=quiet)
        try:
            return reader.restore_latest(setup.abstract_state, cfg)
        finally:
            reader.close()

    with pytest.warns(CheckpointCorruptWarning) as caught:
        restored = resume()
    assert restored.step == 1 and int(restored.state.step) == 1
    messages = [str(w.message) for w in caught]
    assert any("step 3" in m and "does not restore" in m for m in messages), messages
    assert any("step 2" in m and f"{victim.relative_to(root / '2')} is missing" in m for m in messages), messages
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "checkpoints_corrupt").iterdir()) == ["2", "3"]

    # the last one goes bad too: refuse, and move nothing
    (root / "1" / "data" / "metadata").write_text("{")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resume()
    assert [p.name for p in root.iterdir() if p.name.isdigit()] == ["1"]


def test_an_unlisted_step_without_value_sums_must_restore_finite(tmp_path):
    """A step with no file list from a mixlm that saved no value sums: what it restores must be finite, else it
    is set aside for the step before (never trusted because nothing says it is wrong)."""
    cfg = tiny_cfg(tmp_path / "run")
    setup = build_setup(cfg, make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    state = setup.init_state(jax.random.key(0))
    ckpts = RunCheckpoints(checkpoint_dir(tmp_path / "run"), CheckpointConfig(keep_last=0), log=quiet)
    ckpts.save(1, state.replace(step=jnp.int32(1)), data_state={"step": 1}, meta=run_metadata(cfg, 1, tokens_seen={}))
    nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)  # one NaN per array
    ckpts.save(2, state.replace(step=jnp.int32(2), params=nan_params), data_state={"step": 2},
               meta=run_metadata(cfg, 2, tokens_seen={}))
    ckpts.close()
    step2 = tmp_path / "run" / "checkpoints" / "2"
    (step2 / FILE_LIST).unlink()  # killed right after the commit
    meta = json.loads((step2 / "meta" / "metadata").read_text())
    assert {f"params/{n}" for n in _param_names(state.params)} <= set(meta[VALUE_SUMS])  # every array has one
    del meta[VALUE_SUMS]  # as an older mixlm wrote it
    (step2 / "meta" / "metadata").write_text(json.dumps(meta))

    reader = RunCheckpoints(checkpoint_dir(tmp_path / "run"), cfg.checkpoint, log=quiet)
    with pytest.warns(CheckpointCorruptWarning, match=r"step 2 .* no file list .* restored values are NaN or "
                                                      r"infinite .*using step 1"):
        restored = reader.restore_latest(setup.abstract_state, cfg)
    reader.close()
    assert restored.step == 1 and not any(np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(restored.state))


def _param_names(params, prefix=""):
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _param_names(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}"


# ---- in-process: train() ------------------------------------------------------------------------------


def test_an_unlisted_step_is_checked_by_its_values_then_listed_or_set_aside(tmp_path):
    """A run killed right after a save commits leaves a step without its file list (mixlm_files.json). Such a
    step is checked against the value sums its meta item was committed with: step 2 (intact) is used, and its
    file list written; step 3, whose arrays were replaced by other valid bytes (they restore cleanly, into
    step 1's values), is set aside. On the old code step 3 was trusted and the run went on from wrong state."""
    cfg = tiny_cfg(tmp_path / "run", "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=0",
                   "eval.batches=0")
    first = train(cfg, log_fn=quiet)
    root = tmp_path / "run" / "checkpoints"
    for step in ("2", "3"):
        (root / step / FILE_LIST).unlink()
    shutil.rmtree(root / "3" / "state")
    shutil.copytree(root / "1" / "state", root / "3" / "state")
    (tmp_path / "run" / "result.json").unlink()  # killed before it wrote result.json: it has not finished
    # checkpoint.init_from of that step refuses it too
    setup = build_setup(cfg, make_mesh(cfg.mesh))
    with pytest.raises(CheckpointError, match=r"step .*3: it has no file list .* differ from those saved .*Point "
                                              r"checkpoint.init_from at an earlier step folder"):
        restore_params(root / "3", setup.abstract_state.params, cfg.model.vocab_size)

    messages = []
    expected = r"checkpoint step 3 .* no file list .* values it restores differ from those saved .*using step 2"
    with pytest.warns(CheckpointCorruptWarning, match=expected):
        second = train(cfg, log_fn=messages.append)
    assert any("step 2" in m and "had no file list" in m and "file list is written now" in m for m in messages)
    assert (root / "2" / FILE_LIST).exists() and file_problem(epath.Path(root / "2")) == ""
    assert any("resumed from" in m and "(step 2," in m for m in messages), messages
    assert leaves_equal(first.state, second.state)  # the redone step 3 is bitwise the same
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]




def test_train_resumes_exactly_past_a_truncated_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3")
    first = train(cfg, log_fn=quiet)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in root.iterdir()) == [2, 4, 6]
    victim = max((p for p in (root / "6").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)
    (tmp_path / "run" / "result.json").unlink()  # killed before it wrote result.json: it has not finished

    messages = []
    expected_warning = r"checkpoint step 6 .* is corrupt: .* bytes, expected .*using step 4"
    with pytest.warns(CheckpointCorruptWarning, match=expected_warning):
        second = train(cfg, log_fn=messages.append)
    assert any("resumed from" in m and m.endswith("(step 4, 512 tokens seen)") for m in messages), messages
    assert leaves_equal(first.state, second.state)  # the redone steps 5 and 6 are bitwise the same
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicated steps


def overwrite_bytes(path: Path, at: float = 0.1, count: int = 8) -> None:
    """Inverts `count` bytes at fraction `at` of a file, keeping its size (what the file-size list cannot see)."""
    offset = int(path.stat().st_size * at)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_train_resumes_exactly_past_a_checkpoint_with_changed_bytes(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=2", "checkpoint.every=1", "eval.batches=0")
    first = train(cfg, log_fn=quiet)
    root = tmp_path / "run" / "checkpoints"
    listing = json.loads((root / "2" / "mixlm_files.json").read_text())
    assert set(listing["crc32"]) == set(listing["files"])  # every file has its checksum
    # Without checksums these bytes (in a data file the restore reads) restore silently into other values.
    victim = max((p for p in (root / "2" / "state" / "ocdbt.process_0").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    overwrite_bytes(victim)
    assert victim.stat().st_size == size
    (tmp_path / "run" / "result.json").unlink()  # killed before it wrote result.json: it has not finished

    messages = []
    name = str(victim.relative_to(root / "2"))
    expected_warning = rf"checkpoint step 2 .* is corrupt: {name} has crc32 \w+, expected \w+ .*using step 1"
    with pytest.warns(CheckpointCorruptWarning, match=expected_warning):
        second = train(cfg, log_fn=messages.append)
    assert any("resumed from" in m and m.endswith("(step 1, 128 tokens seen)") for m in messages), messages
    assert leaves_equal(first.state, second.state)  # the redone step 2 is bitwise the same
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / "checkpoints_corrupt").iterdir()] == ["2"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # no duplicated steps


def test_a_full_disk_during_save_ends_in_one_error_keeping_the_previous_step(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=1",
                   "eval.batches=0")
    real_save = ocp.JsonCheckpointHandler._save_fn

    async def failing_save(self, x, directory):  # step 2's metadata hits a full disk (in the background)
        if x.get("step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_save(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing_save)
    root = tmp_path / "run" / "checkpoints"
    refusal = (rf"saving checkpoint step 2 to {root / '2'} failed \(No space left on device: .*\); the previous "
               rf"checkpoint \(step 1, {root / '1'}\) is kept\. Free disk space")
    with pytest.raises(CheckpointSaveError, match=refusal) as caught:
        train(cfg, log_fn=quiet)
    assert "\n" not in str(caught.value)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir() if p.name.isdigit()] == ["1"]
    assert file_problem(epath.Path(root / "1")) == ""  # complete, checksums included: a rerun resumes from it
    RunFolderLock(tmp_path / "run").acquire().release()  # and the failed run released the folder
    # (not rerun here: the failed save's state writes may still run in this process; a real run has exited)


def test_a_save_that_cannot_write_is_one_line_without_orbax_tracebacks(tmp_path):
    """A real failed write (the child's file-size limit, RLIMIT_FSIZE: writes past it fail with EFBIG, as a full
    disk fails with ENOSPC) during the first save: mixlm's one line, exit 4, and none of the error logs and
    tracebacks Orbax and TensorStore print of their own (there were 4 to 250 before)."""
    config_file = write_config(tmp_path / "tiny.yaml", "train.steps=2", "checkpoint.every=1", "eval.batches=0")
    out = tmp_path / "run"
    # The limit is set in the child itself (a preexec_fn would fork this multithreaded process); the state's
    # data files are ~100-300 KB, config.yaml and metrics.jsonl ~1 KB.
    limited_cli = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); sys.argv[0] = 'mixlm'; "
                   "runpy.run_module('mixlm.cli', run_name='__main__')")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-c", limited_cli, "train", str(config_file), f"train.output_dir={out}"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                          check=False, timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR:absl" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mixlm train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"saving checkpoint step 1 to {out / 'checkpoints' / '1'} failed (File too large: {out}" in lines[0]
    assert "there is no earlier checkpoint. Free disk space" in lines[0]


def test_an_unwritable_output_folder_is_one_line_and_exit_4(tmp_path):
    if os.geteuid() == 0:  # root writes through chmod: a path below a regular file fails for everyone
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        out = blocker / "run"
    else:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "run"
    config_file = write_config(tmp_path / "tiny.yaml", "train.steps=1")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-m", "mixlm.cli", "train", str(config_file), f"train.output_dir={out}"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                          check=False, timeout=180)
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mixlm train:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot write to the run folder {out}" in lines[0] and "choose another train.output_dir" in lines[0]


def test_config_mismatch_is_refused_naming_the_keys(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=2", "checkpoint.every=2", "eval.batches=0")
    train(cfg, log_fn=quiet)
    saved_yaml = (tmp_path / "run" / "config.yaml").read_text()
    changed = tiny_cfg(tmp_path / "run", "train.steps=2", "eval.batches=0", "optimizer.lr=3e-3", "data.seed=5")
    refusal = r"optimizer.lr: 0.01 -> 0.003; data.seed: 0 -> 5\. .*--allow-config-change"
    with pytest.raises(ConfigMismatchError, match=refusal):
        train(changed, log_fn=quiet)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved_yaml  # a refused run changes nothing

    # steps, logging, eval, checkpointing and the mesh may change on resume
    longer = tiny_cfg(tmp_path / "run", "train.steps=3", "eval.batches=0", "logging.every=3", "checkpoint.every=0",
                      "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1")
    messages = []
    assert [r["step"] for r in train(longer, log_fn=messages.append).history] == [3]
    assert any("resumed from" in m for m in messages)
    messages.clear()
    train(changed, log_fn=messages.append, allow_config_change=True)  # at step 3 already: nothing to train
    assert any("--allow-config-change" in m and "optimizer.lr" in m for m in messages), messages


# ---- subprocesses: SIGKILL, SIGTERM, rerun ------------------------------------------------------------

STEPS, EVERY = 24, 3


class Cli:
    """`mixlm train CONFIG train.output_dir=OUT` in a subprocess on 8 fake CPU devices; output to a file."""

    def __init__(self, out_dir, config_file, tag):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8),
                   PYTHONUNBUFFERED="1")
        self.log_path = Path(config_file).parent / f"{tag}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mixlm.cli", "train", str(config_file), f"train.output_dir={out_dir}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])

    def finish(self, timeout=180.0) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.log_path.read_text()


def logged_steps(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return [r for r in rows if "loss" in r]


def signal_at(run: Cli, out_dir, step: int, sig, timeout=120.0) -> int:
    """Sends `sig` once metrics.jsonl shows `step` and a checkpoint has committed (the process is then a
    step or two further on). Returns the step seen."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and run.proc.poll() is None:
        rows = logged_steps(out_dir)
        committed = any(p.name.isdigit() for p in (Path(out_dir) / "checkpoints").glob("*"))
        if rows and rows[-1]["step"] >= step and committed:
            run.proc.send_signal(sig)
            return rows[-1]["step"]
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before step {step}:\n{run.log_path.read_text()[-3000:]}")


def final_params(out_dir):
    cfg = load_config(Path(out_dir) / "config.yaml")
    setup = build_setup(cfg, make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
    return restore_params(Path(out_dir) / "checkpoints" / str(cfg.train.steps), setup.abstract_state.params,
                          cfg.model.vocab_size)


@pytest.mark.slow
def test_sigkill_then_sigterm_then_rerun_is_bitwise_identical(tmp_path):
    seed = time.time_ns() % 10**6
    rng = random.Random(seed)
    config_file = write_config(tmp_path / "tiny.yaml", f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
                               "checkpoint.keep_last=2")
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = Cli(ref, config_file, "reference")  # uninterrupted, alongside the run we kill
    victim = Cli(run, config_file, "killed")
    signal_at(victim, run, rng.randrange(EVERY + 1, STEPS // 2), signal.SIGKILL)
    rc, _ = victim.finish()
    assert rc == -signal.SIGKILL, f"seed {seed}"

    resumed = Cli(run, config_file, "preempted")
    seen = signal_at(resumed, run, rng.randrange(STEPS // 2 + 2, STEPS - 4), signal.SIGTERM)
    rc, out = resumed.finish()
    assert rc == 0, f"seed {seed}:\n{out[-3000:]}"
    assert "resumed from" in out, out[-3000:]
    stopped = int(out.split("preempted: checkpoint of step ")[1].split()[0])
    assert stopped > seen, f"seed {seed}: stopped at {stopped}, signalled after {seen}"
    assert max(int(p.name) for p in (run / "checkpoints").iterdir()) == stopped  # saved at the current step

    rc, out = Cli(run, config_file, "rerun").finish()
    assert rc == 0 and f"resumed from {run / 'checkpoints' / str(stopped)}" in out, out[-3000:]
    rc, out = reference.finish()
    assert rc == 0, out[-3000:]

    keys = ("loss", "log_z_sq", "grad_norm", "param_norm", "update_norm", "lr", "tokens_step", "tokens_total")
    ref_rows, run_rows = logged_steps(ref), logged_steps(run)
    assert [r["step"] for r in run_rows] == list(range(1, STEPS + 1))
    assert [[r[k] for k in keys] for r in run_rows] == [[r[k] for k in keys] for r in ref_rows], f"seed {seed}"
    assert leaves_equal(final_params(ref), final_params(run)), f"seed {seed}"


@pytest.mark.slow
def test_two_processes_save_and_skip_a_corrupt_step_together(tmp_path):
    """Two processes x 4 devices: Orbax writes one OCDBT folder per process, the JSON items and file list
    come from process 0, and both processes agree to skip a step whose process-1 file was truncated."""
    out = tmp_path / "run"
    config_file = write_config(tmp_path / "tiny.yaml", "train.steps=4", "checkpoint.every=2")

    def run_pair() -> list[str]:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4))
        port, procs = free_port(), []
        for i in range(2):
            with open(tmp_path / f"p{i}.log", "w") as log:  # the child keeps its own copy of the file
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "mixlm.cli", "train", str(config_file), f"train.output_dir={out}",
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1]))
        for p in procs:
            p.wait(timeout=180)
        logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(text[-2000:] for text in logs)
        return logs

    run_pair()
    step4 = out / "checkpoints" / "4"
    assert sorted(p.name for p in (step4 / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                                  "ocdbt.process_1"]
    assert json.loads((step4 / "data" / "metadata").read_text()) == {"step": 4}
    listing = json.loads((step4 / "mixlm_files.json").read_text())  # process 1 checksummed its own folder
    assert set(listing["crc32"]) == set(listing["files"]) and any("ocdbt.process_1" in n for n in listing["crc32"])
    assert not list(step4.glob("mixlm_files.json.*"))  # the per-process parts were merged and removed
    losses = {r["step"]: r["loss"] for r in logged_steps(out)}
    victim = max((p for p in (step4 / "state" / "ocdbt.process_1").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    os.truncate(victim, 10)
    (out / "result.json").unlink()  # killed before it wrote result.json: it has not finished

    logs = run_pair()
    assert "resumed from" in logs[0] and f"{out / 'checkpoints' / '2'} (step 2" in logs[0], logs[0][-2000:]
    assert "step 4" in logs[0] and "is corrupt" in logs[0]
    assert {r["step"]: r["loss"] for r in logged_steps(out)} == losses  # steps 3 and 4 redone bitwise
