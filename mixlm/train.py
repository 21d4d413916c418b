"""Train state, one jitted train step, the eval step, and the loop (its features are mixlm.hooks).

The state is a pytree of plain arrays (step, params as a nested dict, optax state) so that jit,
sharding and Orbax see ordinary values; the NNX module is rebuilt from (graphdef, params) inside the
step. Each parameter is sharded by its logical axes (mixlm.sharding) and the state is initialised
directly into those shardings (never materialised on one device).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mixlm import models
from mixlm.checkpoint import RunCheckpoints, checkpoint_dir, resolve_step_dir, restore_params
from mixlm.config import ExperimentConfig, save_config, validate_for_mesh
from mixlm.data import make_train_source
from mixlm.hooks import Hook, NonFiniteLossError, Run, StepMeter, default_hooks, evaluate
from mixlm.metrics import MetricsLog, peak_flops_per_device
from mixlm.models import forward
from mixlm.models.forward import token_losses
from mixlm.optim import make_optimizer
from mixlm.sharding import DEFAULT_RULES, AxisRules, Layout, make_mesh, to_global_batch

__all__ = ["NonFiniteLossError", "TrainResult", "TrainSetup", "TrainState", "batch_sums", "build_setup", "evaluate",
           "program_key", "token_losses", "train"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: Any


def batch_sums(graphdef, params: dict, batch: dict, *, vocab_size: int, z_loss: float, layout: Layout | None = None,
               num_domains: int = 0):
    """Summed (not averaged) objective over the batch's unmasked tokens, so micro-batches add up
    exactly to the large batch. Returns (objective, (nll_sum, z_sum, tokens, per_domain)).

    A batch may carry 'loss_weights' [B] (per-row multipliers of the objective: online mixing's objective
    weights, DoReMi's); nll_sum, z_sum and tokens stay unweighted. With `num_domains` and the batch's
    'domain_ids' [B], `per_domain` holds one segment-sum over rows of {'domain_nll', 'domain_tokens'} [D] (and
    'domain_excess' [D], the summed max(nll - reference_nll, 0), when the batch carries a reference model's
    per-token 'reference_nll' [B, L]); else it is empty."""
    logits_BxLxV = forward.batch_logits(graphdef, params, batch, vocab_size=vocab_size, layout=layout)
    nll_BxL, log_z_BxL = forward.token_losses(logits_BxLxV, batch["targets"])
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    nll_sum = jnp.sum(nll_BxL * mask_BxL)
    z_sum = jnp.sum(jnp.square(log_z_BxL) * mask_BxL)
    objective = nll_sum + z_loss * z_sum
    if "loss_weights" in batch:
        weight_BxL = mask_BxL * batch["loss_weights"].astype(jnp.float32)[:, None]
        objective = jnp.sum((nll_BxL + z_loss * jnp.square(log_z_BxL)) * weight_BxL)
    per_domain = {}
    if num_domains and "domain_ids" in batch:
        per_domain = domain_sums(jax.lax.stop_gradient(nll_BxL), mask_BxL, batch["domain_ids"], num_domains,
                                 batch.get("reference_nll"))
    return objective, (nll_sum, z_sum, jnp.sum(mask_BxL), per_domain)


def domain_sums(nll_BxL: jax.Array, mask_BxL: jax.Array, domain_ids_B: jax.Array, num_domains: int,
                reference_nll_BxL: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-domain sums [D] of a batch's per-token losses, by one segment-sum over its rows (a packed row holds
    one domain's documents, so a row's domain is each of its segments' domain): 'domain_nll' (summed loss),
    'domain_tokens' (loss tokens) and, with a reference's per-token losses, 'domain_excess' (summed
    max(nll - reference, 0): DoReMi's clipped excess loss)."""
    columns = [jnp.sum(nll_BxL * mask_BxL, axis=1), jnp.sum(mask_BxL, axis=1)]
    if reference_nll_BxL is not None:
        columns.append(jnp.sum(jnp.maximum(nll_BxL - reference_nll_BxL, 0.0) * mask_BxL, axis=1))
    sums_DxC = jax.ops.segment_sum(jnp.stack(columns, axis=1), domain_ids_B, num_segments=num_domains)
    names = ("domain_nll", "domain_tokens", "domain_excess")
    return {name: sums_DxC[:, i] for i, name in enumerate(names[: len(columns)])}


def split_microbatches(batch: dict, k: int) -> dict:
    """[k*b, ...] → [k, b, ...], micro-batch i = rows i, i+k, i+2k, ...: every device keeps its own rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, vocab_size: int, z_loss: float,
                    grad_accum_steps: int, layout: Layout | None = None, num_domains: int = 0) -> Callable:
    """train_step(state, batch) -> (state, metrics): one optimizer step over the whole batch. With
    `num_domains`, metrics also hold the per-domain sums of batch_sums ('domain_nll', 'domain_tokens'[,
    'domain_excess'], each [num_domains]) of batches that carry 'domain_ids'."""
    grad_fn = jax.value_and_grad(
        lambda p, b: batch_sums(graphdef, p, b, vocab_size=vocab_size, z_loss=z_loss, layout=layout,
                                num_domains=num_domains), has_aux=True
    )

    def train_step(state: TrainState, batch: dict):
        if grad_accum_steps == 1:
            (_, (nll_sum, z_sum, tokens, per_domain)), grad_sums = grad_fn(state.params, batch)
        else:
            micro_batches = split_microbatches(batch, grad_accum_steps)

            def micro_step(carry, micro):
                acc_grads, acc = carry
                (_, aux), g = grad_fn(state.params, micro)
                return (jax.tree.map(jnp.add, acc_grads, g), jax.tree.map(jnp.add, acc, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            _, aux_shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches))[0]
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
            (grad_sums, (nll_sum, z_sum, tokens, per_domain)), _ = jax.lax.scan(micro_step, init, micro_batches)
        n = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / n, grad_sums)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": nll_sum / n,
            "log_z_sq": z_sum / n,  # mean log(Z)^2: the z-loss statistic (penalised only with train.z_loss > 0)
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            "lr": schedule(state.step),
            "tokens_step": tokens,  # loss tokens of this step (the meter adds tokens_total, cumulative)
            **per_domain,  # [num_domains] vectors: the meter logs train_loss/<domain>, online mixing reads them
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef, *, vocab_size: int, layout: Layout | None = None) -> Callable:
    """eval_step(params, batch) -> (nll_sum, tokens)."""

    def eval_step(params, batch):
        _, (nll_sum, _, tokens, _) = batch_sums(graphdef, params, batch, vocab_size=vocab_size, z_loss=0.0,
                                                layout=layout)
        return nll_sum, tokens

    return eval_step


@dataclasses.dataclass
class TrainSetup:
    """Everything derived from a config and a mesh, before any array is allocated."""

    cfg: ExperimentConfig
    layout: Layout  # the mesh and the rule table
    graphdef: Any
    logical_axes: dict
    tx: optax.GradientTransformation
    schedule: Callable
    abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
    state_shardings: TrainState
    init_state: Callable  # jitted: key -> TrainState, born sharded
    train_step: Callable  # jitted, donates the state
    eval_step: Callable
    # The same three functions before jit, for programs built around them (mixlm.swarm maps them over members).
    init_fn: Callable | None = None  # key -> TrainState
    step_fn: Callable | None = None  # (state, batch) -> (state, metrics)
    eval_fn: Callable | None = None  # (params, batch) -> (nll_sum, tokens)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.layout.mesh

    @property
    def flops_per_token(self) -> float:
        return models.flops_per_token(self.cfg.model, self.cfg.data.seq_len, causal=True)


# Config keys that never reach the compiled programs: runs that differ only in these share one TrainSetup.
PROGRAM_FREE_SECTIONS = ("data", "eval", "logging", "checkpoint", "mixing")
PROGRAM_FREE_TRAIN_KEYS = ("seed", "output_dir", "heartbeat_timeout_s")
SETUP_CACHE_SIZE = 8
_setup_cache: collections.OrderedDict = collections.OrderedDict()


def program_key(cfg: ExperimentConfig) -> str:
    """The parts of `cfg` that change build_setup's jitted programs (model, optimizer, schedule, mesh, the
    train keys other than seed / output_dir): proxies of a sweep, which differ in mixture, seed and output
    folder, have one key. Batch shapes are not in it: jit itself compiles once per shape."""
    d = cfg.to_dict()
    for section in PROGRAM_FREE_SECTIONS:
        d.pop(section, None)
    d["train"] = {k: v for k, v in d["train"].items() if k not in PROGRAM_FREE_TRAIN_KEYS}
    return json.dumps(d, sort_keys=True, default=repr)


def make_init_fn(cfg: ExperimentConfig, tx: optax.GradientTransformation, vocab_multiple_of: int) -> Callable:
    """init_fn(key) -> TrainState: step 0, params from `key`, a fresh optimizer state."""

    def init_fn(key) -> TrainState:
        model = models.build_model(cfg.model, rngs=nnx.Rngs(params=key), vocab_multiple_of=vocab_multiple_of)
        _, params = models.split_params(model)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init_fn


def build_setup(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, *, rules: AxisRules | None = None,
                num_domains: int = 0) -> TrainSetup:
    """Shardings, optimizer and the jitted functions for `cfg` on `mesh` (rules: DEFAULT_RULES with
    mesh.rules over them, or `rules` as given). The vocabulary is padded to a multiple of the mesh axes that
    split it (and of model.vocab_multiple), not of the device count, so checkpoints keep their shapes across
    meshes.

    `num_domains`: the train step also sums each batch's loss and tokens per domain (its 'domain_ids'), the
    training signal of every domain (train_loss/<domain>) and of online mixing; 0 leaves it out.

    Cached: a config with the same program_key on the same mesh (the next proxy of an in-process sweep) gets
    the same jitted functions back, with its own `cfg`, so it compiles nothing again."""
    key = (program_key(cfg), mesh, rules, num_domains)
    cached = _setup_cache.get(key)
    if cached is not None:
        _setup_cache.move_to_end(key)
        return dataclasses.replace(cached, cfg=cfg)
    setup = _build_setup(cfg, mesh, rules, num_domains)
    _setup_cache[key] = setup
    while len(_setup_cache) > SETUP_CACHE_SIZE:
        _setup_cache.popitem(last=False)
    return setup


def _build_setup(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, rules: AxisRules | None,
                 num_domains: int = 0) -> TrainSetup:
    layout = Layout(mesh, rules or DEFAULT_RULES.with_overrides(cfg.mesh.rules), strict=cfg.mesh.strict)
    vocab_multiple_of = layout.axis_size("vocab")
    graphdef, abstract_params, logical_axes = models.abstract_params(cfg.model, vocab_multiple_of)
    p_shardings = layout.param_shardings(abstract_params, logical_axes)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.schedule, cfg.train.steps, logical_axes)
    init_fn = make_init_fn(cfg, tx, vocab_multiple_of)

    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, p_shardings, transform_non_params=lambda _: layout.replicated()
    )
    state_shardings = TrainState(step=layout.replicated(), params=p_shardings, opt_state=opt_shardings)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
    )
    step_fn = make_train_step(
        graphdef, tx, schedule, vocab_size=cfg.model.vocab_size, z_loss=cfg.train.z_loss,
        grad_accum_steps=cfg.train.grad_accum_steps, layout=layout, num_domains=num_domains,
    )
    eval_fn = make_eval_step(graphdef, vocab_size=cfg.model.vocab_size, layout=layout)
    return TrainSetup(
        cfg=cfg, layout=layout, graphdef=graphdef, logical_axes=logical_axes, tx=tx, schedule=schedule,
        abstract_state=abstract_state, state_shardings=state_shardings,
        init_state=jax.jit(init_fn, out_shardings=state_shardings),
        train_step=jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, layout.replicated())),
        eval_step=jax.jit(eval_fn), init_fn=init_fn, step_fn=step_fn, eval_fn=eval_fn,
    )


def check_batch_shape(host_batch: dict, cfg: ExperimentConfig) -> None:
    rows = host_batch["inputs"].shape[0] * jax.process_count()
    if rows != cfg.train.global_batch_size:
        raise ValueError(f"data source gave {rows} global rows, expected train.global_batch_size={cfg.train.global_batch_size}")
    if (host_batch["inputs"].shape[0]) % cfg.train.grad_accum_steps:
        raise ValueError(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps} must divide the per-host batch "
            f"{host_batch['inputs'].shape[0]}"
        )


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]  # one metrics dict per logged step
    eval: dict[str, float]
    out_dir: Path
    preempted_at: int | None = None  # the step saved before stopping on SIGTERM/SIGINT, else None


def state_from_params(setup: TrainSetup, params: dict) -> TrainState:
    """Step 0 and a fresh optimizer state around `params` (checkpoint.init_from)."""
    fresh = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=setup.tx.init(p)),
                    out_shardings=setup.state_shardings, donate_argnums=(0,))
    return fresh(params)


def trim_metrics_log(path: Path, last_step: int, *, writer: bool | None = None) -> None:
    """Keeps the rows of metrics.jsonl up to `last_step` (dropping a torn last line), so that a resumed run
    continues the file instead of repeating the steps it redoes. `writer`: whether this process owns the file
    (default: process 0)."""
    if not (jax.process_index() == 0 if writer is None else writer) or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def initial_state(setup: TrainSetup, checkpoints, source, *, allow_config_change: bool,
                  say: Callable[[str], None], on_data_state: Callable[[dict], None] | None = None) -> TrainState:
    """Resumes from the newest good checkpoint of this output folder (state and data position), else
    initialises from `checkpoint.init_from` (params only: fresh optimizer, step 0, data from the start),
    else from `train.seed`. `on_data_state` hears the resumed checkpoint's whole data state (with the hooks'
    states)."""
    cfg = setup.cfg
    resumed = checkpoints.restore_latest(setup.abstract_state, cfg, allow_config_change=allow_config_change)
    if resumed is not None:
        source.set_state(resumed.data_state)
        if on_data_state is not None:
            on_data_state(resumed.data_state)
        init_from = cfg.checkpoint.init_from
        note = f"; checkpoint.init_from={init_from!r} ignored (this folder has its own)" if init_from else ""
        say(f"resumed from {resumed.path} (step {resumed.step}, "
            f"{resumed.meta.get('tokens_seen_total', 0):,} tokens seen){note}")
        return resumed.state
    if cfg.checkpoint.init_from:
        step_dir = resolve_step_dir(cfg.checkpoint.init_from)
        params = restore_params(step_dir, setup.abstract_state.params, cfg.model.vocab_size)
        say(f"initialised params from {step_dir}; fresh optimizer state, step 0, data from the start")
        return state_from_params(setup, params)
    return setup.init_state(jax.random.key(cfg.train.seed))


def open_run(cfg: ExperimentConfig, setup: TrainSetup, source, *, log_fn: Callable[[str], None] | None,
             allow_config_change: bool) -> Run:
    """Resumes or initialises the state, then (only after the config check passed, so a refused run leaves the
    folder as it was) writes config.yaml, opens the metrics log and prints what is about to run."""
    out_dir = Path(cfg.train.output_dir)
    early_say = log_fn or (lambda text: print(text, flush=True) if jax.process_index() == 0 else None)
    checkpoints = RunCheckpoints(checkpoint_dir(out_dir), cfg.checkpoint, log=early_say)
    restored: dict = {}
    try:
        state = initial_state(setup, checkpoints, source, allow_config_change=allow_config_change, say=early_say,
                              on_data_state=restored.update)
    except BaseException:
        checkpoints.close()
        raise
    start_step = int(state.step)
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    trim_metrics_log(out_dir / "metrics.jsonl", start_step)
    peak, peak_source = peak_flops_per_device(cfg.logging.peak_flops)
    log = MetricsLog.for_run(out_dir, cfg, start_step=start_step)
    say = checkpoints.log = log_fn or log.message
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
    say(f"mixlm train: {cfg.model.name or cfg.model.family} ({n_params:,} params incl. padding), mesh "
        f"{dict(setup.mesh.shape)}, {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens/step, "
        f"{setup.flops_per_token / 1e6:.1f} MFLOP/token (attention counted causally), peak {peak / 1e9:,.1f} "
        f"GFLOP/s/device ({peak_source})")
    meter = StepMeter(cfg, log, start_step=start_step, flops_per_token=setup.flops_per_token, peak=peak,
                      num_devices=setup.mesh.size, tokens_before=sum(source.tokens_seen().values()),
                      domains=getattr(source, "domain_names", ()))
    return Run(cfg=cfg, setup=setup, source=source, checkpoints=checkpoints, log=log, say=say, meter=meter,
               state=state, out_dir=out_dir, step=start_step, hook_states=restored.get("hooks", {}))


def train(cfg: ExperimentConfig, *, mesh: jax.sharding.Mesh | None = None, source=None,
          log_fn: Callable[[str], None] | None = None, allow_config_change: bool = False,
          hooks: Sequence[Hook] | None = None) -> TrainResult:
    """Runs optimizer steps up to `cfg.train.steps`; writes config.yaml, metrics.jsonl, TensorBoard events and
    checkpoints/ under `cfg.train.output_dir`. `hooks` (default: mixlm.hooks.default_hooks(cfg): validation,
    live lm-eval tasks, preemption, checkpoints) run between steps on their cadence.

    Rerunning with the same output folder resumes from its newest good checkpoint (mixlm.checkpoint);
    a different config there is refused unless `allow_config_change`. SIGTERM/SIGINT stop the loop after
    the current step with a checkpoint of it (`TrainResult.preempted_at`)."""
    mesh = mesh or make_mesh(cfg.mesh)
    validate_for_mesh(cfg, Layout(mesh, DEFAULT_RULES.with_overrides(cfg.mesh.rules)).axis_size("batch"),
                      jax.process_count(), devices=mesh.devices.flat)  # sizes checked before anything is built
    source = source or make_train_source(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    setup = build_setup(cfg, mesh, num_domains=len(getattr(source, "domain_names", ())))
    hooks = default_hooks(cfg) if hooks is None else list(hooks)
    run = open_run(cfg, setup, source, log_fn=log_fn, allow_config_change=allow_config_change)
    run.hooks = hooks
    try:
        for hook in hooks:
            if hook.state_key in run.hook_states:
                hook.load_state_dict(run, run.hook_states[hook.state_key])
            hook.at_start(run)
        for step in range(run.step + 1, cfg.train.steps + 1):
            host_batch = source.next_batch()
            if step == run.meter.start_step + 1:
                check_batch_shape(host_batch, cfg)
            batch = to_global_batch(host_batch, setup.layout)
            for hook in hooks:
                batch = hook.before_step(run, step, batch)
            run.state, metrics = setup.train_step(run.state, batch)
            run.step = step
            run.meter.record(step, metrics)
            for hook in hooks:
                if hook.due(run, step):
                    hook.after_step(run, step)
            if run.stop_reason:
                break
        run.flush()
        if not run.stop_reason:
            for hook in hooks:
                hook.at_end(run)
    finally:
        for hook in hooks:
            hook.close()
        run.log.close()
        run.checkpoints.close()
        source.close()
    return TrainResult(state=run.state, history=run.meter.history, eval=run.final_eval, out_dir=run.out_dir,
                       preempted_at=run.preempted_at)
