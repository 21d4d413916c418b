"""Learning-rate schedules and the AdamW chain.

Schedules (t = optimizer step, 0-based; W = warmup steps; T = total steps; lr = peak; m = min_lr):
  warmup    t < W:  lr * (t + 1) / W            (the first step already learns)
  cosine    t ≥ W:  m + (lr - m) * (1 + cos(pi * p)) / 2,   p = (t - W) / (T - W) clipped to [0, 1]
  linear    t ≥ W:  lr + (m - lr) * p
  constant  t ≥ W:  lr
  wsd       t ≥ W:  lr until T - D, then linear to m at T;   D = round(decay_fraction * T)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mixlm.config import OptimizerConfig, ScheduleConfig
from mixlm.sharding import is_logical_axes


def warmup_steps(sched: ScheduleConfig, total_steps: int) -> int:
    return sched.warmup_steps or round(sched.warmup_fraction * total_steps)


def make_schedule(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the (0-based) optimizer step."""
    lr, floor = opt.lr, sched.min_lr
    warm = warmup_steps(sched, total_steps)
    decay_len = max(total_steps - warm, 1)
    wsd_decay = max(round(sched.decay_fraction * total_steps), 1)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm_lr = lr * (t + 1.0) / max(warm, 1)
        p = jnp.clip((t - warm) / decay_len, 0.0, 1.0)
        if sched.kind == "cosine":
            after = floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif sched.kind == "linear":
            after = lr + (floor - lr) * p
        elif sched.kind == "constant":
            after = jnp.full_like(t, lr)
        else:  # wsd
            q = jnp.clip((t - (total_steps - wsd_decay)) / wsd_decay, 0.0, 1.0)
            after = lr + (floor - lr) * q
        return jnp.where(t < warm, warm_lr, after)

    return schedule


def decay_mask(logical_axes, *, decay_embeddings: bool):
    """True where weight decay applies: matrices yes, norms and biases (1-D) never, embedding tables
    (first logical axis 'vocab' or 'position') only when `decay_embeddings`. A leading 'layers' axis
    (model.scan_layers stacks the blocks) is not counted: a stacked norm scale [layers, norm] is 1-D."""

    def decays(axes) -> bool:
        if axes and axes[0] == "layers":
            axes = axes[1:]
        if len(axes) < 2:
            return False
        if axes[0] in ("vocab", "position"):
            return decay_embeddings
        return True

    return jax.tree.map(decays, logical_axes, is_leaf=is_logical_axes)


def make_optimizer(
    opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int, logical_axes
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm → AdamW(schedule, β1, β2, eps, masked weight decay). optimizer.moments_dtype
    bfloat16 stores the first moment (mu) in bf16, halving its bytes; the second moment (nu) stays float32
    (its squares of small gradients underflow bf16's 8-bit mantissa) and the update is computed in float32."""
    schedule = make_schedule(opt, sched, total_steps)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=decay_mask(logical_axes, decay_embeddings=opt.decay_embeddings),
        mu_dtype=jnp.dtype(opt.moments_dtype),
    )
    if opt.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw), schedule
    return adamw, schedule
