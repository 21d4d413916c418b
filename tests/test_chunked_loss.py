"""The chunked cross-entropy (mixlm.models.forward.loss_sums / batch_loss_sums): the same values and gradients
as the whole-logits loss it replaced, and no [B, L, V] float32 array anywhere in the differentiated step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixlm import models
from mixlm.config import ModelConfig
from mixlm.models import forward
from mixlm.train import batch_sums

# float32 sums over <= 64 tokens of values ~log(V) ~ 3: a few ulps of each term, summed.
TOL = {"rtol": 2e-5, "atol": 2e-5}


def whole_logits_sums(hidden_BxLxD, kernel_DxV, targets_BxL, mask_BxL, vocab_size, z_loss):
    """The loss as it was computed before chunking: whole float32 logits, token_losses, masked sums."""
    logits = forward.mask_padded_vocab(jnp.dot(hidden_BxLxD, kernel_DxV, preferred_element_type=jnp.float32),
                                       vocab_size)
    nll, log_z = forward.token_losses(logits, targets_BxL)
    nll_sum, z_sum = jnp.sum(nll * mask_BxL), jnp.sum(jnp.square(log_z) * mask_BxL)
    return nll_sum + z_loss * z_sum, nll_sum, z_sum


@pytest.fixture(scope="module")
def loss_inputs():
    rng = np.random.default_rng(0)
    batch, length, d, v_pad, vocab = 2, 16, 8, 12, 10  # ids 10, 11 are padding
    hidden = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v_pad)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    mask = jnp.asarray(rng.random((batch, length)) > 0.25, jnp.float32)
    return hidden, kernel, targets, mask, vocab


@pytest.mark.parametrize("chunk_len", [1, 4, 16])
def test_loss_sums_equal_whole_logits_values_and_gradients(loss_inputs, chunk_len):
    hidden, kernel, targets, mask, vocab = loss_inputs
    z_loss = 0.05  # large enough that a wrong z-loss gradient shows

    def chunked(h, k):
        return forward.loss_sums(h, k, targets, mask, vocab_size=vocab, z_loss=z_loss, chunk_len=chunk_len)

    got = jax.jit(chunked)(hidden, kernel)
    want = whole_logits_sums(hidden, kernel, targets, mask, vocab, z_loss)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)
    grads = jax.jit(jax.grad(lambda h, k: chunked(h, k)[0], argnums=(0, 1)))(hidden, kernel)
    ref = jax.grad(lambda h, k: whole_logits_sums(h, k, targets, mask, vocab, z_loss)[0], argnums=(0, 1))(
        hidden, kernel)
    for g, w in zip(grads, ref):
        np.testing.assert_allclose(g, w, **TOL)
    # padded vocabulary rows never receive probability, so their kernel columns get no gradient
    np.testing.assert_array_equal(grads[1][:, vocab:], 0.0)


def test_loss_sums_metrics_carry_no_gradient(loss_inputs):
    hidden, kernel, targets, mask, vocab = loss_inputs
    g = jax.grad(lambda h: forward.loss_sums(h, kernel, targets, mask, vocab_size=vocab, z_loss=0.0,
                                             chunk_len=4)[1])(hidden)
    np.testing.assert_array_equal(g, 0.0)


def test_loss_chunk_len_is_the_longest_divisor_within_the_budget():
    # 4 rows x c positions x 10 vocab x 4 bytes <= 640 bytes -> c <= 4; 16 % 4 == 0
    assert forward.loss_chunk_len(4, 16, 10, budget_bytes=640) == 4
    assert forward.loss_chunk_len(4, 12, 10, budget_bytes=640) == 4
    assert forward.loss_chunk_len(4, 10, 10, budget_bytes=640) == 2  # 4 does not divide 10
    assert forward.loss_chunk_len(4, 16, 10, budget_bytes=1) == 1


# vocab 200 padded to 256: the padded ids must stay out of the loss
TINY = {
    "llama": ModelConfig(family="llama", num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         vocab_size=200, max_seq_len=32, vocab_multiple=128),
    "gpt2": ModelConfig(family="gpt2", num_layers=2, d_model=32, num_heads=4, mlp_dim=64, vocab_size=200,
                        max_seq_len=32, vocab_multiple=128, tie_embeddings=True),
}


def tiny_model(family: str):
    cfg = TINY[family]
    graphdef, params = models.split_params(models.build_model(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 32)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 32)), jnp.int32),
        "loss_mask": jnp.asarray(rng.random((2, 32)) > 0.2, jnp.float32),
    }
    return cfg, graphdef, params, batch


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_objective_and_param_gradients_unchanged(family, monkeypatch):
    """batch_sums (chunked: 32 positions in 4 chunks of 8) against the whole-logits objective of the same model."""
    cfg, graphdef, params, batch = tiny_model(family)
    vocab, z_loss = cfg.vocab_size, 1e-3
    monkeypatch.setattr(forward, "LOSS_CHUNK_BYTES", 2 * 8 * cfg.padded_vocab_size() * 4)

    def whole(p):
        logits = forward.batch_logits(graphdef, p, batch, vocab_size=vocab)
        nll, log_z = forward.token_losses(logits, batch["targets"])
        m = batch["loss_mask"]
        return jnp.sum(nll * m) + z_loss * jnp.sum(jnp.square(log_z) * m)

    def chunked(p):
        return batch_sums(graphdef, p, batch, vocab_size=vocab, z_loss=z_loss)[0]

    np.testing.assert_allclose(jax.jit(chunked)(params), jax.jit(whole)(params), **TOL)
    got, want = jax.jit(jax.grad(chunked))(params), jax.jit(jax.grad(whole))(params)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_online_mixing_terms_in_the_chunks_equal_whole_logits(family, monkeypatch):
    """Online mixing's terms, computed in the same 4 chunks as the loss: per-row objective weights (the objective
    and every parameter gradient), the unweighted metrics, and each domain's summed loss, tokens and loss in
    excess of a reference model's equal the whole-logits computation of the same model."""
    cfg, graphdef, params, batch = tiny_model(family)
    vocab, z_loss = cfg.vocab_size, 1e-3
    monkeypatch.setattr(forward, "LOSS_CHUNK_BYTES", 2 * 8 * cfg.padded_vocab_size() * 4)
    reference = np.random.default_rng(2).normal(np.log(vocab), 0.3, (2, 32))  # near an untrained model's loss
    batch = {**batch, "loss_weights": jnp.asarray([0.25, 3.0], jnp.float32), "domain_ids": jnp.asarray([1, 0]),
             "reference_nll": jnp.asarray(reference, jnp.float32)}

    def whole(p):
        nll, log_z = forward.token_losses(forward.batch_logits(graphdef, p, batch, vocab_size=vocab), batch["targets"])
        weight = batch["loss_mask"] * batch["loss_weights"][:, None]
        return jnp.sum((nll + z_loss * jnp.square(log_z)) * weight), nll

    def chunked(p):
        return batch_sums(graphdef, p, batch, vocab_size=vocab, z_loss=z_loss, num_domains=2)

    objective, (nll_sum, _, tokens, per_domain) = jax.jit(chunked)(params)
    want, nll = jax.jit(whole)(params)
    np.testing.assert_allclose(objective, want, **TOL)
    mask, nll = np.asarray(batch["loss_mask"]), np.asarray(nll)
    np.testing.assert_allclose(nll_sum, np.sum(nll * mask), **TOL)  # the metrics stay unweighted
    assert float(tokens) == mask.sum()
    # row 0 is domain 1, row 1 domain 0
    np.testing.assert_allclose(per_domain["domain_nll"], np.sum(nll * mask, axis=1)[::-1], **TOL)
    np.testing.assert_array_equal(per_domain["domain_tokens"], mask.sum(axis=1)[::-1])
    excess = np.maximum(nll - np.asarray(batch["reference_nll"]), 0.0) * mask
    np.testing.assert_allclose(per_domain["domain_excess"], excess.sum(axis=1)[::-1], **TOL)
    assert 0 < excess.sum() < np.sum(nll * mask)  # the reference is above and below the model's loss
    got, ref = jax.jit(jax.grad(lambda p: chunked(p)[0]))(params), jax.jit(jax.grad(lambda p: whole(p)[0]))(params)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _array_shapes(jaxpr) -> list[tuple]:
    """(shape, dtype) of every value in a closed jaxpr and the jaxprs nested in its equations."""
    out = []
    for eqn in jaxpr.eqns:
        out += [(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _array_shapes(inner)
    return out


def test_differentiated_step_never_holds_the_whole_logits(monkeypatch):
    cfg, graphdef, params, batch = tiny_model("llama")
    v_pad = cfg.padded_vocab_size()
    monkeypatch.setattr(forward, "LOSS_CHUNK_BYTES", 2 * 8 * v_pad * 4)  # 8 positions per chunk
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: batch_sums(graphdef, p, batch, vocab_size=cfg.vocab_size,
                                                         z_loss=0.0)[0]))(params)
    shapes = _array_shapes(jaxpr.jaxpr)
    assert ((2, 8, v_pad), jnp.dtype(jnp.float32)) in shapes  # a chunk's logits
    kernel = (cfg.d_model, v_pad)  # the LM head and its gradient
    whole = [s for s, _ in shapes if s[-1:] == (v_pad,) and s != kernel and int(np.prod(s[:-1])) > 2 * 8]
    assert not whole, f"arrays wider than one chunk of logits: {whole}"
