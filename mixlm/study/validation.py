"""Validation at the target scale: the proposal beside the baselines, each trained with the validation config at
every seed (`mixlm train`, one run folder per candidate and seed, so a run is also a job of its own on a
cluster), then exported (`mixlm export`) and evaluated (`mixlm eval`) at the first seed.

    candidates            proposed.yaml (`mix optimize`), natural.yaml (`mix prior`), uniform.yaml, <baseline>.yaml;
                          train/<name>.yaml: what its runs train (every study domain, zeros kept, so each run
                          reports every domain's loss); mixtures.csv of the fixed ones; candidates.json
    candidates-<scale>    the fixed candidates trained at each proxy scale (`mixlm sweep`): what each proxy
                          measures for them, the bridge from the search's losses to the target's
    validate-<c>-seed<s>  `mixlm train <validation config> data.mixture=<c>.yaml train.seed=s data.seed=s`
    export-<c>, eval-<c>  `mixlm export` of the first seed's run, `mixlm eval` of that export

An online baseline (`online: KIND`, mixing.kind of issue 27) trains from the natural mixture with
`mixing.kind=KIND` and its overrides; it has no fixed mixture, so it is neither predicted nor swept at the
proxy scales.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from mixlm import storage
from mixlm.study.graph import Stage, StageWork
from mixlm.study.pipeline import Study, Training, config_hash
from mixlm.study.runner import run_result
from mixlm.study.search import study_overrides, sweep_stage
from mixlm.study.verbs import run_verb


def candidate_names(study: Study) -> list[str]:
    return ["proposed", *(b.name for b in study.spec.validation.baselines)]


def _baseline_settings(study: Study) -> list[dict]:
    out = []
    for b in study.spec.validation.baselines:
        entry = {"name": b.name, "kind": b.kind, "online": b.online, "overrides": b.overrides}
        if b.mixture:
            entry["mixture"] = hashlib.sha256(Path(study.spec.relative(b.mixture)).read_bytes()).hexdigest()
        out.append(entry)
    return out


def _candidates_work(study: Study, prepared: Stage, proposal: Stage):
    def work(task: StageWork) -> dict:
        import yaml

        from mixlm.errors import ConfigError
        from mixlm.mixing import mixtures_table, read_mixture_yaml, write_csv, write_mixture_yaml

        data = study.outputs(prepared.name)
        domains, natural = data["domains"], data["natural_domains"]
        folder = task.folder
        folder.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(folder / "proposed.yaml", storage.location(study.outputs(proposal.name)["mixture"])
                             .read_bytes())
        weights = {"proposed": study.outputs(proposal.name)["weights"]}
        entries = [{"name": "proposed", "kind": "proposed", "mixture": "proposed.yaml"}]
        for b in study.spec.validation.baselines:
            path = folder / f"{b.name}.yaml"
            if b.kind in ("natural", "online"):  # an online baseline starts from the natural mixture
                run_verb(task, ["mix", "prior", "--prior", data["prepared_dir"], "--domains", ",".join(natural),
                                "--out", path])
            elif b.kind == "uniform":
                write_mixture_yaml(path, {d: 1 / len(natural) for d in natural},
                                   comment="mixlm study: the uniform mixture over the study's domains")
            else:
                given = read_mixture_yaml(study.spec.relative(b.mixture))
                unknown = sorted(set(given) - set(domains))
                if unknown:
                    raise ConfigError(f"validation baseline {b.name}: {b.mixture} names {unknown}, not among the "
                                      f"study's domains {domains}")
                write_mixture_yaml(path, given, comment=f"mixlm study: baseline {b.name} from {b.mixture}")
            read = read_mixture_yaml(os.fspath(path))
            weights[b.name] = {d: read.get(d, 0.0) / sum(read.values()) for d in domains}
            entries.append({"name": b.name, "kind": b.kind, "mixture": path.name})
        # What the runs train: every study domain listed, zeros kept, so each run reports every domain's loss.
        for name, mixture in weights.items():
            text = f"# mixlm study: candidate {name} (every study domain; zeros kept)\n"
            storage.write_atomic(folder / "train" / f"{name}.yaml", text + yaml.safe_dump(
                {d: float(mixture.get(d, 0.0)) for d in domains}, sort_keys=False))
        fixed = [e["name"] for e in entries if e["kind"] != "online"]
        write_csv(folder / "mixtures.csv", mixtures_table([weights[n] for n in fixed], domains))
        for entry in entries:
            entry["index"] = fixed.index(entry["name"]) + 1 if entry["name"] in fixed else None
        storage.write_json(folder / "candidates.json", entries)
        return {"mixtures": os.fspath(folder / "mixtures.csv"), "candidates": entries,
                "weights": {n: weights[n] for n in fixed}, "folder": os.fspath(folder)}

    return work


def _validate_argv(study: Study, prepared: Stage, candidates: Stage, name: str, seed: int, extra: list[str],
                   folder) -> list[str]:
    """`mixlm train` of candidate `name` at `seed` into `folder`/<name>-seed<seed>/ (`mixlm plot` labels runs by
    their folder)."""
    v = study.spec.validation
    data = study.outputs(prepared.name)
    config = study.spec.relative(v.config)
    mixture = storage.location(study.outputs(candidates.name)["folder"]) / "train" / f"{name}.yaml"
    return ["train", config, *study_overrides(study, config, v.overrides, data), *extra, f"data.mixture={mixture}",
            f"train.seed={seed}", f"data.seed={seed}", "checkpoint.save_at_end=true",
            f"train.output_dir={folder / f'{name}-seed{seed}'}"]


def _validate_work(study: Study, prepared: Stage, candidates: Stage, name: str, seed: int, extra: list[str]):
    def work(task: StageWork) -> dict:
        task.trained = True
        argv = _validate_argv(study, prepared, candidates, name, seed, extra, task.folder)
        run_verb(task, argv)  # a run finished before (trained by hand, or killed after it) trains nothing again
        run = argv[-1].split("=", 1)[1]
        return {"run": run, "candidate": name, "seed": seed, "eval": run_result(task, run)["eval"]}

    return work


def _export_work(study: Study, validate: Stage):
    spec = study.spec.export

    def work(task: StageWork) -> dict:
        out = task.folder / "hf"
        argv = ["export", study.outputs(validate.name)["run"], out, "--overwrite", "--dtype", spec.dtype]
        run_verb(task, argv + (["--verify"] if spec.verify else []))
        return {"hf": os.fspath(out)}

    return work


def _eval_work(study: Study, prepared: Stage, export: Stage):
    spec = study.spec.eval

    def work(task: StageWork) -> dict:
        data = study.outputs(prepared.name)
        model = study.outputs(export.name)["hf"]
        common = ["--device", spec.device, "--batch-size", spec.batch_size]
        common += ["--limit", repr(spec.limit)] if spec.limit else []
        written = []
        local = []
        if spec.domains:
            domains = list(dict.fromkeys([*data["natural_domains"], *data["targets"]]))
            local += ["--domains", f"{data['prepared_dir']}:{','.join(domains)}"]
        for task_spec in spec.mc_tasks:
            local += ["--mc-task", task_spec]
        if local:
            out = task.folder / "eval_local.json"
            run_verb(task, ["eval", model, *local, *common, "--out", out])
            written.append(os.fspath(out))
        for suite in spec.suites:
            out = task.folder / f"eval_{suite}.json"
            run_verb(task, ["eval", model, "--suite", suite, *common, "--out", out])
            written.append(os.fspath(out))
        return {"results": written}

    return work


def validation_stages(study: Study, prepared: Stage, proposal: Stage) -> None:
    """The stages from the candidates to their evaluations (module docstring)."""
    spec, v = study.spec, study.spec.validation
    candidates = Stage("candidates", "candidates", {"baselines": _baseline_settings(study)},
                       deps=(proposal, prepared))
    study.stage(candidates, _candidates_work(study, prepared, proposal))
    fixed = [b for b in v.baselines if b.kind != "online"]
    for scale in spec.search.scales:
        sweep_stage(study, f"candidates-{scale.name}", scale, candidates, prepared, runs=1 + len(fixed))
    config = spec.relative(v.config)
    base_hash = config_hash(config, v.overrides)
    baselines = {b.name: b for b in v.baselines}
    first: dict[str, Stage] = {}
    for seed in v.seeds:
        for name in candidate_names(study):
            b = baselines.get(name)
            extra = [f"mixing.kind={b.online}", *b.overrides] if b is not None and b.online else []
            stage = Stage(f"validate-{name}-seed{seed}", "train",
                          {"config": base_hash, "seed": seed, "candidate": name, "extra": extra},
                          deps=(candidates, prepared))
            overrides = study_overrides(study, config, v.overrides, None)
            training = Training(config, [*overrides, *extra], 1, spec.cost.devices,
                                functools.partial(_validate_argv, study, prepared, candidates, name, seed, extra,
                                                  stage.folder(study.root)))
            study.stage(stage, _validate_work(study, prepared, candidates, name, seed, extra), training=training)
            first.setdefault(name, stage)
    if not spec.export.enabled:
        return
    for name in spec.export.candidates or candidate_names(study):
        settings = {k: v for k, v in vars(spec.export).items() if k != "candidates"}
        export = Stage(f"export-{name}", "export", settings, deps=(first[name],))
        study.stage(export, _export_work(study, first[name]))
        if spec.eval.enabled:
            evaluate = Stage(f"eval-{name}", "eval", vars(spec.eval), deps=(export, prepared))
            study.stage(evaluate, _eval_work(study, prepared, export))
