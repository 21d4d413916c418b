"""The mixture search: round 0 samples mixtures around the token prior (`mix sample`) and trains them at every
proxy scale (`mixlm sweep`); the fit (`mix fit`) over the search scale's runs feeds the proposal (`mix optimize`).
Each refinement round then samples around the last proposal (the proposal itself is the round's first mixture,
so each round also measures the loss of the one before), trains them at the search scale, refits on every round
so far and proposes again, until the proposal moves less than refine.stop_below (L1 of the weights) or the
rounds are spent.

Run ids never repeat across rounds (round r numbers its mixtures after round r-1's), so `mix fit` pools the
rounds' tables as they are. A refinement round's folder is laid out as `mix sample` lays one out (a
mixture_NNNN.yaml per mixture and mixtures.csv), written by the study: the sampler there is `mix sample`'s own
(mixlm.mixing.sample_mixtures) over a prior centred on the proposal, bounded by the data's real token counts.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np

from mixlm.config import load_config
from mixlm.study.graph import Stage, StageWork
from mixlm.study.pipeline import Study, Training, config_hash
from mixlm.study.runner import sweep_argv
from mixlm.study.verbs import run_verb

PRIOR_MIX = 0.05  # share of the token prior mixed into a refinement round's centre, so no domain has weight 0


def run_tokens(config: str, overrides) -> int:
    """Tokens one run of the config trains (steps x global batch x sequence length)."""
    cfg = load_config(config, list(overrides))
    return cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len


def token_budget(study: Study) -> float | None:
    """The repetition bound's budget: the validation run's tokens ('target'), None ('data': RegMix's bound by share)
    or the number given."""
    budget = study.spec.prior.token_budget
    if budget == "data":
        return None
    if budget == "target":
        v = study.spec.validation
        return float(run_tokens(study.spec.relative(v.config), v.overrides))
    return float(budget)


def target_columns(targets) -> str:
    return ",".join(f"metric/{t}_val_loss" for t in targets)


def study_overrides(study: Study, config: str, overrides, data_outputs: dict | None) -> list[str]:
    """A training config's overrides as the study runs it: the user's, then the study's prepared folder and the
    eval-only targets added to eval.domains (so every run reports the target's loss)."""
    spec = study.spec
    mixed = set(data_outputs["domains"]) if data_outputs else set(spec.data.domains)
    have = load_config(config, list(overrides)).eval.domains
    wanted = list(dict.fromkeys([*have, *(t for t in spec.data.target if t not in mixed)]))
    out = list(overrides)
    if data_outputs:
        out.append(f"data.prepared_dir={data_outputs['prepared_dir']}")
    if wanted != list(have):
        out.append(f"eval.domains={json.dumps(wanted)}")
    return out


def _prior_flags(study: Study, budget: float | None) -> list[str]:
    p = study.spec.prior
    flags = ["--temperature", repr(p.temperature), "--min-strength", repr(p.min_strength), "--max-strength",
             repr(p.max_strength), "--num-strengths", str(p.num_strengths), "--max-epochs", repr(p.max_epochs)]
    return flags + (["--token-budget", repr(budget)] if budget else [])


def _sample_work(study: Study, prepared: Stage, budget):
    spec = study.spec

    def work(task: StageWork) -> dict:
        data = study.outputs(prepared.name)
        run_verb(task, ["mix", "sample", "--prior", data["prepared_dir"], "--domains", ",".join(data["domains"]),
                        "-n", str(spec.search.mixtures), "--seed", str(spec.search.seed), "--minimum",
                        repr(spec.prior.minimum), *_prior_flags(study, budget), "--out", task.folder])
        return {"mixtures": os.fspath(task.folder / "mixtures.csv"), "first_index": 1, "count": spec.search.mixtures}

    return work


def _refine_work(study: Study, prepared: Stage, previous: Stage, r: int, first_index: int, budget):
    spec, refine = study.spec, study.spec.refine

    def work(task: StageWork) -> dict:
        from mixlm.mixing import (
            DomainPrior,
            load_prior,
            mixtures_table,
            sample_mixtures,
            write_csv,
            write_mixture_yaml,
        )

        data = study.outputs(prepared.name)
        prior = load_prior(data["prepared_dir"], data["domains"])
        proposal = study.outputs(previous.name)["weights"]
        centre_D = np.array([proposal.get(d, 0.0) for d in prior.domains])
        centre_D = (1 - PRIOR_MIX) * centre_D / centre_D.sum() + PRIOR_MIX * prior.shares_D
        around = DomainPrior(prior.domains, centre_D, prior.tokens_D)
        mixtures = [dict(zip(prior.domains, (proposal.get(d, 0.0) for d in prior.domains)))]
        mixtures += sample_mixtures(around, refine.mixtures - 1, spec.search.seed + r, temperature=1.0,
                                    min_strength=refine.min_strength, max_strength=refine.max_strength,
                                    num_strengths=refine.num_strengths, max_usage=spec.prior.max_epochs,
                                    token_budget=budget, minimum=spec.prior.minimum)
        table = mixtures_table(mixtures, prior.domains, first_index=first_index)
        for i, weights in zip(table.index_N, mixtures):
            what = f"the round {r - 1} proposal" if i == first_index else f"around the round {r - 1} proposal"
            write_mixture_yaml(task.folder / f"mixture_{i:04d}.yaml", weights,
                               comment=f"mixlm study: refinement round {r}, run {i}: {what}")
        write_csv(task.folder / "mixtures.csv", table)
        task.log(f"study: round {r}: {len(mixtures)} mixtures around the round {r - 1} proposal -> {task.folder}")
        return {"mixtures": os.fspath(task.folder / "mixtures.csv"), "first_index": first_index,
                "count": len(mixtures)}

    return work


def sweep_stage(study: Study, name: str, scale, sample: Stage, prepared: Stage, runs: int, limit: int = 0) -> Stage:
    """A sweep of `scale`'s config over the mixtures `sample` wrote (its first `limit`), as its own stage."""
    config = study.spec.relative(scale.config)
    execution = {"swarm": scale.swarm} if scale.swarm else {"parallel": scale.parallel}
    stage = Stage(name, "sweep", {"config": config_hash(config, scale.overrides), "limit": limit,
                                  "targets": study.spec.data.target, **execution}, deps=(sample, prepared))

    def argv(task_folder, shard: str = "") -> list[str]:
        data = study.outputs(prepared.name)
        return sweep_argv(config, study_overrides(study, config, scale.overrides, data),
                          study.outputs(sample.name)["mixtures"], task_folder, swarm=scale.swarm,
                          parallel=scale.parallel, limit=limit, shard=shard)

    def work(task: StageWork) -> dict:
        task.trained = True
        run_verb(task, argv(task.folder))
        return {"results": os.fspath(task.folder / "results.csv"), "scale": scale.name}

    def shard_work() -> None:
        from mixlm.cli import main

        code = main(argv(stage.folder(study.root), study.shard))
        if code:
            from mixlm.study.graph import StageError

            raise StageError(f"stage {name}: the sweep shard {study.shard} exited {code}", code)

    overrides = study_overrides(study, config, scale.overrides, None)
    devices = scale.devices or study.spec.cost.proxy_devices
    training = Training(config, overrides, runs, devices, lambda: argv(stage.folder(study.root)), swarm=scale.swarm)
    study.stage(stage, work, training=training, shard_work=shard_work)
    return stage


def _fit_work(study: Study, samples: list[Stage], sweeps: list[Stage]):
    fit = study.spec.search.fit

    def work(task: StageWork) -> dict:
        argv = ["mix", "fit", "--mixtures", *(study.outputs(s.name)["mixtures"] for s in samples),
                "--results", *(study.outputs(s.name)["results"] for s in sweeps),
                "--target", target_columns(study.spec.data.target), "--out", task.folder,
                "--folds", str(fit.folds), "--seed", str(fit.seed)]
        argv += ["--regressors", ",".join(fit.regressors)] if fit.regressors else []
        argv += ["--repeats", str(fit.repeats)] if fit.repeats else []
        run_verb(task, argv)
        model = json.loads((task.folder / "model.json").read_text())
        chosen = model["primary"]
        return {"model": os.fspath(task.folder), "chosen": chosen, "reason": model["choice"]["reason"],
                "runs": model["runs"], "spearman": model["cv"][chosen]["spearman"], "warnings": model["warnings"]}

    return work


def _weight_flag(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{d}={float(w)!r}" for d, w in value.items())
    return repr(float(value))


def prediction_interval(model_dir: str, regressor: str, weights: dict, confidence: float) -> dict:
    """The model's prediction for `weights` with an interval of z x the RMSE of its out-of-fold errors (what
    repeated k-fold CV says it misses by on runs it did not see), and the GP's own std where it has one."""
    from mixlm.mixing import load_model

    model = load_model(model_dir)
    x_1xD = np.array([[weights.get(d, 0.0) for d in model.domains]])
    predicted = float(model.predict(x_1xD, regressor)[0])
    std = model.predict_std(x_1xD, regressor)
    oof_N = model.oof_N.get(regressor)
    errors = (oof_N - model.actual_N) if oof_N is not None else np.zeros(0)
    errors = errors[np.isfinite(errors)]
    rmse = float(np.sqrt(np.mean(errors**2))) if len(errors) else math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"predicted": predicted, "low": predicted - z * rmse, "high": predicted + z * rmse, "oof_rmse": rmse,
            "std": None if std is None else float(std[0]), "regressor": regressor}


def _propose_work(study: Study, prepared: Stage, fit_stage: Stage, budget):
    spec = study.spec
    propose = spec.search.propose

    def work(task: StageWork) -> dict:
        from mixlm.mixing import read_mixture_yaml

        data = study.outputs(prepared.name)
        best = task.folder / "best.yaml"
        argv = ["mix", "optimize", "--model", study.outputs(fit_stage.name)["model"], "--prior", data["prepared_dir"],
                "--domains", ",".join(data["domains"]), "--out", best, "--samples", str(propose.samples),
                "--top-k", str(propose.top_k), "--seed", str(propose.seed), "--min-weight",
                _weight_flag(propose.min_weight), "--max-weight", _weight_flag(propose.max_weight), "--zero-below",
                repr(propose.zero_below), *_prior_flags(study, budget)]
        argv += ["--max-kl", repr(propose.max_kl)] if propose.max_kl is not None else []
        argv += ["--max-l1", repr(propose.max_l1)] if propose.max_l1 is not None else []
        run_verb(task, argv)
        written = read_mixture_yaml(os.fspath(best))
        weights = {d: float(written.get(d, 0.0)) for d in data["domains"]}
        chosen = study.outputs(fit_stage.name)["chosen"]
        predicted = prediction_interval(study.outputs(fit_stage.name)["model"], chosen, weights,
                                        spec.report.confidence)
        return {"mixture": os.fspath(best), "weights": weights, **predicted}

    return work


def moved(a: dict, b: dict) -> float:
    """L1 distance between two mixtures (0: the same, 2: disjoint)."""
    return float(sum(abs(a.get(d, 0.0) - b.get(d, 0.0)) for d in set(a) | set(b)))


def search_stages(study: Study, prepared: Stage) -> Stage:
    """Round 0 and the refinement rounds (module docstring); returns the last proposal's stage."""
    spec = study.spec
    budget = token_budget(study)
    prior = {**vars(spec.prior), "token_budget": budget}
    sample = Stage("sample-r0", "sample", {"domains": spec.data.domains, "n": spec.search.mixtures,
                                           "seed": spec.search.seed, "prior": prior}, deps=(prepared,))
    study.stage(sample, _sample_work(study, prepared, budget))
    search_scale = spec.search_scale
    samples, sweeps = [sample], []
    for scale in spec.search.scales:
        limit = scale.mixtures if scale.mixtures and scale.mixtures < spec.search.mixtures else 0
        stage = sweep_stage(study, f"sweep-{scale.name}-r0", scale, sample, prepared,
                            runs=limit or spec.search.mixtures, limit=limit)
        if scale is search_scale:
            sweeps.append(stage)
    fit_settings = {**vars(spec.search.fit), "target": spec.data.target}
    propose_settings = {**vars(spec.search.propose), "prior": prior, "confidence": spec.report.confidence}
    fit = Stage("fit-r0", "fit", fit_settings, deps=(*samples, *sweeps))
    study.stage(fit, _fit_work(study, list(samples), list(sweeps)))
    proposal = Stage("propose-r0", "propose", propose_settings, deps=(fit, prepared))
    last = study.stage(proposal, _propose_work(study, prepared, fit, budget))
    first_index = 1 + spec.search.mixtures
    refine = spec.refine
    for r in range(1, refine.rounds + 1):
        settings = {**vars(refine), "round": r, "first_index": first_index, "seed": spec.search.seed + r,
                    "prior": prior}
        sample = Stage(f"sample-r{r}", "refine", settings, deps=(proposal, prepared))
        study.stage(sample, _refine_work(study, prepared, proposal, r, first_index, budget))
        first_index += refine.mixtures
        samples.append(sample)
        sweeps.append(sweep_stage(study, f"sweep-{search_scale.name}-r{r}", search_scale, sample, prepared,
                                  runs=refine.mixtures))
        fit = Stage(f"fit-r{r}", "fit", fit_settings, deps=(*samples, *sweeps))
        study.stage(fit, _fit_work(study, list(samples), list(sweeps)))
        previous_stage, previous = proposal, last
        proposal = Stage(f"propose-r{r}", "propose", propose_settings, deps=(fit, prepared))
        last = study.stage(proposal, _propose_work(study, prepared, fit, budget))
        if last is not None and previous is not None:
            distance = moved(last["weights"], previous["weights"])
            if distance < refine.stop_below:
                study.notes[proposal.name] = (f"moved {distance:.4f} < {refine.stop_below} from "
                                              f"{previous_stage.name}: the search stops here")
                break
    return proposal
