"""The training loop: one config (a run) or K member configs (a swarm, trained together in one jitted step),
with its features as hooks (mixlm.hooks).

    result = train(cfg)                                   # a run in cfg.train.output_dir
    result = train(member_cfgs, "runs/sweep/swarms/0001-0004")   # K members, each in its own output_dir

The programs come from mixlm.setup.build_setup (the step and its state live in mixlm.train_step); a swarm's
members share everything but mixlm.members.MEMBER_KEYS (their mixture, data seed, train seed and folder). Every
member writes its own run folder (mixlm.run_dir.RunDir): config.yaml, metrics.jsonl and, once it reached
train.steps and its final evaluation is logged, result.json; a swarm member that goes non-finite is marked
failed (result.json status 'failed') while the others go on. A single run keeps its checkpoints in its own
folder; a swarm's (the stacked state, and every member's data state) go to the swarm's folder, which also holds
its config.yaml and shows its progress bar. When the data carries domain ids, the step also sums each member's loss
and tokens per domain (logged as train_loss/<domain>; what online mixing, mixlm.mixing.online, reads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax

from mixlm import collectives, storage
from mixlm.checkpoint import CheckpointError, RunCheckpoints, checkpoint_dir, resolve_step_dir, restore_params
from mixlm.checkpoint.metadata import check_resume_config
from mixlm.config import ExperimentConfig, load_yaml, save_config, validate_for_mesh
from mixlm.data import make_train_source
from mixlm.errors import NonFiniteLossError, os_reason
from mixlm.hooks import Hook, Run, StepMeter, default_hooks, evaluate
from mixlm.members import (
    check_members,
    member_mesh,
    member_owners,
    member_rules,
    member_source,
    restore_swarm_data,
)
from mixlm.metrics import MetricsLog, peak_flops_per_device
from mixlm.models.forward import token_losses
from mixlm.run_dir import RunDir
from mixlm.setup import TrainSetup, build_setup, program_key
from mixlm.sharding import DEFAULT_RULES, Layout, make_mesh, to_global_batch
from mixlm.train_step import TrainState, batch_sums

__all__ = ["MemberResult", "NonFiniteLossError", "TrainResult", "TrainSetup", "TrainState", "batch_sums",
           "build_setup", "evaluate", "program_key", "to_global_batch", "token_losses", "train"]


@dataclasses.dataclass
class MemberResult:
    """What one member (a single run: the run) reached: its logged rows (this process's members only), final
    evaluation, last train loss, and {'step', 'reason'} when it failed."""

    out_dir: str
    history: list[dict] = dataclasses.field(default_factory=list)
    eval: dict[str, float] = dataclasses.field(default_factory=dict)
    loss: float | None = None
    failed: dict | None = None


@dataclasses.dataclass
class TrainResult:
    state: TrainState | None  # None when the run had finished before (nothing was restored)
    step: int
    members: list[MemberResult]
    preempted_at: int | None = None  # the step saved before stopping on SIGTERM/SIGINT (or a hook), else None
    # The run had finished before (its result.json says so): nothing was trained, restored or written.
    already_finished: bool = False

    @property
    def history(self) -> list[dict]:
        """A single run's logged rows (one metrics dict per logged step)."""
        return self.members[0].history

    @property
    def eval(self) -> dict[str, float]:
        """A single run's final evaluation."""
        return self.members[0].eval

    @property
    def out_dir(self) -> str:
        return self.members[0].out_dir

    @property
    def failed(self) -> dict[int, dict]:
        """The failed members of a swarm: member -> {'step', 'reason'}."""
        return {m: r.failed for m, r in enumerate(self.members) if r.failed}


def swarm_config(cfgs: Sequence[ExperimentConfig], swarm_dir) -> ExperimentConfig:
    """Member 0's config with the swarm's folder: what the swarm's checkpoints are checked against."""
    return cfgs[0].replace(train=dataclasses.replace(cfgs[0].train, output_dir=str(swarm_dir)))


def check_batch_shape(host_batch: dict, cfg: ExperimentConfig, members: int) -> None:
    """A single run's processes each feed their share of the global batch; a swarm member's owner feeds it
    whole."""
    rows = host_batch["inputs"].shape[0] * (jax.process_count() if members == 1 else 1)
    if rows != cfg.train.global_batch_size:
        raise ValueError(f"data source gave {rows} global rows, expected train.global_batch_size={cfg.train.global_batch_size}")
    if (host_batch["inputs"].shape[0]) % cfg.train.grad_accum_steps:
        raise ValueError(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps} must divide the per-host batch "
            f"{host_batch['inputs'].shape[0]}"
        )


def initial_state(setup: TrainSetup, cfgs: Sequence[ExperimentConfig], checkpoints: RunCheckpoints, sources, *,
                  allow_config_change: bool, say: Callable[[str], None],
                  on_data_state: Callable[[dict], None] | None = None) -> tuple[TrainState, int, dict[int, dict]]:
    """(state, step, failed members). Resumes from the newest good checkpoint of the run's folder (state, data
    positions and a swarm's failed members), else initialises from `checkpoint.init_from` (params only, every
    member the same: fresh optimizer, step 0, data from the start), else from each member's `train.seed`.
    `on_data_state` hears the resumed checkpoint's whole data state (with the hooks' states)."""
    cfg = setup.cfg
    resumed = checkpoints.restore_latest(setup.abstract_state, cfg, allow_config_change=allow_config_change)
    if resumed is not None:
        if on_data_state is not None:
            on_data_state(resumed.data_state)
        failed: dict[int, dict] = {}
        if setup.members == 1:
            sources[0].set_state(resumed.data_state)
        else:
            failed = restore_swarm_data(resumed.data_state, cfgs, setup.local_members, sources, where=resumed.path,
                                        allow_config_change=allow_config_change)
        init_from = cfg.checkpoint.init_from
        note = f"; checkpoint.init_from={init_from!r} ignored (this folder has its own)" if init_from else ""
        lost = f", {len(failed)} failed member(s)" if failed else ""
        say(f"resumed from {resumed.path} (step {resumed.step}, "
            f"{resumed.meta.get('tokens_seen_total', 0):,} tokens seen{lost}){note}")
        return resumed.state, resumed.step, failed
    if cfg.checkpoint.init_from:
        step_dir = resolve_step_dir(cfg.checkpoint.init_from)
        params = restore_params(step_dir, setup.member_abstract_params, cfg.model.vocab_size)
        every = " for every member" if setup.members > 1 else ""
        say(f"initialised params from {step_dir}{every}; fresh optimizer state, step 0, data from the start")
        return setup.fresh_state(params), 0, {}
    return setup.initial_state([c.train.seed for c in cfgs]), 0, {}


def _member_log(cfg: ExperimentConfig, run_dir: RunDir, setup: TrainSetup, m: int, start_step: int) -> MetricsLog:
    if setup.members > 1:  # the swarm's own log shows the bar; W&B would get K runs
        cfg = cfg.replace(logging=dataclasses.replace(cfg.logging, progress=False, wandb=False))
    return MetricsLog.for_run(run_dir.path, cfg, start_step=start_step, writer=setup.writes(m))


def open_run(cfgs: Sequence[ExperimentConfig], setup: TrainSetup, sources, *, log_fn: Callable[[str], None] | None,
             allow_config_change: bool) -> Run:
    """Resumes or initialises the state, then (only after the config check passed, so a refused run leaves the
    folders as they were) writes each member's config.yaml, opens their metrics logs and prints what is about to
    run."""
    cfg, k = setup.cfg, setup.members
    run_dir = RunDir(cfg.train.output_dir)
    early_say = log_fn or (lambda text: print(text, flush=True) if jax.process_index() == 0 else None)
    checkpoints = RunCheckpoints(checkpoint_dir(run_dir.path), cfg.checkpoint, log=early_say)
    logs: dict[int, MetricsLog] = {}
    progress = None
    restored: dict = {}
    try:
        state, start_step, failed = initial_state(setup, cfgs, checkpoints, sources,
                                                  allow_config_change=allow_config_change, say=early_say,
                                                  on_data_state=restored.update)
        if k > 1 and jax.process_index() == 0:
            storage.make_dirs(run_dir.path)
            save_config(cfg, run_dir.config_file)
        for m in setup.local_members:
            member_dir = RunDir(cfgs[m].train.output_dir)
            if setup.writes(m):
                storage.make_dirs(member_dir.path)
                save_config(cfgs[m], member_dir.config_file)
                member_dir.trim_metrics(start_step)
                if m not in failed:
                    member_dir.clear_result()  # it trains (again): an older result is not its result
            logs[m] = _member_log(cfgs[m], member_dir, setup, m, start_step)
        progress = logs[0] if k == 1 else MetricsLog(
            run_dir.path, total_steps=cfg.train.steps, start_step=start_step, jsonl=False, tensorboard=False,
            progress=cfg.logging.progress, writer=jax.process_index() == 0)
    except OSError as e:
        _close_all(logs, progress, checkpoints)
        raise CheckpointError(f"cannot write to the run folder {run_dir} ({os_reason(e)}); free space there or "
                              "fix its permissions, then rerun the same command, or choose another "
                              "train.output_dir") from None
    except BaseException:
        _close_all(logs, progress, checkpoints)
        raise
    logged = [{} for _ in range(k)]
    if start_step >= cfg.train.steps:  # what each member logged at its last step: its loss and final evals
        for m in setup.local_members:
            for row in RunDir(cfgs[m].train.output_dir).metrics():
                if row.get("step") == start_step:
                    logged[m].update({key: v for key, v in row.items() if key != "step"})
    peak, peak_source = peak_flops_per_device(cfg.logging.peak_flops)
    say = checkpoints.log = log_fn or progress.message
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.member_abstract_params))
    what = f"{cfg.model.name or cfg.model.family} ({n_params:,} params incl. padding)"
    if k == 1:
        say(f"mixlm train: {what}, mesh {dict(setup.mesh.shape)}, {cfg.train.global_batch_size} x "
            f"{cfg.data.seq_len} tokens/step, {setup.flops_per_token / 1e6:.1f} MFLOP/token (attention counted "
            f"causally), peak {peak / 1e9:,.1f} GFLOP/s/device ({peak_source})")
    else:
        local = setup.local_members
        spread = f", {len(local)} on each of {jax.process_count()} processes" if len(local) != k else ""
        say(f"mixlm swarm: {k} members of {what} in one step, mesh {dict(setup.mesh.shape)} (members over "
            f"'data'{spread}), {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens/step each, steps "
            f"{start_step + 1}..{cfg.train.steps}")
    meter = StepMeter(cfgs, logs, progress, start_step=start_step, flops_per_token=setup.flops_per_token, peak=peak,
                      num_devices=setup.mesh.size, failed=failed, say=say,
                      tokens_before={m: sum(s.tokens_seen().values()) for m, s in zip(setup.local_members, sources)},
                      domains={m: getattr(s, "domain_names", ()) for m, s in zip(setup.local_members, sources)})
    alive = setup.put_members([m not in failed for m in range(k)]) if k > 1 else None
    return Run(cfg=cfg, cfgs=list(cfgs), setup=setup, sources=list(sources), checkpoints=checkpoints, logs=logs,
               progress=progress, say=say, meter=meter, state=state, run_dir=run_dir, step=start_step, alive=alive,
               failed=failed, latest_eval=[{} for _ in range(k)], final_eval=[{} for _ in range(k)],
               resumed_at_end=start_step >= cfg.train.steps, logged_at_end=logged,
               hook_states=member_hook_states(restored, k, setup.local_members))


def member_hook_states(data_state: dict, members: int, local: Sequence[int]) -> dict[int, dict]:
    """{member: {state_key: state}} of this process's members in a resumed checkpoint's data state (none when the
    run starts fresh)."""
    if not data_state:
        return {}
    if members == 1:
        return {0: data_state.get("hooks", {})}
    return {m: data_state["members"][m].get("hooks", {}) for m in local}


def _close_all(logs: dict, progress, checkpoints) -> None:
    for log in {id(x): x for x in [*logs.values(), *([progress] if progress else [])]}.values():
        log.close()
    checkpoints.close()


def finished_before(cfgs: Sequence[ExperimentConfig], *, allow_config_change: bool,
                    log: Callable[[str], None]) -> list[dict] | None:
    """Every member's result.json when each says its member is done (finished at train.steps, or failed), else
    None. A finished single run's config.yaml must match `cfg` as a resumed checkpoint's would (ConfigMismatchError
    naming the keys otherwise)."""
    results = [RunDir(c.train.output_dir).result() for c in cfgs]
    done = all(r is not None and (r["status"] == "failed" or r["step"] == c.train.steps)
               for r, c in zip(results, cfgs))
    if not collectives.all_processes(done):
        return None
    for c in cfgs:
        run = RunDir(c.train.output_dir)
        if run.config_file.exists():
            check_resume_config(load_yaml(run.config_file.read_text(), str(run.config_file)), c,
                                where=f"{run} (finished)", allow_change=allow_config_change, log=log)
    return results


def train(cfg: ExperimentConfig | Sequence[ExperimentConfig], swarm_dir=None, *, mesh: jax.sharding.Mesh | None = None,
          sources: Sequence | None = None, log_fn: Callable[[str], None] | None = None,
          allow_config_change: bool = False, hooks: Sequence[Hook] | None = None) -> TrainResult:
    """Runs optimizer steps up to `train.steps` for one config, or for K member configs together in one jitted
    step (a swarm: equal but for mixlm.members.MEMBER_KEYS; `swarm_dir` holds its checkpoints and config.yaml).
    Each member writes config.yaml, metrics.jsonl, TensorBoard events and result.json under its
    `train.output_dir`; a single run also its checkpoints/. `hooks` (default: mixlm.hooks.default_hooks(cfg):
    validation, live lm-eval tasks, preemption, checkpoints) run between steps on their cadence. `sources`: this
    process's members' data sources (default: made from the configs).

    Rerunning resumes from the newest good checkpoint (mixlm.checkpoint); a different config there is refused
    unless `allow_config_change`. SIGTERM/SIGINT stop the loop after the current step with a checkpoint of it
    (`TrainResult.preempted_at`). A rerun of a finished run (its result.json) trains nothing and writes nothing
    (`TrainResult.already_finished`); one resumed at train.steps before its result.json was written computes
    only what its metrics.jsonl lacks.

    Several jax.distributed processes: a single run spans them all (process 0 writes its folder); a swarm puts
    each member on one process (mixlm.members.member_owners), which feeds it, writes its folder and reports its
    failure, so `history` and `eval` cover this process's members."""
    cfgs = [cfg] if isinstance(cfg, ExperimentConfig) else list(cfg)
    check_members(cfgs)
    k = len(cfgs)
    if k > 1 and swarm_dir is None:
        raise ValueError("train() of several member configs needs the swarm's folder (swarm_dir)")
    base = cfgs[0] if k == 1 else swarm_config(cfgs, swarm_dir)
    if mesh is None:
        mesh = make_mesh(base.mesh) if k == 1 else member_mesh(k, base)
    rules = DEFAULT_RULES.with_overrides(base.mesh.rules) if k == 1 else member_rules(base)
    validate_for_mesh(base, Layout(mesh, rules).axis_size("batch"), jax.process_count() if k == 1 else 1,
                      devices=mesh.devices.flat)  # sizes checked before anything is built
    say = log_fn or (lambda text: print(text, flush=True) if jax.process_index() == 0 else None)
    done = finished_before(cfgs, allow_config_change=allow_config_change, log=say)
    if done is not None:
        return TrainResult(state=None, step=base.train.steps, already_finished=True, members=[
            MemberResult(out_dir=c.train.output_dir, eval=r["eval"], loss=r.get("loss"),
                         failed={"step": r["step"], "reason": r.get("reason", "")} if r["status"] == "failed" else None)
            for c, r in zip(cfgs, done)])
    local = [0] if k == 1 else [m for m, p in enumerate(member_owners(mesh, k)) if p == jax.process_index()]
    if sources is None:
        if k == 1:
            sources = [make_train_source(base, process_index=jax.process_index(), process_count=jax.process_count())]
        else:
            sources = [member_source(cfgs[m]) for m in local]
    sources = list(sources)
    try:
        if len(sources) != len(local):
            raise ValueError(f"train() got {len(sources)} data sources for this process's {len(local)} members")
        # the per-domain sums' length: the most domains of any member (every process compiles the same step)
        num_domains = max(collectives.allgather_json(max(len(getattr(s, "domain_names", ())) for s in sources)))
        setup = build_setup(base, mesh, members=k, num_domains=num_domains)
        hooks = default_hooks(base, members=cfgs if k > 1 else ()) if hooks is None else list(hooks)
        run = open_run(cfgs, setup, sources, log_fn=log_fn, allow_config_change=allow_config_change)
    except BaseException:
        for source in sources:
            source.close()
        raise
    run.hooks = hooks
    try:
        for hook in hooks:
            for m, states in run.hook_states.items():
                if hook.state_key and hook.state_key in states:
                    hook.load_state_dict(run, m, states[hook.state_key])
            hook.at_start(run)
        for step in range(run.step + 1, base.train.steps + 1):
            host = [source.next_batch() for source in run.sources]
            if step == run.meter.start_step + 1:
                check_batch_shape(host[0], base, k)
            batch = setup.put_batch(host)
            for hook in hooks:
                batch = hook.before_step(run, step, batch)
            if k == 1:
                run.state, metrics = setup.train_step(run.state, batch)
            else:
                run.state, run.alive, metrics = setup.train_step(run.state, run.alive, batch)
            run.step = step
            run.meter.record(step, metrics, run.alive)
            for hook in hooks:
                if hook.due(run, step):
                    hook.after_step(run, step)
            if run.stop_reason:
                break
        run.flush()
        if not run.stop_reason:
            for hook in hooks:
                hook.at_end(run)
            _write_results(run)
    finally:
        for hook in hooks:
            hook.close()
        _close_all(run.logs, run.progress, run.checkpoints)
        for source in run.sources:
            source.close()
    failed = collectives.gather_members(run.failed) if k > 1 else {}
    return TrainResult(state=run.state, step=run.step, preempted_at=run.preempted_at, members=[
        MemberResult(out_dir=c.train.output_dir, history=run.meter.history[m], eval=run.final_eval[m],
                     loss=_final_loss(run, m), failed=failed.get(m)) for m, c in enumerate(cfgs)])


def _final_loss(run: Run, m: int) -> float | None:
    return run.meter.last[m].get("loss", run.logged_at_end[m].get("loss"))


def _write_results(run: Run) -> None:
    """Each member that reached train.steps writes its result.json (its owner; a single run: process 0)."""
    for m, source in run.training:
        if run.setup.writes(m):
            RunDir(run.cfgs[m].train.output_dir).write_result(
                step=run.cfg.train.steps, eval=run.final_eval[m], tokens_seen=source.tokens_seen(),
                extra={"loss": _final_loss(run, m)})

