"""What is particular to training K members at once (a swarm: proxies with one architecture and schedule but
their own mixture, data stream, seed and online mixing strategy): their mesh, which process owns each, the rule table inside a member,
how the single run's step maps over them, and the swarm's data state.

The stacked state is the single run's TrainState with a leading member axis on every leaf, sharded over the
mesh's `data` axis (MEMBER_AXIS); inside a member the batch rows and the weights shard over `fsdp` and `tensor`
as in a single run. mixlm.setup.build_setup(cfg, mesh, members=K) builds the programs from these pieces and
mixlm.train.train runs them; a run of one member (K = 1) uses none of this.

Several jax.distributed processes train one swarm together: each member lies on one process's devices
(member_owners); that process reads the member's data, writes its run folder and reports its failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixlm import storage
from mixlm.config import ExperimentConfig, MeshConfig, config_diff
from mixlm.errors import ConfigError, ConfigMismatchError
from mixlm.sharding import DEFAULT_RULES, AxisRules, make_mesh

MEMBER_AXIS = "data"  # the mesh axis the member axis is sharded over
# What members may differ in; everything else (model, optimizer, schedule, shapes, cadences, hooks) is shared.
MEMBER_KEYS = ("data.mixture", "data.seed", "train.seed", "train.output_dir", "mixing.kind", "mixing.every",
               "mixing.warmup_steps", "mixing.apply", "mixing.options")  # online mixing: each member its own
SWARM_STATE_VERSION = 1  # the data state a swarm's checkpoint holds (swarm_data_state)
MEMBER_MAPS = ("vmap", "scan")


def member_rules(cfg: ExperimentConfig) -> AxisRules:
    """The single run's rule table (DEFAULT_RULES with mesh.rules) without the member axis: inside a member
    the batch shards over fsdp only, and no weight uses `data`."""
    rules = DEFAULT_RULES.with_overrides(cfg.mesh.rules)
    return AxisRules(tuple((name, tuple(a for a in axes if a != MEMBER_AXIS)) for name, axes in rules.rules))


def member_mesh(members: int, cfg: ExperimentConfig, devices=None) -> jax.sharding.Mesh:
    """data = the largest count that divides both `members` and the devices left by mesh.tensor (members
    sharded over it), fsdp = the rest (each member's batch and weights), tensor = mesh.tensor."""
    devices = list(jax.devices() if devices is None else devices)
    tensor = max(cfg.mesh.tensor, 1)
    if len(devices) % tensor:
        raise ConfigError(f"mesh.tensor={tensor} does not divide the {len(devices)} devices; set mesh.tensor=1")
    member_shards = math.gcd(members, len(devices) // tensor)
    fsdp = len(devices) // (tensor * member_shards)
    return make_mesh(MeshConfig(data=member_shards, fsdp=fsdp, tensor=tensor, rules=cfg.mesh.rules), devices)


def member_owners(mesh: jax.sharding.Mesh, members: int) -> tuple[int, ...]:
    """The process holding each member. Raises ConfigError unless every member sits on one process's devices
    (that process then feeds the member's whole batch)."""
    placed: list[set[int]] = [set() for _ in range(members)]
    for device, index in NamedSharding(mesh, P(MEMBER_AXIS)).devices_indices_map((members,)).items():
        for m in range(*index[0].indices(members)):
            placed[m].add(device.process_index)
    if any(len(p) != 1 for p in placed):
        split = next(m for m, p in enumerate(placed) if len(p) != 1)
        raise ConfigError(f"swarm member {split} of {members} would span processes {sorted(placed[split])}: a "
                          f"swarm over {jax.process_count()} processes needs each member on one process's "
                          f"devices; use a member count K that is a multiple of {jax.process_count()} (members "
                          "spread over processes), or --shard I/N to give each host its own swarms")
    return tuple(p.pop() for p in placed)


def default_member_map(mesh: jax.sharding.Mesh) -> str:
    """'scan' (lax.map: members one after another inside the one compiled step) when the whole swarm sits on
    one CPU device, else 'vmap' (members batched; their axis sharded over `data`). XLA:CPU runs the batched
    program ~2x slower per member than the member's own (its batched layouts add copies; measured on the
    regmix-1m-shaped proxy of benchmarks/sweep_throughput.py), while accelerators want the batch."""
    one_cpu = mesh.shape[MEMBER_AXIS] == 1 and mesh.devices.flat[0].platform == "cpu"
    return "scan" if one_cpu else "vmap"


def check_member_map(member_map: str, mesh: jax.sharding.Mesh) -> None:
    if member_map not in MEMBER_MAPS:
        raise ConfigError(f"member_map={member_map!r}: expected one of {', '.join(MEMBER_MAPS)}")
    if member_map == "scan" and mesh.shape[MEMBER_AXIS] > 1:
        raise ConfigError("member_map='scan' runs the members one after another: it needs mesh data=1")


def over_members(fn: Callable, member_map: str) -> Callable:
    """fn(*member_args) -> the same function over args with a leading member axis (every arg mapped)."""
    if member_map == "vmap":
        return jax.vmap(fn, spmd_axis_name=MEMBER_AXIS)
    return lambda *args: jax.lax.map(lambda xs: fn(*xs), args)


def stacked(sharding: NamedSharding) -> NamedSharding:
    """A member's sharding with the member axis in front."""
    return NamedSharding(sharding.mesh, P(MEMBER_AXIS, *sharding.spec))


def unstacked(abstract):
    """ShapeDtypeStructs of a stacked tree -> one member's (no member axis; replicated over MEMBER_AXIS)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape[1:], a.dtype, sharding=NamedSharding(a.sharding.mesh, P(*a.sharding.spec[1:]))), abstract)


def member_keys(seeds: Sequence[int]) -> jax.Array:
    """[K] PRNG keys, key k = jax.random.key(seeds[k]) (what member k's single run starts from)."""
    return jax.vmap(jax.random.key)(jnp.asarray(list(seeds), jnp.uint32))


def member_slice(tree, m: int):
    """Member `m` of a stacked tree of device arrays, as numpy, read from this process's shards only (the
    member must lie on this process's devices; no collective)."""

    def one(a: jax.Array) -> np.ndarray:
        out = np.zeros(a.shape[1:], a.dtype)
        for shard in a.addressable_shards:
            members = range(*shard.index[0].indices(a.shape[0]))
            if m in members:
                out[shard.index[1:]] = np.asarray(shard.data)[members.index(m)]
        return out

    return jax.tree.map(one, tree)


def check_members(cfgs: Sequence[ExperimentConfig]) -> None:
    """Raises ConfigError unless every member equals the first in all but MEMBER_KEYS, and their output
    folders differ."""
    if not cfgs:
        raise ConfigError("a swarm needs at least one member config")
    for i, cfg in enumerate(cfgs[1:], start=1):
        diffs = config_diff(cfgs[0], cfg, ignore=MEMBER_KEYS)
        if diffs:
            raise ConfigError(f"swarm member {i} differs from member 0 in {', '.join(diffs)}: members share "
                              f"everything but {', '.join(MEMBER_KEYS)}; train it in another swarm")
    dirs = [str(storage.location(c.train.output_dir).resolve()) if not storage.is_remote(c.train.output_dir)
            else c.train.output_dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("swarm members need their own train.output_dir; two members share one")


def member_source(cfg: ExperimentConfig):
    """A swarm member's own data source: its whole batch (its owner feeds it), quiet (K mixture tables would
    drown the log)."""
    if cfg.data.source == "prepared":
        from mixlm.data.pipeline import PreparedMixtureSource

        return PreparedMixtureSource(cfg, verbose=False)
    from mixlm.data import make_train_source

    return make_train_source(cfg)


def swarm_data_state(cfgs: Sequence[ExperimentConfig], member_states: dict[int, dict],
                     failed: dict[int, dict]) -> dict:
    """The data state a swarm checkpoint holds: every member's source state and the failed members."""
    return {"version": SWARM_STATE_VERSION, "runs": [str(c.train.output_dir) for c in cfgs],
            "members": [member_states[m] for m in range(len(cfgs))],
            "failed": {str(m): v for m, v in sorted(failed.items())}}


def restore_swarm_data(data: dict, cfgs: Sequence[ExperimentConfig], local: Sequence[int], sources: Sequence, *,
                       where: str, allow_config_change: bool) -> dict[int, dict]:
    """Sets this process's members' sources (`sources`, in `local` order) to their saved states; returns every
    failed member ({member: {'step', 'reason'}}). Raises ConfigMismatchError when the checkpoint is of other
    members or a member's data pipeline changed."""
    runs = [str(c.train.output_dir) for c in cfgs]
    if data.get("runs") != runs:
        raise ConfigMismatchError(f"{where} holds a swarm of {data.get('runs')}, not of {runs}; use another swarm "
                                  "folder (or the mixtures it was made for)")
    for m, src in zip(local, sources):
        saved = data["members"][m]
        fingerprint = getattr(src, "fingerprint", lambda: None)()
        if fingerprint is not None and saved.get("fingerprint") != fingerprint and not allow_config_change:
            raise ConfigMismatchError(f"swarm member {m} ({runs[m]}): its data pipeline (mixture, seed, prepared "
                                      f"data) differs from the one in {where}; use another swarm folder")
        src.set_state(saved)
    return {int(k): v for k, v in data.get("failed", {}).items()}
