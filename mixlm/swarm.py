"""Proxy swarms: K proxies with one architecture and schedule but their own mixture, data stream and seed,
trained together in one jitted step.

    result = train_swarm(member_cfgs, "runs/sweep/swarms/0001-0004")   # one ExperimentConfig per member

The state is the single run's TrainState with a leading member axis on every leaf (params, optimizer state,
step), and one swarm step is `jax.vmap` of mixlm.train's own step over it, fed batches [K, B, L] stacked from
K data sources (each a PreparedMixtureSource of that member's mixture and data.seed). The member axis lies on
the mesh's `data` axis (vmap's spmd_axis_name), so K members spread over up to K devices; inside a member the
batch rows and the weights shard over `fsdp` and `tensor` as in a single run. When the whole swarm sits on one
CPU device the same step maps over members with `lax.map` instead (still one compiled step and one dispatch;
XLA:CPU runs the batched program slower per member, see default_member_map).

A member whose loss, gradient, parameter or update norm goes non-finite is marked failed inside the step: its
update is masked (its state stays at its last good step) while the others go on. Each member writes its own
config.yaml and metrics.jsonl into its `train.output_dir`, like a single run (the train loss of each logged
step, the per-domain validation losses at eval.every and at the end), so mixlm.mixing.sweep reads a member's
results the way it reads a run's. A failed member's metrics.jsonl ends with a row {'step', 'failed': why}
and has no final validation row.

Checkpoints (mixlm.checkpoint.RunCheckpoints over `<swarm_dir>/checkpoints/`, on checkpoint.every / at the end
as configured) hold the stacked state and, as the data state, every member's source state and the failed
members, so a rerun resumes exactly; SIGTERM/SIGINT save the current step and stop, as in a single run.
`<swarm_dir>/swarm.json` marks a finished swarm (its members and which failed). Process 0 shows the swarm's
steps and the time left on a progress bar (logging.progress), as a single run does.

Several jax.distributed processes (a pod, or `mixlm sweep --swarm K --coordinator ...`) train one swarm
together: the member axis spans the processes' devices, each member on one process (member_owners), which
reads that member's data, writes its metrics.jsonl and reports its failure; the checkpoint's data state
and swarm.json gather every member's (allgather_json). Member folders must be on storage every process sees.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixlm import storage
from mixlm.checkpoint import (
    ConfigMismatchError,
    RunCheckpoints,
    checkpoint_dir,
    run_metadata,
)
from mixlm.collectives import gather_members, host_view
from mixlm.config import (
    ConfigError,
    ExperimentConfig,
    MeshConfig,
    config_diff,
    save_config,
    validate_for_mesh,
)
from mixlm.hooks import GUARDED_METRICS
from mixlm.metrics import MetricsLog
from mixlm.preemption import PreemptionGuard
from mixlm.run_dir import RunDir
from mixlm.sharding import DEFAULT_RULES, AxisRules, Layout, make_mesh
from mixlm.train import TrainSetup, build_setup, program_key

MEMBER_AXIS = "data"  # the mesh axis the member axis is sharded over
SWARM_DONE = "swarm.json"
# What members may differ in; everything else (model, optimizer, schedule, shapes, cadences) is shared.
MEMBER_KEYS = ("data.mixture", "data.seed", "train.seed", "train.output_dir")
SWARM_STATE_VERSION = 1


# ---- the program ---------------------------------------------------------------------------------------


def member_rules(cfg: ExperimentConfig) -> AxisRules:
    """The single run's rule table (DEFAULT_RULES with mesh.rules) without the member axis: inside a member
    the batch shards over fsdp only, and no weight uses `data`."""
    rules = DEFAULT_RULES.with_overrides(cfg.mesh.rules)
    return AxisRules(tuple((name, tuple(a for a in axes if a != MEMBER_AXIS)) for name, axes in rules.rules))


def swarm_mesh(members: int, cfg: ExperimentConfig, devices=None) -> jax.sharding.Mesh:
    """data = the largest count that divides both `members` and the devices left by mesh.tensor (members
    sharded over it), fsdp = the rest (each member's batch and weights), tensor = mesh.tensor."""
    devices = list(jax.devices() if devices is None else devices)
    tensor = max(cfg.mesh.tensor, 1)
    if len(devices) % tensor:
        raise ConfigError(f"mesh.tensor={tensor} does not divide the {len(devices)} devices; set mesh.tensor=1")
    member_shards = math.gcd(members, len(devices) // tensor)
    fsdp = len(devices) // (tensor * member_shards)
    return make_mesh(MeshConfig(data=member_shards, fsdp=fsdp, tensor=tensor, rules=cfg.mesh.rules), devices)


@dataclasses.dataclass
class SwarmSetup:
    """The member's TrainSetup (its graphdef, optimizer, schedule, rule table) and the jitted swarm programs."""

    member: TrainSetup
    members: int
    abstract_state: Any  # the stacked TrainState's ShapeDtypeStructs: [K, ...] on every leaf, with shardings
    state_shardings: Any
    member_sharding: NamedSharding  # a [K] vector over the member axis
    init_state: Callable  # jitted: keys [K] -> stacked TrainState
    train_step: Callable  # jitted: (state, alive [K] bool, batch [K, B, L]) -> (state, alive, metrics [K]); donates
    eval_step: Callable  # jitted: (params, batch [K, B, L]) -> (nll_sum [K], tokens [K])
    member_map: str = "vmap"  # how the step maps over members: 'vmap' (batched) or 'scan' (one after another)
    owners: tuple[int, ...] = ()  # the process whose devices hold member m (member_owners)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.member.mesh

    @property
    def local_members(self) -> list[int]:
        """The members this process feeds, logs and evaluates (all of them in one process)."""
        return [m for m, p in enumerate(self.owners) if p == jax.process_index()]

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """[K, B, ...]: members over the member axis, each member's rows over its batch rule's axes."""
        rows = tuple(a for a in self.member.layout.rules.mesh_axes("batch") if self.mesh.shape[a] > 1)
        return NamedSharding(self.mesh, P(MEMBER_AXIS, rows or None, *([None] * (ndim - 2))))

    def put_batch(self, host_batches: Sequence[dict]) -> dict:
        """The local members' host batches (one per member of local_members, same keys and shapes) -> one
        stacked [K, ...] device batch per key (in one process: all K members' batches)."""
        if jax.process_count() == 1:
            return {k: jax.device_put(np.stack([b[k] for b in host_batches]), self.batch_sharding(v.ndim + 1))
                    for k, v in host_batches[0].items()}
        local = self.local_members

        def put(key: str) -> jax.Array:
            mine = {m: b[key] for m, b in zip(local, host_batches)}

            def block(index):  # called for this process's devices only: their members are all in `mine`
                members = range(*index[0].indices(self.members))
                return np.stack([mine[m] for m in members])[(slice(None), *index[1:])]

            shape = (self.members, *host_batches[0][key].shape)
            return jax.make_array_from_callback(shape, self.batch_sharding(len(shape)), block)

        return {k: put(k) for k in host_batches[0]}

    def put_members(self, values: np.ndarray) -> jax.Array:
        """A [K] vector every process knows whole -> the device vector over the member axis."""
        values = np.asarray(values)
        return jax.make_array_from_callback(values.shape, self.member_sharding, lambda index: values[index])


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


def all_finite(metrics: dict) -> jax.Array:
    """[K] bool: every guarded metric (mixlm.hooks.GUARDED_METRICS) of the member is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in GUARDED_METRICS if k in metrics]), axis=0)


SWARM_SETUP_CACHE_SIZE = 4
_swarm_setup_cache: collections.OrderedDict = collections.OrderedDict()


MEMBER_MAPS = ("vmap", "scan")


def default_member_map(mesh: jax.sharding.Mesh) -> str:
    """'scan' (lax.map: members one after another inside the one compiled step) when the whole swarm sits on
    one CPU device, else 'vmap' (members batched; their axis sharded over `data`). XLA:CPU runs the batched
    program ~2x slower per member than the member's own (its batched layouts add copies; measured on the
    regmix-1m-shaped proxy of benchmarks/sweep_throughput.py), while accelerators want the batch."""
    one_cpu = mesh.shape[MEMBER_AXIS] == 1 and mesh.devices.flat[0].platform == "cpu"
    return "scan" if one_cpu else "vmap"


def build_swarm_setup(cfg: ExperimentConfig, members: int, mesh: jax.sharding.Mesh,
                      member_map: str | None = None) -> SwarmSetup:
    """The jitted swarm programs for `members` copies of `cfg`'s model on `mesh` (see swarm_mesh); `member_map`
    'vmap' | 'scan' (default: default_member_map). Cached like mixlm.train.build_setup: the next swarm of a
    sweep (same program_key, member count and mesh) compiles nothing again."""
    member_map = member_map or default_member_map(mesh)
    if member_map not in MEMBER_MAPS:
        raise ConfigError(f"member_map={member_map!r}: expected one of {', '.join(MEMBER_MAPS)}")
    if member_map == "scan" and mesh.shape[MEMBER_AXIS] > 1:
        raise ConfigError("member_map='scan' runs the members one after another: it needs mesh data=1")
    key = (program_key(cfg), members, mesh, member_map)
    if key in _swarm_setup_cache:
        _swarm_setup_cache.move_to_end(key)
        return _swarm_setup_cache[key]
    setup = _build_swarm_setup(cfg, members, mesh, member_map)
    _swarm_setup_cache[key] = setup
    while len(_swarm_setup_cache) > SWARM_SETUP_CACHE_SIZE:
        _swarm_setup_cache.popitem(last=False)
    return setup


def over_members(fn: Callable, member_map: str) -> Callable:
    """fn(*member_args) -> the same function over args with a leading member axis (every arg mapped)."""
    if member_map == "vmap":
        return jax.vmap(fn, spmd_axis_name=MEMBER_AXIS)
    return lambda *args: jax.lax.map(lambda xs: fn(*xs), args)


def _build_swarm_setup(cfg: ExperimentConfig, members: int, mesh: jax.sharding.Mesh, member_map: str) -> SwarmSetup:
    member = build_setup(cfg, mesh, rules=member_rules(cfg))

    def stacked(sharding: NamedSharding) -> NamedSharding:
        return NamedSharding(mesh, P(MEMBER_AXIS, *sharding.spec))

    state_shardings = jax.tree.map(stacked, member.state_shardings)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct((members, *a.shape), a.dtype, sharding=s),
                                  member.abstract_state, state_shardings)
    member_sharding = NamedSharding(mesh, P(MEMBER_AXIS))
    vstep = over_members(member.step_fn, member_map)

    def swarm_step(state, alive_K, batch):
        new_state, metrics = vstep(state, batch)
        alive_K = alive_K & all_finite(metrics)
        # A failed member keeps its last good state: the others' arithmetic never sees its values.
        state = jax.tree.map(lambda new, old: jnp.where(alive_K.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                             new_state, state)
        return state, alive_K, metrics

    return SwarmSetup(
        member=member, members=members, abstract_state=abstract_state, state_shardings=state_shardings,
        member_sharding=member_sharding,
        init_state=jax.jit(jax.vmap(member.init_fn, spmd_axis_name=MEMBER_AXIS), out_shardings=state_shardings),
        train_step=jax.jit(swarm_step, donate_argnums=(0,),
                           out_shardings=(state_shardings, member_sharding, member_sharding)),
        eval_step=jax.jit(over_members(member.eval_fn, member_map), out_shardings=member_sharding),
        member_map=member_map, owners=member_owners(mesh, members),
    )


def member_keys(seeds: Sequence[int]) -> jax.Array:
    """[K] PRNG keys, key k = jax.random.key(seeds[k]) (what member k's single run starts from)."""
    return jax.vmap(jax.random.key)(jnp.asarray(list(seeds), jnp.uint32))


# ---- members: configs, sources, evaluation --------------------------------------------------------------


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
    dirs = [str(storage.location(d) if storage.is_remote(d) else Path(d).resolve())
            for d in (c.train.output_dir for c in cfgs)]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("swarm members need their own train.output_dir; two members share one")
    if cfgs[0].eval.tasks:
        raise ConfigError("eval.tasks: a swarm scores validation losses only; set eval.tasks=[] (score the "
                          "exported winners with `mixlm eval`)")
    if cfgs[0].checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: swarm members start from train.seed; unset it")


def member_source(cfg: ExperimentConfig):
    """The member's own train source (quiet: K mixture tables would drown the log)."""
    if cfg.data.source == "prepared":
        from mixlm.data.pipeline import PreparedMixtureSource

        return PreparedMixtureSource(cfg, verbose=False)
    from mixlm.data import make_train_source

    return make_train_source(cfg)


def stacked_eval_batches(sources: Sequence, num_batches: int) -> tuple[dict[str, list[list[dict]]], list[str]]:
    """({domain: [[member 0's batch j, member 1's batch j, ...] for each j]}, eval-only domains), over the
    given (this process's) members' sources."""
    per_member = [src.eval_batches(num_batches) for src in sources]
    first = per_member[0]
    for k, batches in enumerate(per_member[1:], start=1):
        if {d: len(b) for d, b in batches.items()} != {d: len(b) for d, b in first.items()}:
            raise ConfigError(f"swarm member {k} has other validation domains or batch counts than member 0; "
                              "members must read the same prepared domains")
    stacked = {d: [[m[d][j] for m in per_member] for j in range(len(first[d]))] for d in first}
    return stacked, [d.name for d in getattr(sources[0], "eval_only", ())]


def evaluate_members(setup: SwarmSetup, params, eval_batches: dict[str, list[list[dict]]],
                     eval_only: Sequence[str] = ()) -> list[dict[str, float]]:
    """mixlm.hooks.evaluate for every member at once: per member `val_loss/<domain>` and the token-weighted
    `val_loss` over the trained domains (eval_only domains reported, not totalled). `eval_batches` holds this
    process's members' batches (stacked_eval_batches); the other processes' members get {}."""
    k = setup.members
    out = [{} for _ in range(k)]
    total_nll, total_tokens = np.zeros(k), np.zeros(k)
    for domain, batches in eval_batches.items():
        nll, tokens = [0.0] * k, [0.0] * k
        for member_batches in batches:
            s_K, n_K = host_view(setup.eval_step(params, setup.put_batch(member_batches)))
            nll = [a + float(b) for a, b in zip(nll, s_K)]
            tokens = [a + float(b) for a, b in zip(tokens, n_K)]
        for m in range(k):
            out[m][f"val_loss/{domain}"] = nll[m] / max(tokens[m], 1.0)
        if domain not in eval_only:
            total_nll, total_tokens = total_nll + np.array(nll), total_tokens + np.array(tokens)
    for m in range(k):
        out[m]["val_loss"] = float(total_nll[m]) / max(float(total_tokens[m]), 1.0)
    local = set(setup.local_members)
    return [values if m in local else {} for m, values in enumerate(out)]


# ---- the loop ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SwarmResult:
    state: Any  # the stacked TrainState
    eval: list[dict[str, float]]  # each member's final validation losses ({} for a failed member)
    failed: dict[int, dict]  # member -> {'step', 'reason'}
    swarm_dir: Path
    preempted_at: int | None = None
    history: list[list[dict]] = dataclasses.field(default_factory=list)  # per member: its logged metric rows


def read_swarm_done(swarm_dir: str | Path) -> dict | None:
    """The finished swarm's record ({'runs', 'steps', 'failed'}), or None if it has not finished."""
    path = storage.location(swarm_dir) / SWARM_DONE
    return json.loads(path.read_text()) if path.is_file() else None


class _MemberLogs:
    """This process's members' metrics.jsonl (and TensorBoard if configured), one step late like
    mixlm.hooks.StepMeter, and the swarm's progress bar (steps done, ETA; process 0, logging.progress) as a
    single run's MetricsLog shows it. `failed` collects the failures of these members (member -> {'step',
    'reason'})."""

    def __init__(self, cfgs: Sequence[ExperimentConfig], local: Sequence[int], *, swarm_dir: Path, start_step: int,
                 tokens_before: dict[int, float], failed: dict[int, dict], say: Callable[[str], None]):
        self.cfgs, self.local, self.failed, self.say = cfgs, list(local), failed, say
        self.progress = MetricsLog(swarm_dir, total_steps=cfgs[0].train.steps, start_step=start_step, jsonl=False,
                                   tensorboard=False, progress=cfgs[0].logging.progress,
                                   writer=jax.process_index() == 0)
        self.logs: dict[int, MetricsLog] = {}
        for m in self.local:
            out = storage.location(cfgs[m].train.output_dir)
            storage.make_dirs(out)
            save_config(cfgs[m], out / "config.yaml")
            RunDir(out).trim_metrics(start_step)
            quiet = cfgs[m].replace(logging=dataclasses.replace(cfgs[m].logging, progress=False, wandb=False))
            self.logs[m] = MetricsLog.for_run(out, quiet, start_step=start_step, writer=True)  # its owner writes
        self.tokens_total = dict(tokens_before)
        self.history: list[list[dict]] = [[] for _ in cfgs]
        self._pending = None
        self.every, self.steps, self.start_step = cfgs[0].logging.every, cfgs[0].train.steps, start_step
        self._window = (time.perf_counter(), 0.0)  # (since, loss tokens of all members since then)
        self._whose = "" if len(self.local) == len(cfgs) else f" on process {jax.process_index()}"

    def record(self, step: int, alive_dev, metrics_dev) -> None:
        """Takes the device metrics of `step` and reads those of the step before."""
        self.flush()
        self._pending = (step, alive_dev, metrics_dev)
        if step == self.start_step + 1:  # its time went to compilation: throughput counts from here
            jax.block_until_ready(metrics_dev)
            self.say(f"swarm step {step} (compilation included) took {time.perf_counter() - self._window[0]:.1f}s")
            self._window = (time.perf_counter(), 0.0)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, alive_dev, metrics_dev = self._pending
        self._pending = None
        alive, metrics = host_view((alive_dev, metrics_dev))
        self.progress.advance()
        for m, log in self.logs.items():
            if m in self.failed:
                continue
            row = {k: float(v[m]) for k, v in metrics.items()}
            if not alive[m]:
                bad = [k for k in GUARDED_METRICS if k in row and not math.isfinite(row[k])]
                reason = ", ".join(f"{k} is {row[k]}" for k in bad) or "non-finite values"
                self.failed[m] = {"step": step, "reason": reason}
                log.write(step, {"failed": reason})
                self.say(f"swarm member {m} ({self.cfgs[m].train.output_dir}): {reason} at step {step}: marked "
                         "failed; its updates are masked and the other members go on")
                continue
            self.tokens_total[m] += row["tokens_step"]
            row["tokens_total"] = self.tokens_total[m]
            if step % self.every == 0 or step == self.steps:
                self.history[m].append({"step": step, **row})
                log.write(step, row)
        if step != self.start_step + 1:
            mine = float(sum(metrics["tokens_step"][m] for m in self.local))
            self._window = (self._window[0], self._window[1] + mine)
        if step % self.every == 0 or step == self.steps:
            now = time.perf_counter()
            live = [float(metrics["loss"][m]) for m in self.local if m not in self.failed]
            loss = f"loss {min(live):.4f}..{max(live):.4f}" if live else "every member failed"
            rate = self._window[1] / max(now - self._window[0], 1e-9)
            together = "this process's members together" if self._whose else "all members together"
            self.say(f"swarm step {step}: {loss} over {len(live)}/{len(self.local)} members{self._whose}, "
                     f"{rate:,.0f} tokens/s ({together})")
            self._window = (now, 0.0)

    def write_eval(self, step: int, values: list[dict[str, float]]) -> None:
        for m, log in self.logs.items():
            if m not in self.failed:
                log.write(step, values[m])

    def close(self) -> None:
        self.progress.close()
        for log in self.logs.values():
            log.close()


def _swarm_config(cfgs: Sequence[ExperimentConfig], swarm_dir: Path) -> ExperimentConfig:
    """Member 0's config with the swarm's folder: what the checkpoint's config check compares."""
    return cfgs[0].replace(train=dataclasses.replace(cfgs[0].train, output_dir=str(swarm_dir)))


def _restore(checkpoints: RunCheckpoints, setup: SwarmSetup, base: ExperimentConfig, cfgs, sources, *,
             allow_config_change: bool, say) -> tuple[Any, int, dict[int, dict]] | None:
    """The newest good checkpoint's stacked state, step and failed members (every member's); `sources` (this
    process's members', in local_members order) get their saved states."""
    resumed = checkpoints.restore_latest(setup.abstract_state, base, allow_config_change=allow_config_change)
    if resumed is None:
        return None
    data = resumed.data_state
    runs = [str(c.train.output_dir) for c in cfgs]
    if data.get("runs") != runs:
        raise ConfigMismatchError(f"{checkpoints.directory} holds a swarm of {data.get('runs')}, not of {runs}; "
                                  "use another swarm folder (or the mixtures it was made for)")
    for m, src in zip(setup.local_members, sources):
        saved = data["members"][m]
        fingerprint = getattr(src, "fingerprint", lambda: None)()
        if fingerprint is not None and saved.get("fingerprint") != fingerprint and not allow_config_change:
            raise ConfigMismatchError(f"swarm member {m} ({runs[m]}): its data pipeline (mixture, seed, prepared "
                                      f"data) differs from the one in {resumed.path}; use another swarm folder")
        src.set_state(saved)
    failed = {int(k): v for k, v in data.get("failed", {}).items()}
    say(f"swarm resumed from {resumed.path} (step {resumed.step}, {len(failed)} failed member(s))")
    return resumed.state, resumed.step, failed


def train_swarm(member_cfgs: Sequence[ExperimentConfig], swarm_dir: str | Path, *,
                mesh: jax.sharding.Mesh | None = None, sources: Sequence | None = None,
                log_fn: Callable[[str], None] | None = None, allow_config_change: bool = False,
                stop_after_step: int | None = None, setup: SwarmSetup | None = None) -> SwarmResult:
    """Trains the members (equal but for MEMBER_KEYS) together to train.steps; resumes from the newest good
    checkpoint under `<swarm_dir>/checkpoints/`. `stop_after_step` ends the run after that step with a
    checkpoint of it, as a preemption would. `setup` reuses programs from build_swarm_setup (same config and
    member count). `sources`: this process's members' data sources (default: member_source of each).

    With several jax.distributed processes every process calls this with the same configs; each feeds, logs
    and evaluates its own members (SwarmSetup.local_members), so `eval`, `history` and the returned state's
    readable shards cover those members; `failed` and swarm.json cover all of them."""
    cfgs = list(member_cfgs)
    check_members(cfgs)
    swarm_dir = storage.location(swarm_dir)
    base = _swarm_config(cfgs, swarm_dir)
    k, steps = len(cfgs), base.train.steps
    if setup is None:
        mesh = mesh or swarm_mesh(k, base)
        validate_for_mesh(base, Layout(mesh, member_rules(base)).axis_size("batch"), 1)
        setup = build_swarm_setup(base, k, mesh)
    local = setup.local_members
    lead = jax.process_index() == 0
    say = log_fn or (lambda text: print(text, flush=True))
    sources = list(sources) if sources is not None else [member_source(cfgs[m]) for m in local]
    if len(sources) != len(local):
        raise ValueError(f"train_swarm got {len(sources)} data sources for this process's {len(local)} members")
    storage.make_dirs(swarm_dir)
    checkpoints = RunCheckpoints(checkpoint_dir(swarm_dir), base.checkpoint, log=say)
    logs = guard = None
    try:
        restored = _restore(checkpoints, setup, base, cfgs, sources, allow_config_change=allow_config_change,
                            say=say)
        if restored is None:
            state, start, failed = setup.init_state(member_keys([c.train.seed for c in cfgs])), 0, {}
        else:
            state, start, failed = restored
        if lead:
            save_config(base, swarm_dir / "config.yaml")
        logs = _MemberLogs(cfgs, local, swarm_dir=swarm_dir, start_step=start, failed=failed, say=say,
                           tokens_before={m: sum(s.tokens_seen().values()) for m, s in zip(local, sources)})
        if log_fn is None and lead:  # printed above the progress bar, as a single run prints
            say = checkpoints.log = logs.say = logs.progress.message
        spread = f", {len(local)} on each of {jax.process_count()} processes" if len(local) != k else ""
        say(f"mixlm swarm: {k} members of {base.model.name or base.model.family} in one step, mesh "
            f"{dict(setup.mesh.shape)} (members over '{MEMBER_AXIS}'{spread}), {base.train.global_batch_size} x "
            f"{base.data.seq_len} tokens/step each, steps {start + 1}..{steps}")
        alive = setup.put_members(np.array([m not in failed for m in range(k)]))
        guard = PreemptionGuard(checkpoints, log=say).install()
        eval_cache = None
        preempted_at = None

        def save(step: int) -> None:
            logs.flush()  # the failed members of this step are known before it is saved
            mine = {m: {"state": s.get_state(), "tokens": s.tokens_seen()} for m, s in zip(local, sources)}
            every = gather_members(mine)
            tokens = [every[m]["tokens"] for m in range(k)]
            meta = run_metadata(base, step, tokens_seen={d: sum(t.get(d, 0) for t in tokens)
                                                         for d in tokens[0]}, mesh=setup.mesh)
            meta["members"] = [{"output_dir": c.train.output_dir, "tokens_seen": t} for c, t in zip(cfgs, tokens)]
            data_state = {"version": SWARM_STATE_VERSION, "runs": [str(c.train.output_dir) for c in cfgs],
                          "members": [every[m]["state"] for m in range(k)],
                          "failed": {str(m): v for m, v in sorted(gather_members(failed).items())}}
            checkpoints.save(step, state, data_state=data_state, meta=meta)

        def run_eval(step: int) -> list[dict[str, float]]:
            nonlocal eval_cache
            logs.flush()
            eval_cache = eval_cache or stacked_eval_batches(sources, base.eval.batches)
            values = evaluate_members(setup, state.params, *eval_cache)
            logs.write_eval(step, values)
            return values

        for step in range(start + 1, steps + 1):
            host = [src.next_batch() for src in sources]
            if step == start + 1 and host[0]["inputs"].shape[0] != base.train.global_batch_size:
                raise ValueError(f"data source gave {host[0]['inputs'].shape[0]} rows, expected "
                                 f"train.global_batch_size={base.train.global_batch_size}")
            state, alive, metrics = setup.train_step(state, alive, setup.put_batch(host))
            logs.record(step, alive, metrics)
            if base.eval.batches and base.eval.every and step % base.eval.every == 0 and step != steps:
                run_eval(step)
            stopping = guard.requested(step) or step == stop_after_step
            if stopping or checkpoints.should_save(step, steps):
                save(step)
            if stopping:
                checkpoints.wait()
                preempted_at = step
                say(f"swarm stopped after step {step}: checkpoint saved in {checkpoints.directory / str(step)}; "
                    "rerun the same command to resume")
                break
        logs.flush()
        final = [{} for _ in range(k)]
        failed = gather_members(failed)
        if preempted_at is None:
            if base.eval.batches:
                final = run_eval(steps)
            for m in failed:
                final[m] = {}
            if lead:
                storage.write_atomic(swarm_dir / SWARM_DONE, json.dumps({
                    "runs": [str(c.train.output_dir) for c in cfgs], "steps": steps,
                    "failed": {str(m): v for m, v in sorted(failed.items())}}, indent=1) + "\n")
        return SwarmResult(state=state, eval=final, failed=dict(failed), swarm_dir=swarm_dir,
                           preempted_at=preempted_at, history=logs.history)
    finally:
        if guard is not None:
            guard.uninstall()
        if logs is not None:
            logs.close()
        checkpoints.close()
        for src in sources:
            src.close()
