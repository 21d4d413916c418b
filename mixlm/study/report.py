"""The study's report: report.md and report.html (the same blocks, mixlm.study.document), the PNGs beside them
and report.json (every number, mixlm.study.facts), in the report stage's folder and copied to <study>/report/.

Sections: the answer (the proposal against the baselines at the target scale, and how far to trust it), the
search rounds, the mixtures, selection knobs, calibrated transfer (each step from small to large: Spearman and
pairwise decision accuracy with bootstrap intervals; `mix fidelity`'s repetition warnings; predicted against
achieved target loss), validation per domain, evaluations, compute per stage, provenance, and every command run.
Paths are written relative to the study folder ($STUDY), so a study keys and reads the same wherever it lives.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import shutil
from pathlib import Path

from mixlm.study.document import Bullets, Code, Heading, Image, Paragraph, Table, cell, to_html, to_markdown
from mixlm.study.graph import Stage, StageWork, relative_to_study
from mixlm.study.pipeline import Study
from mixlm.study.verbs import run_verb, shown

REPORT = "report"


def _ci(low, high) -> str:
    return "–" if low is None or not (math.isfinite(low) and math.isfinite(high)) else f"[{low:.4f}, {high:.4f}]"


def _loss(value) -> str:
    return cell(value if value is None or isinstance(value, float) else float(value))


def _mixture_rows(facts: dict) -> list[list]:
    weights = facts["weights"]
    names = list(weights)
    domains = sorted(facts["domains"], key=lambda d: -weights[names[0]].get(d, 0.0))
    return [[d, *(f"{weights[n].get(d, 0.0):.4f}" for n in names)] for d in domains]


def _answer(facts: dict, spec) -> list:
    target = " + ".join(facts["targets"])
    out = [Heading(f"Study {facts['name']}", 1),
           Paragraph(f"Searched mixtures of {len(facts['domains'])} domains for the lowest validation loss on "
                     f"`{target}`: {facts['rounds'][-1]['runs_total']} proxies at the search scale "
                     f"`{facts['search_scale']}` over {len(facts['rounds'])} round(s), scales {', '.join(facts['scales'])}.")]
    v = facts["validation"]
    if v:
        rows = []
        for name, entry in v.items():
            seeds = ", ".join(f"{x:.4f}" for x in entry["seeds"].values())
            rows.append([name, _loss(entry["mean"]), _ci(entry["low"], entry["high"]), seeds])
        best = min(v, key=lambda n: v[n]["mean"] if math.isfinite(v[n]["mean"]) else math.inf)
        out += [Heading("The answer"),
                Table(["model", f"target loss (mean of {len(spec.validation.seeds)} seeds)",
                       f"{spec.report.confidence:.0%} interval (t, over seeds)", "per seed"], rows),
                Paragraph(f"Lowest at the target scale: `{best}`. Read the transfer section before trusting it: it "
                          "says how often the smaller scales ordered mixtures as the larger ones did.")]
    return out


def _rounds_blocks(facts: dict, plots: dict) -> list:
    rows = []
    for r in facts["rounds"]:
        rows.append([r["round"], r["runs"], f"{r['fit']} ({cell(r['fit_spearman'])})", _loss(r["predicted"]),
                     _ci(r["low"], r["high"]), _loss(r["achieved"]), _loss(r["best_loss"]),
                     "–" if r["moved"] is None else f"{r['moved']:.4f}", r["note"] or ""])
    out = [Heading("Search rounds"),
           Table(["round", "runs", "fit (k-fold Spearman)", "proposal predicted", "interval", "proposal measured",
                  "best proxy", "moved (L1)", "note"], rows,
                 "Interval: the chosen regressor's prediction ± z x the RMSE of its out-of-fold errors. Measured: the "
                 "proposal trained at the search scale (in the next round, or with the candidates).")]
    out += [Image(plots[k], caption) for k, caption in (
        ("rounds", "Refinement rounds: predicted and measured loss of each proposal, the best proxy of each round"),
        ("scatter", "Predicted against actual (out-of-fold) at the search scale: the final fit (`mix fit`)"),
        ("loss_vs_weight", "Loss against weight per domain (`mix fit`)")) if k in plots]
    for r in facts["rounds"]:
        out += [Paragraph(f"warning (fit of round {r['round']}): {w}") for w in r["fit_warnings"]]
    return out


def _transfer_blocks(facts: dict, spec, plots: dict) -> list:
    t = facts["transfer"]
    conf = f"{spec.report.confidence:.0%}"

    def rows(steps):
        return [[f"{s['small']} -> {s['large']}", s["n"], cell(s["spearman"]), _ci(*s["spearman_ci"]),
                 cell(s["accuracy"]), _ci(*s["accuracy_ci"])] for s in steps]

    header = ["step", "mixtures", "Spearman", f"{conf} CI", "decision accuracy", f"{conf} CI"]
    out = [Heading("Calibrated transfer"),
           Paragraph(f"Decision accuracy: the share of mixture pairs the smaller scale orders as the larger one does "
                     f"(a tie at the smaller scale counts 1/2). Intervals: percentile bootstrap over mixtures, "
                     f"{spec.report.bootstrap} resamples, seed {spec.report.seed}.")]
    if t["steps"]:
        out += [Table(header, rows(t["steps"]), "Between proxy scales, on the round-0 mixtures both trained.")]
    if t["to_target"]:
        out += [Table(header, rows(t["to_target"]), "To the target scale, on the validation candidates (few "
                      "mixtures: wide intervals); `regression` is the search scale's fit.")]
    if "transfer" in plots:
        out.append(Image(plots["transfer"], "Transfer: each point a mixture, the smaller scale against the larger"))
    if facts["rows"]:
        rows = []
        for row in facts["rows"]:
            p, c, a = row["predicted"], row["calibrated"], row["target"]
            rows.append([row["candidate"], _loss(p["predicted"]) if p else "–", _ci(p["low"], p["high"]) if p else "–",
                         *(_loss(row["at_scale"][s]) for s in facts["scales"]),
                         _loss(c["predicted"]) if c else "–", _ci(c["low"], c["high"]) if c else "–",
                         _loss(a.get("mean")), _ci(a.get("low"), a.get("high")),
                         "–" if row["inside"] is None else ("yes" if row["inside"] else "no")])
        out += [Heading("Predicted against achieved", 3),
                Table(["model", f"predicted ({facts['search_scale']})", "interval",
                       *(f"measured ({s})" for s in facts["scales"]), "predicted (target, calibrated)", "interval",
                       "achieved (target)", f"{conf} interval", "inside"], rows,
                      f"Calibrated: the prediction carried to the target scale by the line through the other "
                      f"candidates' ({facts['search_scale']}, target) losses (leave-one-out); its interval carries "
                      "the regression's out-of-fold error only.")]
    fidelity = t["fidelity"]
    if fidelity["text"]:
        out += [Heading("`mix fidelity` on the round-0 sweeps", 3), Code(fidelity["text"])]
    out += [Paragraph(f"warning: {w}") for w in fidelity["warnings"]]
    if not fidelity["warnings"]:
        out.append(Paragraph("`mix fidelity`: no repetition mismatch between the proxies and the target run."))
    return out


def _validation_blocks(facts: dict, plots: dict) -> list:
    v = facts["validation"]
    if not v:
        return []
    names = list(v)
    domains = sorted({d for entry in v.values() for d in entry["domains"]})
    rows = [[d, *(_loss(v[n]["domains"].get(d)) for n in names)] for d in domains]
    out = [Heading("Validation at the target scale"), Image(plots["validation"], "Target loss of each model"),
           Table(["domain", *names], rows, "Validation loss per domain (`val_loss/<domain>`), mean over seeds.")]
    if "curves" in plots:
        out += [Image(p, f"`mixlm plot` of the first seed's runs: {Path(p).stem}") for p in plots["curves"]]
    return out


def _eval_blocks(facts: dict, plots: dict, tables: dict) -> list:
    if not tables:
        return []
    out = [Heading("Evaluation (`mixlm eval` of the exports)"),
           Paragraph("`mixlm eval --domains` scores whole documents from their start; `val_loss` above scores the "
                     "packed windows training sees: the two differ (README, \"Two held-out losses\").")]
    for kind, (header, rows) in tables.items():
        out.append(Table(header, rows, f"{kind} (`mixlm eval compare` layout)"))
        if kind in plots:
            out.append(Image(plots[kind], f"{kind}, side by side"))
    return out


def _compute_blocks(facts: dict, spec) -> list:
    rows = []
    for row in facts["compute"]:
        used = (f"{row['device_hours']:.4f} ({row['platform']}" + (", host" if row["platform"] == "cpu" else
                f" x {row['devices']}") + ")") if row["devices"] else "– (no training)"
        rows.append([row["stage"], row["kind"], f"{row['seconds']:.0f}", used,
                     "–" if row["estimate_hours"] is None else f"{row['estimate_hours']:.3g}"])
    total = sum(r["device_hours"] for r in facts["compute"])
    estimate = sum(r["estimate_hours"] or 0 for r in facts["compute"])
    return [Heading("Compute"),
            Table(["stage", "kind", "seconds", "device-hours used",
                   f"device-hours at {spec.cost.mfu:.0%} MFU of {spec.cost.device_kind}"], rows,
                  f"Used: wall time x the devices the stage's process held (a CPU host counts one); {total:.4f} in all. "
                  f"Estimate: training FLOPs at the cost section's MFU ({estimate:.3g} device-hours in all).")]


def _provenance_blocks(facts: dict, root: str) -> list:
    p = facts["provenance"]
    items = [f"mixlm {p['mixlm']}, commit {p['commit']}; Python {p['python']}, jax {p['jax']}",
             f"study file sha256 {p['study_file']}; resolved study hash {p['spec']}",
             *(f"{what}: `{path}` config hash {digest}" for what, (path, digest) in p["configs"].items()),
             f"tokenizer: `{relative_to_study(str(p['tokenizer']), root)}`"]
    manifests = [[d, digest] for d, digest in p["manifests"].items()]
    stages = [[name, f"stages/{folder}"] for name, folder in p["stages"].items()]
    commands = "\n".join(f"# {name}\n" + ("\n".join(shown(c) for c in cmds) if cmds else
                                         "(no verb: written by mixlm study itself; see the stage's folder)")
                         for name, cmds in p["commands"].items())
    return [Heading("Provenance"), Bullets(items),
            Table(["domain", "manifest fingerprint"], manifests, "Corpus manifest fingerprints: the sha256 of each "
                  "manifest.json without the paths it names (its counts, shard and input sha256s, tokenizer, options)."),
            Table(["stage", "folder (keyed by its inputs)"], stages),
            Heading("Commands", 3), Paragraph("Every command the study ran, in order ($STUDY: the study folder)."),
            Code(relative_to_study(commands, root))]


def _selection_blocks(facts: dict) -> list:
    variants = facts["variants"]
    if not variants:
        return []
    proposed = facts["weights"]["proposed"]
    rows = []
    for domain in facts["natural_domains"]:
        mine = [v for v, d in variants.items() if d == domain]
        if mine:
            total = proposed.get(domain, 0.0) + sum(proposed.get(v, 0.0) for v in mine)
            split = ", ".join(f"{v} {proposed.get(v, 0.0):.4f}" for v in mine)
            rows.append([domain, f"{total:.4f}", f"{proposed.get(domain, 0.0):.4f}", split])
    return [Heading("Selection knobs"),
            Paragraph("Each variant is the top fraction of its domain by the knob's rater weighting, searched beside "
                      "the whole domain: weight on a variant draws its documents more often."),
            Table(["domain", "total weight", "whole domain", "variants"], rows)]


def build_blocks(facts: dict, spec, plots: dict, eval_tables: dict, root: str) -> list:
    blocks = _answer(facts, spec) + _rounds_blocks(facts, plots)
    names = list(facts["weights"])
    blocks += [Heading("Mixtures"), Table(["domain", *names], _mixture_rows(facts)),
               Image(plots["mixture"], "The proposal beside the baselines")]
    blocks += _selection_blocks(facts) + _transfer_blocks(facts, spec, plots) + _validation_blocks(facts, plots)
    blocks += _eval_blocks(facts, plots, eval_tables) + _compute_blocks(facts, spec) + _provenance_blocks(facts, root)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return blocks + [Paragraph(f"Generated {stamp} by `mixlm study run`.")]


def _draw(study: Study, task: StageWork, facts: dict) -> tuple[dict, dict]:
    """The PNGs (written into the stage folder) and the evaluation tables."""
    from mixlm.eval.compare import compare_bar_chart, compare_rows
    from mixlm.eval.results import load_results
    from mixlm.mixing.plots import plot_mixture
    from mixlm.study import report_plots

    folder = Path(os.fspath(task.folder))
    folder.mkdir(parents=True, exist_ok=True)
    target = " + ".join(f"val_loss/{t}" for t in facts["targets"])
    plots = {"rounds": report_plots.plot_rounds(facts["rounds"], target, folder / "rounds.png")}
    final = max((n for n in study.records if n.startswith("fit-r")), key=lambda n: int(n[5:]))
    for name in ("scatter", "loss_vs_weight"):
        source = Path(os.fspath(study.folder(final))) / f"{name}.png"
        if source.exists():
            shutil.copyfile(source, folder / f"fit_{name}.png")
            plots[name] = f"fit_{name}.png"
    plot_mixture(facts["weights"], folder / "mixture.png", title="the proposal and the baselines")
    plots["mixture"] = "mixture.png"
    panels = []
    scales = facts["scales"]
    for a, b in itertools.pairwise(scales):
        la, lb = _sweep_pair(study, a, b)
        panels.append((a, b, la, lb, [""] * len(la)))
    if facts["validation"]:
        v = facts["validation"]
        search = facts["search_scale"]
        pairs = [(r["candidate"], r["at_scale"][search], v[r["candidate"]]["mean"]) for r in facts["rows"]
                 if r["at_scale"].get(search) is not None]
        panels.append((search, "target", [x for _, x, _ in pairs], [y for _, _, y in pairs], [n for n, _, _ in pairs]))
        plots["validation"] = report_plots.plot_validation(v, target, folder / "validation.png")
        runs = [study.outputs(f"validate-{n}-seed{study.spec.validation.seeds[0]}")["run"] for n in v]
        run_verb(task, ["plot", *runs, "--out", folder / "curves"])
        plots["curves"] = [f"curves/{p.name}" for p in sorted((folder / "curves").glob("*.png"))]
    if panels:
        plots["transfer"] = report_plots.plot_transfer(panels, target, folder / "transfer.png")
    tables = {}
    for kind, by_candidate in facts["evaluations"].items():
        docs = []
        for name, path in by_candidate.items():
            doc = load_results(path)
            doc["name"] = name
            docs.append(doc)
        header, rows = compare_rows(docs)
        tables[kind] = (header, rows)
        compare_bar_chart(docs, folder / f"{kind}.png")
        plots[kind] = f"{kind}.png"
    return plots, tables


def _sweep_pair(study: Study, a: str, b: str) -> tuple[list[float], list[float]]:
    from mixlm.study.facts import sweep_losses

    la, lb = sweep_losses(study, f"sweep-{a}-r0"), sweep_losses(study, f"sweep-{b}-r0")
    shared = sorted(set(la) & set(lb))
    return [la[i] for i in shared], [lb[i] for i in shared]


def report_stage(study: Study) -> None:
    """The report, after every stage met so far."""
    from mixlm.study.facts import collect

    spec = study.spec
    settings = {**vars(spec.report), "cost": vars(spec.cost)}
    stage = Stage("report", "report", settings, deps=tuple(study.planned))

    def work(task: StageWork) -> dict:
        facts = collect(study)
        plots, tables = _draw(study, task, facts)
        root = os.fspath(study.root)
        blocks = build_blocks(facts, spec, plots, tables, root)
        folder = Path(os.fspath(task.folder))
        (folder / "report.md").write_text(to_markdown(blocks))
        (folder / "report.html").write_text(to_html(blocks, f"mixlm study {spec.name}"))
        (folder / "report.json").write_text(json.dumps(relative_to_study(facts, root), indent=1, default=str) + "\n")
        published = Path(root) / REPORT
        if published.exists():
            shutil.rmtree(published)
        shutil.copytree(folder, published, ignore=shutil.ignore_patterns(".*", "stage.json"))
        task.log(f"study: report -> {published / 'report.md'} and {published / 'report.html'}")
        return {"report": os.fspath(published / "report.md"), "html": os.fspath(published / "report.html")}

    study.stage(stage, work)
