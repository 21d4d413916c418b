"""Scanned layers (model.scan_layers): the stacked model computes the plain model's loss and grads (llama with
GQA, gpt2; with remat too), its params convert to the plain layout and back, a scanned training checkpoint
exports to the same HF tensors as the plain model of the same weights (and passes the parity check), and a
HF folder imports into the stacked layout."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixlm import models
from mixlm.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
)
from mixlm.hf.export import export_hf
from mixlm.hf.import_hf import read_hf_params
from mixlm.hf.param_readers import MemoryReader, open_checkpoint
from mixlm.hf.verify import load_params, verify_export
from mixlm.models import forward
from mixlm.optim import decay_mask

LLAMA_GQA = ModelConfig(family="llama", num_layers=3, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
                        vocab_size=200, max_seq_len=64, vocab_multiple=8)
GPT2 = ModelConfig(family="gpt2", num_layers=3, d_model=64, num_heads=4, mlp_dim=128, vocab_size=200,
                   max_seq_len=64, vocab_multiple=8, tie_embeddings=True)
CONFIGS = pytest.mark.parametrize("cfg", [LLAMA_GQA, GPT2], ids=["llama-gqa", "gpt2"])


def packed_batch(rows: int = 2, length: int = 32, vocab: int = 200) -> dict:
    """Two packed documents per row (positions restart), so segment ids flow through the scan."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, length + 1))
    seg = np.repeat([1, 2], [length // 2 - 3, length // 2 + 3])
    pos = np.concatenate([np.arange(length // 2 - 3), np.arange(length // 2 + 3)])
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(np.tile(seg, (rows, 1)), jnp.int32),
            "positions": jnp.asarray(np.tile(pos, (rows, 1)), jnp.int32)}


def randomized_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """Plain-layout params with every leaf random (norm scales and biases too), so each layer differs."""
    graphdef, params = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [(1.0 if a.ndim == 1 else 0.0) + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


def loss_and_grads(cfg: ModelConfig, params: dict, batch: dict):
    graphdef, _ = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
        logits = forward.batch_logits(graphdef, p, batch, vocab_size=cfg.vocab_size)
        return jnp.mean(forward.token_losses(logits, batch["targets"])[0])

    return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(a, b, tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@CONFIGS
@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_scanned_model_gives_the_plain_models_loss_and_grads(cfg, remat):
    """fp32, 1e-5: same weights in both layouts (stack_layers), same packed batch; the scanned grads, unstacked,
    equal the plain model's grads leaf by leaf."""
    _, plain = randomized_params(cfg)
    batch = packed_batch(vocab=cfg.vocab_size)
    loss_ref, grads_ref = loss_and_grads(cfg, plain, batch)
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    loss, grads = loss_and_grads(scanned_cfg, models.stack_layers(plain, scanned_cfg), batch)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert_trees_close(models.unstack_layers(grads, scanned_cfg), grads_ref, 1e-5)


def grad_jaxpr(cfg: ModelConfig) -> str:
    graphdef, params = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))
    batch = packed_batch(1, 16)
    return str(jax.make_jaxpr(jax.grad(lambda p: forward.batch_logits(
        graphdef, p, batch, vocab_size=cfg.vocab_size).sum()))(params))


def test_scan_compiles_one_block_and_remat_recomputes_inside_it():
    """The program is one block whatever the depth (as many matmuls at 3 layers as at 6), a scan, and with
    remat the block's forward is checkpointed inside it."""
    cfg = dataclasses.replace(LLAMA_GQA, scan_layers=True, remat="full")
    jaxpr = grad_jaxpr(cfg)
    assert "scan" in jaxpr and ("checkpoint" in jaxpr or "remat" in jaxpr)
    assert jaxpr.count("dot_general") == grad_jaxpr(dataclasses.replace(cfg, num_layers=6)).count("dot_general")
    plain = grad_jaxpr(dataclasses.replace(cfg, scan_layers=False))
    assert plain.count("dot_general") > jaxpr.count("dot_general")


@CONFIGS
def test_stacked_params_layout_axes_and_round_trip(cfg):
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    key = models.layers_param(cfg)
    _, plain = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))
    _, scanned = models.split_params(models.build_model(scanned_cfg, rngs=nnx.Rngs(0)))
    # the same seed gives the same weights in both layouts (blocks are built in order, then stacked)
    assert_trees_close(models.unstack_layers(scanned, cfg), plain, 0)
    assert_trees_close(models.stack_layers(plain, cfg), scanned, 0)
    assert models.unstack_layers(plain, cfg) is plain and models.stack_layers(scanned, cfg) is scanned
    _, shapes, axes = models.abstract_params(scanned_cfg)
    for leaf_axes, leaf in zip(jax.tree.leaves(axes[key], is_leaf=lambda x: isinstance(x, tuple)),
                               jax.tree.leaves(shapes[key])):
        assert leaf_axes[0] == "layers" and leaf.shape[0] == cfg.num_layers and len(leaf_axes) == leaf.ndim
    assert models.param_counts(scanned_cfg) == models.param_counts(cfg)
    assert models.flops_per_token(scanned_cfg, 64) == models.flops_per_token(cfg, 64)
    # weight decay: a stacked norm scale [layers, norm] is still a norm (no decay); stacked kernels decay
    plain_mask = decay_mask(models.abstract_params(cfg)[2], decay_embeddings=False)
    scanned_mask = decay_mask(axes, decay_embeddings=False)
    assert scanned_mask == _stacked_mask(plain_mask, key)
    assert any(jax.tree.leaves(scanned_mask[key])) and not all(jax.tree.leaves(scanned_mask[key]))


def _stacked_mask(plain_mask: dict, key: str) -> dict:
    """The plain decay mask with its per-layer entries collapsed to layer 0's (they are all equal)."""
    out = dict(plain_mask)
    out[key] = plain_mask[key]["0"]
    return out


def experiment(model: ModelConfig, out_dir, *, steps: int = 2) -> ExperimentConfig:
    return ExperimentConfig(
        model=model,
        data=DataConfig(seq_len=32),
        train=TrainConfig(steps=steps, global_batch_size=8, output_dir=str(out_dir)),
        checkpoint=CheckpointConfig(every=steps, keep_last=0, async_save=False),
        eval=EvalConfig(batches=0),
        logging=LoggingConfig(tensorboard=False, progress=False, peak_flops=1e9),
    )


def safetensors_tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@CONFIGS
def test_scanned_checkpoint_exports_the_plain_models_hf_folder(cfg, tmp_path):
    """Train a scanned model 2 steps (sharded over 8 fake devices, Orbax checkpoint), export its checkpoint,
    and export the same weights unstacked as a plain model: identical safetensors tensors, and the scanned
    source passes the Flax-vs-transformers parity check."""
    from mixlm.train import train

    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    train(experiment(scanned_cfg, tmp_path / "run"), log_fn=lambda _: None)
    source = open_checkpoint(tmp_path / "run")
    assert source.cfg.model.scan_layers
    key = models.layers_param(cfg)
    assert (key, "0") not in {p[:2] for p in source.shapes()}  # the checkpoint holds the stacked layout
    export_hf(source, tmp_path / "hf_scanned")

    stacked_params = load_params(source)
    plain_source = MemoryReader(cfg, models.unstack_layers(stacked_params, cfg))
    export_hf(plain_source, tmp_path / "hf_plain")

    ours, theirs = safetensors_tensors(tmp_path / "hf_scanned"), safetensors_tensors(tmp_path / "hf_plain")
    assert sorted(ours) == sorted(theirs) and len(ours) > 3 * cfg.num_layers
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert verify_export(source, tmp_path / "hf_scanned").passed

    # import: the HF folder read into a scanned model's layout equals the checkpoint's stacked params
    imported = read_hf_params(tmp_path / "hf_scanned", dataclasses.replace(scanned_cfg, vocab_multiple=cfg.vocab_multiple))
    flat_ckpt = jax.tree.leaves(stacked_params[key])
    flat_imported = jax.tree.leaves(imported[key])
    assert len(flat_ckpt) == len(flat_imported)
    for a, b in zip(flat_ckpt, flat_imported):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direction", ["plain-to-scanned", "scanned-to-plain"])
def test_checkpoint_restores_into_the_other_layout(direction, tmp_path):
    """checkpoint.init_from across layouts: a plain checkpoint restores into a scanned model (and back), sharded
    over the 8 fake devices, with the same weights."""
    from mixlm.checkpoint import resolve_step_dir, restore_params
    from mixlm.sharding import make_mesh
    from mixlm.train import build_setup, train

    cfg = LLAMA_GQA
    write_cfg, read_cfg = ((cfg, dataclasses.replace(cfg, scan_layers=True)) if direction == "plain-to-scanned"
                           else (dataclasses.replace(cfg, scan_layers=True), cfg))
    train(experiment(write_cfg, tmp_path / "run"), log_fn=lambda _: None)
    source = open_checkpoint(tmp_path / "run")
    written = load_params(source)

    exp = experiment(read_cfg, tmp_path / "other")
    setup = build_setup(exp, make_mesh(exp.mesh))
    with jax.set_mesh(setup.mesh):
        restored = restore_params(resolve_step_dir(tmp_path / "run"), setup.abstract_state.params, cfg.vocab_size)
    expected = models.stack_layers(written, cfg) if read_cfg.scan_layers else models.unstack_layers(written, cfg)
    assert_trees_close(jax.device_get(restored), expected, 0)
    sharded = [a for a in jax.tree.leaves(restored) if len(a.sharding.device_set) > 1]
    assert sharded  # placed on the run's shardings, not left on one device


@pytest.mark.parametrize(("platform", "impl"), [("tpu", "splash"), ("cuda", "xla")])
def test_full_depth_scanned_train_step_lowers_for_the_accelerators(platform, impl):
    """All 22 layers of regmix-1b, scanned, with splash (TPU) or XLA (CUDA) attention, full remat, bf16 compute
    and bf16 first moments: the train step lowers on the fake (data 2, fsdp 2, tensor 2) mesh (nothing
    allocated), as one while loop holding the block."""
    from jax import export

    from mixlm.config import MeshConfig, load_config, load_model_config
    from mixlm.sharding import make_mesh
    from mixlm.train import build_setup

    root = Path(__file__).resolve().parents[1]
    model = dataclasses.replace(load_model_config(root / "configs" / "models" / "regmix-1b.yaml"), attention=impl,
                                remat="full", compute_dtype="bfloat16", scan_layers=True)
    cfg = load_config(None, ["model.max_seq_len=2048", "data.seq_len=2048", "train.global_batch_size=8",
                             "optimizer.moments_dtype=bfloat16", "logging.progress=false",
                             "logging.tensorboard=false"]).replace(model=model)
    setup = build_setup(cfg, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    rows = jax.ShapeDtypeStruct((8, 2048), jnp.int32, sharding=setup.layout.batch_sharding(2))
    batch = {"inputs": rows, "targets": rows, "positions": rows, "segment_ids": rows,
             "loss_mask": jax.ShapeDtypeStruct((8, 2048), jnp.float32, sharding=setup.layout.batch_sharding(2))}
    text = export.export(setup.train_step, platforms=[platform])(setup.abstract_state, batch).mlir_module()
    assert "stablehlo.while" in text and ("tpu_custom_call" in text) == (platform == "tpu")
    assert "<22x2048x5632xf32>" in text  # the stacked MLP kernels [layers, D, F], float32 master weights
    assert "<22x2048x5632xbf16>" in text  # ... and their bf16 first moments
