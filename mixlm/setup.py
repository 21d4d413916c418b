"""Everything a run derives from its config and mesh before any array is allocated: shardings, the optimizer
and the jitted programs, for one run or for K members trained together (a swarm, mixlm.members).

    setup = build_setup(cfg, mesh)                     # one run: today's state, step and checkpoint layout
    setup = build_setup(cfg, mesh, members=4)          # 4 members: every leaf of the state gets a member axis

Each parameter is sharded by its logical axes (mixlm.sharding) and the state is initialised directly into those
shardings (never materialised on one device). With members=K > 1 the state is the single run's TrainState with a
leading member axis on every leaf, sharded over the mesh's `data` axis, and the step is the single run's step
mapped over it (jax.vmap with spmd_axis_name, or lax.map on one CPU device: mixlm.members.default_member_map),
with an alive mask: a member whose step goes non-finite keeps its last good state while the others go on.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixlm import members as members_lib
from mixlm import models
from mixlm.config import ExperimentConfig
from mixlm.optim import make_optimizer
from mixlm.sharding import DEFAULT_RULES, AxisRules, Layout, to_global_batch
from mixlm.train_step import TrainState, make_eval_step, make_train_step, masked_step


@dataclasses.dataclass
class TrainSetup:
    """The programs of a run of `members` members (1: a single run) on one mesh.

    members == 1: init_state(key) -> TrainState; train_step(state, batch) -> (state, metrics); eval_step(params,
    batch) -> (nll_sum, tokens). members == K > 1: the same over a leading member axis: init_state(keys [K]),
    train_step(state, alive [K] bool, batch [K, B, ...]) -> (state, alive, metrics [K]), eval_step -> ([K], [K]).
    With num_domains, the metrics also hold the per-domain sums (mixlm.train_step.DOMAIN_SUMS), [D] or [K, D]."""

    cfg: ExperimentConfig
    layout: Layout  # the mesh and the rule table (a member's, without the member axis, when members > 1)
    graphdef: Any
    logical_axes: dict
    tx: optax.GradientTransformation
    schedule: Callable
    abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
    state_shardings: TrainState
    init_state: Callable  # jitted, born sharded
    train_step: Callable  # jitted, donates the state
    eval_step: Callable  # jitted
    fresh_state: Callable  # jitted: params (one member's) -> step 0 and a fresh optimizer state (every member's)
    members: int = 1
    member_map: str = ""  # members > 1: 'vmap' (batched) or 'scan' (one after another)
    owners: tuple[int, ...] = ()  # members > 1: the process whose devices hold member m
    num_domains: int = 0  # the length of the step's per-domain sums (0: none)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.layout.mesh

    @property
    def flops_per_token(self) -> float:
        return models.flops_per_token(self.cfg.model, self.cfg.data.seq_len, causal=True)

    @property
    def local_members(self) -> list[int]:
        """The members this process feeds (a single run: every process feeds its rows of member 0)."""
        if self.members == 1:
            return [0]
        return [m for m, p in enumerate(self.owners) if p == jax.process_index()]

    def writes(self, member: int) -> bool:
        """Whether this process writes `member`'s run folder (a single run: process 0; a swarm: the owner)."""
        if self.members == 1:
            return jax.process_index() == 0
        return self.owners[member] == jax.process_index()

    @property
    def member_sharding(self) -> NamedSharding:
        """A [K] vector over the member axis."""
        return NamedSharding(self.mesh, P(members_lib.MEMBER_AXIS))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """[K, B, ...]: members over the member axis, each member's rows over its batch rule's axes."""
        rows = tuple(a for a in self.layout.rules.mesh_axes("batch") if self.mesh.shape[a] > 1)
        return NamedSharding(self.mesh, P(members_lib.MEMBER_AXIS, rows or None, *([None] * (ndim - 2))))

    def put_batch(self, host_batches: Sequence[dict]) -> dict:
        """The local members' host batches (one per local_members entry; a single run: this process's rows)
        -> the device batch: a single run's global batch, or one stacked [K, ...] array per key."""
        if self.members == 1:
            return to_global_batch(host_batches[0], self.layout)
        if jax.process_count() == 1:
            return {k: jax.device_put(np.stack([b[k] for b in host_batches]), self.batch_sharding(v.ndim + 1))
                    for k, v in host_batches[0].items()}
        local = self.local_members

        def put(key: str) -> jax.Array:
            mine = {m: b[key] for m, b in zip(local, host_batches)}

            def block(index):  # called for this process's devices only: their members are all in `mine`
                rows = range(*index[0].indices(self.members))
                return np.stack([mine[m] for m in rows])[(slice(None), *index[1:])]

            shape = (self.members, *host_batches[0][key].shape)
            return jax.make_array_from_callback(shape, self.batch_sharding(len(shape)), block)

        return {k: put(k) for k in host_batches[0]}

    def put_members(self, values) -> jax.Array:
        """A [K] vector every process knows whole -> the device vector over the member axis."""
        values = np.asarray(values)
        return jax.make_array_from_callback(values.shape, self.member_sharding, lambda index: values[index])

    def initial_state(self, seeds: Sequence[int]) -> TrainState:
        """Step 0 from each member's train.seed (a single run: its one seed)."""
        if self.members == 1:
            return self.init_state(jax.random.key(seeds[0]))
        return self.init_state(members_lib.member_keys(seeds))

    @property
    def member_abstract_params(self):
        """One member's params as ShapeDtypeStructs on this mesh (what checkpoint.init_from restores onto)."""
        params = self.abstract_state.params
        return params if self.members == 1 else members_lib.unstacked(params)


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


def build_setup(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, *, members: int = 1, rules: AxisRules | None = None,
                member_map: str | None = None, num_domains: int = 0) -> TrainSetup:
    """Shardings, optimizer and the jitted functions for `members` copies of `cfg`'s model on `mesh` (rules:
    DEFAULT_RULES with mesh.rules over them, without the member axis when members > 1, or `rules` as given;
    member_map 'vmap' | 'scan', default mixlm.members.default_member_map). The vocabulary is padded to a
    multiple of the mesh axes that split it (and of model.vocab_multiple), not of the device count, so
    checkpoints keep their shapes across meshes.

    `num_domains`: the train step also sums each batch's loss and tokens per domain (its 'domain_ids'), the
    training signal of every domain (train_loss/<domain>) and of online mixing; 0 leaves it out.

    Cached: a config with the same program_key, mesh and member count (the next proxy or swarm of a sweep)
    gets the same jitted functions back, with its own `cfg`, so it compiles nothing again."""
    if members > 1:
        member_map = member_map or members_lib.default_member_map(mesh)
        members_lib.check_member_map(member_map, mesh)
        rules = rules or members_lib.member_rules(cfg)
    else:
        member_map = ""
    key = (program_key(cfg), mesh, rules, members, member_map, num_domains)
    cached = _setup_cache.get(key)
    if cached is not None:
        _setup_cache.move_to_end(key)
        return dataclasses.replace(cached, cfg=cfg)
    setup = _build_setup(cfg, mesh, rules, members, member_map, num_domains)
    _setup_cache[key] = setup
    while len(_setup_cache) > SETUP_CACHE_SIZE:
        _setup_cache.popitem(last=False)
    return setup


def make_init_fn(cfg: ExperimentConfig, tx: optax.GradientTransformation, vocab_multiple_of: int) -> Callable:
    """init_fn(key) -> TrainState: step 0, params from `key`, a fresh optimizer state."""

    def init_fn(key) -> TrainState:
        model = models.build_model(cfg.model, rngs=nnx.Rngs(params=key), vocab_multiple_of=vocab_multiple_of)
        _, params = models.split_params(model)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init_fn


def _build_setup(cfg: ExperimentConfig, mesh: jax.sharding.Mesh, rules: AxisRules | None, members: int,
                 member_map: str, num_domains: int) -> TrainSetup:
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
    shardings = TrainState(step=layout.replicated(), params=p_shardings, opt_state=opt_shardings)
    step_fn = make_train_step(
        graphdef, tx, schedule, vocab_size=cfg.model.vocab_size, z_loss=cfg.train.z_loss,
        grad_accum_steps=cfg.train.grad_accum_steps, layout=layout, num_domains=num_domains,
    )
    eval_fn = make_eval_step(graphdef, vocab_size=cfg.model.vocab_size, layout=layout)

    def fresh(params) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    common = {"cfg": cfg, "layout": layout, "graphdef": graphdef, "logical_axes": logical_axes, "tx": tx,
              "schedule": schedule, "num_domains": num_domains}
    if members == 1:
        abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
        return TrainSetup(
            **common, abstract_state=abstract_state, state_shardings=shardings,
            init_state=jax.jit(init_fn, out_shardings=shardings),
            train_step=jax.jit(step_fn, donate_argnums=(0,), out_shardings=(shardings, layout.replicated())),
            eval_step=jax.jit(eval_fn),
            fresh_state=jax.jit(fresh, out_shardings=shardings, donate_argnums=(0,)),
        )

    state_shardings = jax.tree.map(members_lib.stacked, shardings)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct((members, *a.shape), a.dtype, sharding=s),
                                  abstract, state_shardings)
    member_sharding = NamedSharding(mesh, P(members_lib.MEMBER_AXIS))

    def fresh_members(params) -> TrainState:  # every member starts from the same params
        return jax.vmap(fresh, axis_size=members, in_axes=None, spmd_axis_name=members_lib.MEMBER_AXIS)(params)

    return TrainSetup(
        **common, abstract_state=abstract_state, state_shardings=state_shardings,
        init_state=jax.jit(jax.vmap(init_fn, spmd_axis_name=members_lib.MEMBER_AXIS), out_shardings=state_shardings),
        train_step=jax.jit(masked_step(members_lib.over_members(step_fn, member_map)), donate_argnums=(0,),
                           out_shardings=(state_shardings, member_sharding, member_sharding)),
        eval_step=jax.jit(members_lib.over_members(eval_fn, member_map), out_shardings=member_sharding),
        fresh_state=jax.jit(fresh_members, out_shardings=state_shardings),
        members=members, member_map=member_map, owners=members_lib.member_owners(mesh, members),
    )
