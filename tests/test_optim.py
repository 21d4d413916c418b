"""Schedules against hand-computed values; the decay mask; AdamW settings reach optax."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mixlm.config import OptimizerConfig, ScheduleConfig
from mixlm.optim import decay_mask, make_optimizer, make_schedule, warmup_steps

OPT = OptimizerConfig(lr=1e-3)


def lr_at(kind, step, total=100, **kw):
    return float(make_schedule(OPT, ScheduleConfig(kind=kind, **kw), total)(step))


def test_cosine_schedule_hand_values():
    kw = {"warmup_steps": 10, "min_lr": 1e-4}
    assert lr_at("cosine", 0, **kw) == pytest.approx(1e-4)  # 1e-3 * 1/10
    assert lr_at("cosine", 4, **kw) == pytest.approx(5e-4)  # 1e-3 * 5/10
    assert lr_at("cosine", 10, **kw) == pytest.approx(1e-3)  # p = 0
    # p = (55 - 10) / 90 = 0.5 -> floor + (peak - floor) / 2
    assert lr_at("cosine", 55, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    # p = 40/90: 1e-4 + 9e-4 * (1 + cos(pi * 4/9)) / 2
    assert lr_at("cosine", 50, **kw) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi * 4 / 9)) / 2, rel=1e-5)
    assert lr_at("cosine", 100, **kw) == pytest.approx(1e-4)
    assert lr_at("cosine", 150, **kw) == pytest.approx(1e-4)  # stays at the floor


def test_linear_constant_wsd_hand_values():
    assert lr_at("constant", 3, warmup_steps=4) == pytest.approx(1e-3)
    assert lr_at("constant", 1, warmup_steps=4) == pytest.approx(5e-4)
    assert lr_at("constant", 90, warmup_steps=4) == pytest.approx(1e-3)
    # linear: p = (60 - 20) / 80 = 0.5 -> 1e-3 + (0 - 1e-3) * 0.5
    assert lr_at("linear", 60, warmup_steps=20) == pytest.approx(5e-4)
    # wsd, 100 steps, decay over the last 20: stable until 80, half way at 90, floor at 100
    kw = {"warmup_steps": 10, "decay_fraction": 0.2, "min_lr": 0.0}
    assert lr_at("wsd", 50, **kw) == pytest.approx(1e-3)
    assert lr_at("wsd", 80, **kw) == pytest.approx(1e-3)
    assert lr_at("wsd", 90, **kw) == pytest.approx(5e-4)
    assert lr_at("wsd", 100, **kw) == pytest.approx(0.0, abs=1e-12)


def test_warmup_fraction():
    assert warmup_steps(ScheduleConfig(warmup_fraction=0.02), 8100) == 162  # gpt2-70m: 2% of steps
    assert warmup_steps(ScheduleConfig(warmup_steps=7, warmup_fraction=0.5), 100) == 7


def test_decay_mask_by_logical_axes():
    axes = {
        "embed_tokens": {"embedding": ("vocab", "embed")},
        "wpe": {"embedding": ("position", "embed")},
        "lm_head": {"kernel": ("embed", "vocab")},
        "norm": {"scale": ("norm",)},
        "mlp": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    }
    m = decay_mask(axes, decay_embeddings=False)
    assert m == {
        "embed_tokens": {"embedding": False}, "wpe": {"embedding": False}, "lm_head": {"kernel": True},
        "norm": {"scale": False}, "mlp": {"kernel": True, "bias": False},
    }
    assert decay_mask(axes, decay_embeddings=True)["embed_tokens"]["embedding"] is True


def test_adamw_applies_decay_only_where_masked_and_clips():
    axes = {"w": ("embed", "mlp"), "b": ("mlp",)}
    opt = OptimizerConfig(lr=0.1, b1=0.0, b2=0.0, eps=1e-12, weight_decay=0.5, clip_norm=0.0)
    tx, _ = make_optimizer(opt, ScheduleConfig(kind="constant"), 10, axes)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradient: Adam term is 0 (0/eps); decoupled decay = -lr * wd * param on "w" only
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0, atol=1e-12)

    # With a huge eps Adam's first step is ≈ -lr * g / eps, so the clipped gradient shows through.
    opt = OptimizerConfig(lr=1.0, b1=0.9, b2=0.999, eps=1e3, weight_decay=0.0, clip_norm=1.0)
    clip_tx, _ = make_optimizer(opt, ScheduleConfig(kind="constant"), 10, axes)
    big = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 4.0)}
    updates, _ = clip_tx.update(big, clip_tx.init(params), params)
    norm = math.sqrt(4 * 9 + 2 * 16)  # global norm of the raw gradient
    for k, g in (("w", 3.0), ("b", 4.0)):
        g_clipped = g / norm
        np.testing.assert_allclose(updates[k], -g_clipped / (g_clipped + 1e3), rtol=1e-5)
