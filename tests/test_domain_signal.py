"""The per-domain training signal of the train step: each domain's summed loss and tokens from one segment-sum
in the same step equal a separate forward per domain, also sharded and with gradient accumulation; objective
weights scale each domain's gradient; a reference's per-token losses give DoReMi's clipped excess."""

import jax
import numpy as np
import pytest
from test_train import TINY, make_cfg

from mixlm.config import MeshConfig
from mixlm.data.synthetic import SyntheticSource
from mixlm.models import forward
from mixlm.sharding import make_mesh, to_global_batch
from mixlm.train import batch_sums, build_setup

DOMAIN_IDS = np.array([0, 2, 1, 0, 2, 2, 1, 0], np.int32)  # 8 rows of 3 domains


def domain_batch():
    src = SyntheticSource(vocab_size=TINY.vocab_size, seq_len=16, batch_size=8, seed=4)
    batch = src.next_batch()
    batch["loss_mask"][1, 3:9] = 0.0  # uneven token counts: domain 2 loses 6 targets
    batch["loss_mask"][6, :] = 0.0  # a row with no loss tokens at all
    batch["domain_ids"] = DOMAIN_IDS.copy()
    return batch


def only_rows(batch, rows):
    out = {k: v.copy() for k, v in batch.items()}
    keep = np.zeros(len(DOMAIN_IDS), bool)
    keep[rows] = True
    out["loss_mask"][~keep] = 0.0
    return out


@pytest.mark.parametrize("mesh_shape, accum", [((1, 1, 1), 1), ((2, 2, 2), 2)])
def test_per_domain_sums_equal_a_separate_forward_per_domain(mesh_shape, accum):
    cfg = make_cfg(grad_accum_steps=accum)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=devices)
    setup = build_setup(cfg, mesh, num_domains=3)
    state = setup.init_state(jax.random.key(0))
    params = jax.device_get(state.params)
    batch = domain_batch()
    _, metrics = setup.train_step(state, to_global_batch(batch, mesh))
    got_nll, got_tokens = np.asarray(metrics["domain_nll"]), np.asarray(metrics["domain_tokens"])
    assert "domain_excess" not in metrics
    # Hand check: one forward per domain over only its rows, with the eval step (no segment-sum involved).
    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    plain = build_setup(make_cfg(), one)
    for d in range(3):
        nll, tokens = plain.eval_step(params, to_global_batch(only_rows(batch, DOMAIN_IDS == d), one))
        assert got_tokens[d] == float(tokens) == batch["loss_mask"][DOMAIN_IDS == d].sum()
        # float32 sums of ~50 terms of ~5 in other orders: a few ulps of the total.
        assert got_nll[d] == pytest.approx(float(nll), rel=1e-5)
    assert got_nll.sum() == pytest.approx(float(metrics["loss"]) * got_tokens.sum(), rel=1e-5)


def test_objective_weights_scale_each_domains_gradient():
    cfg = make_cfg()
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    setup = build_setup(cfg, mesh)
    params = setup.init_state(jax.random.key(1)).params
    batch = domain_batch()
    multipliers = np.array([0.5, 2.0, 0.0], np.float32)

    objective_grad = jax.jit(jax.grad(lambda p, b: batch_sums(setup.graphdef, p, b, vocab_size=TINY.vocab_size,
                                                              z_loss=0.0)[0]))

    def grad_of(b):
        return objective_grad(params, to_global_batch(b, mesh))

    weighted = dict(batch, loss_weights=multipliers[DOMAIN_IDS])
    got = grad_of(weighted)
    parts = [grad_of(only_rows(batch, DOMAIN_IDS == d)) for d in range(3)]
    want = jax.tree.map(lambda *g: sum(m * x for m, x in zip(multipliers, g)), *parts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)
    # The metrics stay the plain loss: objective weights change the gradient, not what is reported.
    _, (nll_w, _, tokens_w, _) = batch_sums(setup.graphdef, params, to_global_batch(weighted, mesh),
                                            vocab_size=TINY.vocab_size, z_loss=0.0)
    _, (nll, _, tokens, _) = batch_sums(setup.graphdef, params, to_global_batch(batch, mesh),
                                        vocab_size=TINY.vocab_size, z_loss=0.0)
    assert float(nll_w) == float(nll) and float(tokens_w) == float(tokens)


def test_reference_losses_give_the_clipped_excess_per_domain():
    cfg = make_cfg()
    mesh = make_mesh(MeshConfig(2, 2, 2))
    setup = build_setup(cfg, mesh, num_domains=3)
    state = setup.init_state(jax.random.key(2))
    params = jax.device_get(state.params)
    batch = domain_batch()
    logits = forward.batch_logits(setup.graphdef, params, {k: jax.numpy.asarray(v) for k, v in batch.items()},
                                  vocab_size=TINY.vocab_size)
    nll = np.asarray(forward.token_losses(logits, batch["targets"])[0], np.float64)
    reference = nll + np.random.default_rng(0).normal(0, 0.5, nll.shape)  # above and below the model's loss
    batch["reference_nll"] = reference.astype(np.float32)
    _, metrics = setup.train_step(state, to_global_batch(batch, mesh))
    excess = np.maximum(nll - batch["reference_nll"], 0) * batch["loss_mask"]
    want = [excess[DOMAIN_IDS == d].sum() for d in range(3)]
    np.testing.assert_allclose(np.asarray(metrics["domain_excess"]), want, rtol=1e-4, atol=1e-4)
