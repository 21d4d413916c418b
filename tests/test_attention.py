"""The attention call site (mixlm.models.attention) and per-block remat: every kernel path equals the exact
blocked path (values and grads, packed segments, GQA; the Pallas kernels in interpret mode on CPU), through
a kernel call and through whole models, sharded too; remat gives the plain model's loss and grads; and the
full train step lowers for TPU (splash, remat, bf16) and CUDA (xla, Pallas GPU) without the hardware."""

import dataclasses
import functools
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from mixlm import models
from mixlm.config import MeshConfig, ModelConfig, load_config, load_model_config
from mixlm.errors import ConfigError
from mixlm.models import attention, forward
from mixlm.sharding import make_layout, make_mesh
from mixlm.train import build_setup

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
KERNEL_IMPLS = ("xla", "splash", "pallas_gpu")
LLAMA_GQA = ModelConfig(family="llama", num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
                        vocab_size=200, max_seq_len=128, vocab_multiple=8)
GPT2 = ModelConfig(family="gpt2", num_layers=2, d_model=64, num_heads=4, mlp_dim=128, vocab_size=200,
                   max_seq_len=128, vocab_multiple=8, tie_embeddings=True)


@functools.cache
def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Rows of 3 packed documents of uneven lengths; positions restart per document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1))
    bounds = [0, length // 4, length // 4 + length // 2 - 8, length]
    seg = np.concatenate([np.full(b - a, i + 1) for i, (a, b) in enumerate(itertools.pairwise(bounds))])
    pos = np.concatenate([np.arange(b - a) for a, b in itertools.pairwise(bounds)])
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "loss_mask": jnp.ones((batch, length), jnp.float32),
            "segment_ids": jnp.asarray(np.tile(seg, (batch, 1)), jnp.int32),
            "positions": jnp.asarray(np.tile(pos, (batch, 1)), jnp.int32)}


@functools.cache  # the blocked / plain references are shared by several tests
def loss_and_grads(cfg: ModelConfig, rows_length_seed: tuple[int, int, int], layout=None):
    """Mean next-token loss of a freshly initialised model (seed 0) on a packed_batch and its grads, jitted."""
    rows, length, seed = rows_length_seed
    batch = packed_batch(rows, length, cfg.vocab_size, seed)
    graphdef, params = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
        logits = forward.batch_logits(graphdef, p, batch, vocab_size=cfg.vocab_size, layout=layout)
        return jnp.mean(forward.token_losses(logits, batch["targets"])[0])

    return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(a, b, tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def test_auto_is_blocked_on_cpu_and_names_are_checked():
    assert attention.resolve_impl("auto") == attention.resolve_impl(None) == "blocked"
    assert attention.resolve_impl("splash") == "splash"
    with pytest.raises(ValueError, match="flash"):
        attention.resolve_impl("flash")
    with pytest.raises(ConfigError, match="model.attention"):
        ModelConfig(attention="flash")
    with pytest.raises(ConfigError, match="model.remat"):
        ModelConfig(remat="everything")


def test_cudnn_segment_layout_lists_each_run():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5]])
    lengths, offsets = attention.cudnn_segment_layout(seg, max_segments=4)
    np.testing.assert_array_equal(lengths, [[2, 3, 3, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])
    assert attention.cudnn_segment_layout(seg)[0].shape == (2, 8)  # default: room for L segments


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernel_equals_blocked(impl):
    """One attention call in the kernel's own layout, GQA (4 query heads on 2 kv heads) and packed segments:
    values and grads."""
    head_major = attention.takes_head_major(impl)
    b, length, h, k, dh = 2, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(3), 3)
    shape_q, shape_kv = ((b, h, length, dh), (b, k, length, dh)) if head_major else ((b, length, h, dh),
                                                                                      (b, length, k, dh))
    q, kk, v = (jax.random.normal(keys[0], shape_q), jax.random.normal(keys[1], shape_kv),
                jax.random.normal(keys[2], shape_kv))
    seg = jnp.asarray(np.repeat([[1, 2, 2, 3]], b, axis=0).repeat(length // 4, axis=1))
    for segments in (None, seg):
        results = []
        for name in ("blocked", impl):
            def f(q, kk, v, name=name, segments=segments):
                return attention.attend(q, kk, v, segment_ids_BxL=segments, impl=name, head_major=head_major)

            results.append((jax.jit(f)(q, kk, v),
                            jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, kk, v)))
        np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
        assert_trees_close(results[0][1], results[1][1], 1e-4)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("cfg", [LLAMA_GQA, GPT2], ids=["llama-gqa", "gpt2"])
def test_whole_model_kernel_parity(cfg, impl):
    """A whole model on packed documents: loss and every param's grad equal the blocked path's."""
    loss_ref, grads_ref = loss_and_grads(dataclasses.replace(cfg, attention="blocked"), (2, 128, 0))
    loss, grads = loss_and_grads(dataclasses.replace(cfg, attention=impl), (2, 128, 0))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    assert_trees_close(grads, grads_ref, 1e-5)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_sharded_kernel_parity(impl):
    """Under a (data 2, fsdp 2, tensor 2) layout the kernels run in shard_map over rows and heads (4 query
    and 2 kv heads both split over tensor) and still equal the unsharded blocked path."""
    loss_ref, grads_ref = loss_and_grads(dataclasses.replace(LLAMA_GQA, attention="blocked"), (4, 128, 1))
    layout = make_layout(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(layout.mesh):
        loss, grads = loss_and_grads(dataclasses.replace(LLAMA_GQA, attention=impl), (4, 128, 1), layout)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    assert_trees_close(jax.device_get(grads), grads_ref, 1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("cfg", [LLAMA_GQA, GPT2], ids=["llama-gqa", "gpt2"])
def test_remat_gives_the_plain_models_loss_and_grads(cfg, remat):
    loss_ref, grads_ref = loss_and_grads(cfg, (2, 32, 2))
    loss, grads = loss_and_grads(dataclasses.replace(cfg, remat=remat), (2, 32, 2))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, grads_ref, 1e-5)


def test_remat_recomputes_in_the_backward_pass():
    """The backward of a remat model holds the block's forward again (a checkpoint in the jaxpr)."""
    batch = packed_batch(1, 16, LLAMA_GQA.vocab_size)
    for remat, expect in (("none", False), ("full", True)):
        cfg = dataclasses.replace(LLAMA_GQA, remat=remat)
        graphdef, params = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, g=graphdef, c=cfg: forward.batch_logits(
            g, p, batch, vocab_size=c.vocab_size).sum()))(params)
        assert ("checkpoint" in str(jaxpr) or "remat" in str(jaxpr)) == expect


# --- lowering the full train step for the real targets, on this CPU host ---------------------------------


def export_train_step(attention_impl: str, platform: str, *, remat: str = "full", disabled_checks=()):
    """jax.export of build_setup(...).train_step for regmix-1b-like shapes (2 of its 22 layers, d 2048, 16 heads,
    seq 2048, vocab 50432, bf16 compute) on a fake (data 2, fsdp 2, tensor 2) mesh of the 8 CPU devices, from
    abstract inputs only (nothing is allocated)."""
    model = dataclasses.replace(load_model_config(MODELS / "regmix-1b.yaml"), num_layers=2, attention=attention_impl,
                                remat=remat, compute_dtype="bfloat16")
    cfg = load_config(None, ["model.max_seq_len=2048", "data.seq_len=2048", "train.global_batch_size=8",
                             "logging.progress=false", "logging.tensorboard=false"]).replace(model=model)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    setup = build_setup(cfg, mesh)
    rows = jax.ShapeDtypeStruct((8, 2048), jnp.int32, sharding=setup.layout.batch_sharding(2))
    batch = {"inputs": rows, "targets": rows, "positions": rows, "segment_ids": rows,
             "loss_mask": jax.ShapeDtypeStruct((8, 2048), jnp.float32, sharding=setup.layout.batch_sharding(2))}
    exported = export.export(setup.train_step, platforms=[platform], disabled_checks=list(disabled_checks))(
        setup.abstract_state, batch)
    assert exported.nr_devices == 8 and exported.platforms == (platform,)
    return exported.mlir_module()


def test_train_step_exports_for_tpu_with_splash_remat_bf16():
    text = export_train_step("splash", "tpu")
    assert "tpu_custom_call" in text  # the Mosaic splash kernels, not the interpret fallback
    assert "bf16" in text and "optimization_barrier" in text  # bf16 compute; remat's recomputation fence
    assert "x1x2048x2048xi1>" not in text  # no dense [B, 1, L, L] mask


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_train_step_exports_for_cuda(impl):
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if impl == "pallas_gpu" else []
    text = export_train_step(impl, "cuda", remat="dots_with_no_batch_dims_saveable", disabled_checks=checks)
    assert ("__gpu$xla.gpu.triton" in text) == (impl == "pallas_gpu")
