"""Everything a study's report states, gathered from its stage folders into one JSON-able dict (report.json).

    facts = collect(study)     # after a run-mode walk: study.records holds every done stage's stage.json

Losses are the search target: the mean of `metric/<target>_val_loss` over the study's target domains (a sweep's
results.csv), or of `val_loss/<target>` (a validation run's final evaluation). Scales are compared in the order
the study lists them (smallest first), each step on the round-0 mixtures both scales trained; each proxy scale
and the search scale's regression are then compared with the target scale on the validation candidates.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
from pathlib import Path

import numpy as np

from mixlm.study.pipeline import Study
from mixlm.study.search import prediction_interval
from mixlm.study.transfer import calibrated, rank_transfer, seed_interval


def _mean_target(values: dict, keys: list[str]) -> float:
    picked = [values.get(k) for k in keys]
    if any(v is None for v in picked):
        return math.nan
    return float(np.mean(picked))


def sweep_losses(study: Study, name: str) -> dict[int, float]:
    """{run index: target loss} of a done sweep stage (its results.csv)."""
    from mixlm.mixing import read_csv

    if name not in study.records:
        return {}
    table = read_csv(os.fspath(study.folder(name) / "results.csv"))
    columns = [f"metric/{t}_val_loss" for t in study.spec.data.target]
    values_NxT = table.select(columns)
    return {int(i): float(v) for i, v in zip(table.index_N, values_NxT.mean(axis=1))}


def _rounds(study: Study) -> list[dict]:
    spec = study.spec
    search = spec.search_scale.name
    rounds, r = [], 0
    while f"propose-r{r}" in study.records:
        sample = study.outputs(f"sample-r{r}")
        losses = sweep_losses(study, f"sweep-{search}-r{r}")
        fit, proposal = study.outputs(f"fit-r{r}"), study.outputs(f"propose-r{r}")
        if r and rounds:
            rounds[-1]["achieved"] = losses.get(sample["first_index"])
        best = min(losses.items(), key=lambda kv: kv[1]) if losses else (None, math.nan)
        rounds.append({
            "round": r, "runs": len(losses), "runs_total": sum(x["runs"] for x in rounds) + len(losses),
            "best_run": best[0], "best_loss": best[1], "fit": fit["chosen"], "fit_spearman": fit["spearman"],
            "fit_warnings": fit["warnings"], "weights": proposal["weights"], "predicted": proposal["predicted"],
            "low": proposal["low"], "high": proposal["high"], "std": proposal["std"], "achieved": None,
            "moved": None if not rounds else float(sum(abs(proposal["weights"][d] - rounds[-1]["weights"].get(d, 0.0))
                                                        for d in proposal["weights"])),
            "note": study.notes.get(f"propose-r{r}", ""),
        })
        r += 1
    candidates = f"candidates-{search}"
    if rounds and candidates in study.records:
        rounds[-1]["achieved"] = sweep_losses(study, candidates).get(1)  # the proposal is candidate 1
    return rounds


def _validation(study: Study) -> dict:
    spec = study.spec
    v = spec.validation
    keys = [f"val_loss/{t}" for t in spec.data.target]
    out = {}
    for name in ["proposed", *(b.name for b in v.baselines)]:
        runs = [study.outputs(f"validate-{name}-seed{s}") for s in v.seeds if f"validate-{name}-seed{s}" in study.records]
        per_seed = {r["seed"]: _mean_target(r["eval"], keys) for r in runs}
        mean, low, high = seed_interval(list(per_seed.values()), spec.report.confidence)
        domains = sorted({k for r in runs for k in r["eval"] if k.startswith("val_loss/")})
        out[name] = {"seeds": per_seed, "mean": mean, "low": low, "high": high,
                     "domains": {k.split("/", 1)[1]: float(np.mean([r["eval"][k] for r in runs if k in r["eval"]]))
                                 for k in domains}}
    return out


def _transfer(study: Study, validation: dict | None, predicted: dict) -> dict:
    spec = study.spec
    report = spec.report
    options = {"bootstrap": report.bootstrap, "confidence": report.confidence, "seed": report.seed}
    scales = [s.name for s in spec.search.scales]
    r0 = {s: sweep_losses(study, f"sweep-{s}-r0") for s in scales}
    steps = []
    for a, b in itertools.pairwise(scales):
        shared = sorted(set(r0[a]) & set(r0[b]))
        steps.append(rank_transfer([r0[a][i] for i in shared], [r0[b][i] for i in shared], small=a, large=b,
                                   **options).to_dict())
    to_target = []
    if validation:
        names = study.outputs("candidates")["candidates"]
        fixed = {c["index"]: c["name"] for c in names if c["index"] is not None}
        target = {n: validation[n]["mean"] for n in fixed.values() if n in validation}
        for s in scales:
            values = {fixed[i]: x for i, x in sweep_losses(study, f"candidates-{s}").items() if i in fixed}
            shared = [n for n in target if n in values]
            to_target.append(rank_transfer([values[n] for n in shared], [target[n] for n in shared], small=s,
                                           large="target", **options).to_dict())
        shared = [n for n in target if n in predicted]
        to_target.append(rank_transfer([predicted[n]["predicted"] for n in shared], [target[n] for n in shared],
                                       small="regression", large="target", **options).to_dict())
    return {"steps": steps, "to_target": to_target, "fidelity": _fidelity(study)}


def _fidelity(study: Study) -> dict:
    """`mix fidelity` over the round-0 sweeps: its report text and warnings (repetition against the target run)."""
    from mixlm.errors import ConfigError
    from mixlm.mixing.fidelity import fidelity, format_report, load_sweep
    from mixlm.study.search import token_budget

    folders = [os.fspath(study.folder(f"sweep-{s.name}-r0")) for s in study.spec.search.scales]
    sweeps = [load_sweep(f) for f in folders]
    if len(sweeps) == 1:  # fidelity compares pairs: a sweep against itself leaves only its repetition check
        sweeps = sweeps * 2
    try:
        result = fidelity(sweeps, [f"metric/{t}_val_loss" for t in study.spec.data.target],
                          target_budget=token_budget(study))
    except ConfigError as e:
        return {"text": "", "warnings": [f"mix fidelity could not compare the sweeps: {e}"]}
    root = os.fspath(study.root)
    text = format_report(result).replace(root + os.sep, "")
    warnings = list(dict.fromkeys(w.replace(root + os.sep, "") for w in result.warnings))
    if len(folders) == 1:
        warnings = [w for w in warnings if " vs " not in w]
    return {"text": text if len(folders) > 1 else "", "warnings": warnings}


def _predicted(study: Study) -> dict:
    """The final fit's prediction (with its interval) for each fixed candidate mixture."""
    if "candidates" not in study.records:
        return {}
    final = max((n for n in study.records if n.startswith("fit-r")), key=lambda n: int(n[5:]))
    fit = study.outputs(final)
    return {name: prediction_interval(fit["model"], fit["chosen"], weights, study.spec.report.confidence)
            for name, weights in study.outputs("candidates")["weights"].items()}


def _predicted_vs_achieved(study: Study, validation: dict, predicted: dict) -> list[dict]:
    search = study.spec.search_scale.name
    names = study.outputs("candidates")["candidates"]
    fixed = {c["index"]: c["name"] for c in names if c["index"] is not None}
    at_scale = {s.name: {fixed[i]: x for i, x in sweep_losses(study, f"candidates-{s.name}").items() if i in fixed}
                for s in study.spec.search.scales}
    target = {n: validation[n]["mean"] for n in validation}
    rows = []
    for entry in names:
        name = entry["name"]
        p = predicted.get(name)
        cal = calibrated(at_scale[search], target, name, p["predicted"], p["low"], p["high"]) if p else None
        achieved = validation.get(name, {})
        inside = None
        if cal and math.isfinite(achieved.get("mean", math.nan)) and math.isfinite(cal["low"]):
            inside = cal["low"] <= achieved["mean"] <= cal["high"]
        rows.append({"candidate": name, "kind": entry["kind"], "predicted": p, "at_scale": {s: at_scale[s].get(name)
                     for s in at_scale}, "target": achieved, "calibrated": cal, "inside": inside})
    return rows


def _evaluations(study: Study) -> dict:
    """{results kind (eval_local, eval_<suite>): {candidate: results JSON path}} of the eval stages."""
    out: dict[str, dict] = {}
    for name, record in study.records.items():
        if record["kind"] == "eval":
            for path in record["outputs"]["results"]:
                out.setdefault(Path(path).stem, {})[name.removeprefix("eval-")] = path
    return out


def _compute(study: Study) -> list[dict]:
    from mixlm.study.cost import stage_costs

    estimates = {c.stage: c for c in stage_costs(study)}
    rows = []
    for stage in study.planned:
        record = study.records.get(stage.name)
        if record is None:
            continue
        estimate = estimates.get(stage.name)
        rows.append({"stage": stage.name, "kind": stage.kind, "seconds": record["seconds"],
                     "platform": record["platform"], "devices": record["devices"],
                     "device_hours": record["seconds"] * record["devices"] / 3600,
                     "estimate_hours": estimate.device_hours if estimate else None})
    return rows


def git_commit() -> str:
    """The commit of the mixlm checkout this runs from ('+ local changes' when it has any), or why not."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", os.fspath(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", os.fspath(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" + local changes" if dirty else "")


def _provenance(study: Study) -> dict:
    import hashlib
    import platform

    import mixlm
    from mixlm.study.graph import content_hash

    data = study.records.get("prepared", study.records["data"])["outputs"]
    configs = {}
    for s in study.spec.search.scales:
        configs[f"scale {s.name}"] = (s.config, study.stage_of(f"sweep-{s.name}-r0").settings["config"])
    if study.spec.validation is not None:
        name = f"validate-proposed-seed{study.spec.validation.seeds[0]}"
        configs["validation"] = (study.spec.validation.config, study.stage_of(name).settings["config"])
    import jax

    return {
        "mixlm": mixlm.__version__, "commit": git_commit(), "python": platform.python_version(),
        "jax": jax.__version__, "study_file": hashlib.sha256(Path(study.spec.source).read_bytes()).hexdigest(),
        "spec": content_hash({k: v for k, v in study.spec.to_dict().items() if k not in ("source", "out")}),
        "configs": configs, "manifests": data["manifests"], "tokenizer": data.get("tokenizer"),
        "stages": {s.name: s.dirname for s in study.planned if s.name in study.records},
        "commands": {s.name: study.records[s.name]["commands"] for s in study.planned if s.name in study.records},
    }


def collect(study: Study) -> dict:
    """The report's facts (module docstring)."""
    spec = study.spec
    data = study.records.get("prepared", study.records["data"])["outputs"]
    facts = {"name": spec.name, "targets": spec.data.target, "domains": data["domains"],
             "natural_domains": data["natural_domains"], "variants": data.get("variants", {}),
             "scales": [s.name for s in spec.search.scales], "search_scale": spec.search_scale.name,
             "rounds": _rounds(study), "validation": None, "predicted": {}, "rows": []}
    if spec.validation is not None and "candidates" in study.records:
        facts["validation"] = _validation(study)
        facts["predicted"] = _predicted(study)
        facts["rows"] = _predicted_vs_achieved(study, facts["validation"], facts["predicted"])
        facts["weights"] = study.outputs("candidates")["weights"]
    else:
        facts["weights"] = {"proposed": facts["rounds"][-1]["weights"]}
    facts["transfer"] = _transfer(study, facts["validation"], facts["predicted"])
    facts["evaluations"] = _evaluations(study)
    facts["compute"] = _compute(study)
    facts["provenance"] = _provenance(study)
    return facts
