"""A results document as the model card shows it: table rows, the Markdown table, card rows and the Hub
model-index entries."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Scores that are fractions of examples (0..1), shown in %; every other metric (NLL, perplexity, bits per byte,
# BLEU, which lm-eval already reports on 0..100) is shown as it is. "mean" is the average row (accuracies only).
PERCENT_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "contains", "f1", "mean"})


def is_percent(metric: str) -> bool:
    """Whether `metric` (as a table shows it: 'centered_acc', 'acc_norm (mean over 0-5 shots)') is an accuracy,
    shown as a percentage; anything else (losses, perplexities, bits per byte) is shown as it is."""
    return metric.removeprefix("centered_").partition(" ")[0] in PERCENT_METRICS


def format_score(value: float | None, percent: bool, bold: bool = False) -> str:
    if value is None:
        return ""
    text = f"{100 * value:.2f}" if percent else f"{value:.4f}"
    return f"**{text}**" if bold else text


def _shots_text(shots: Sequence[int]) -> str:
    shots = list(shots)
    if len(shots) == 1:
        return str(shots[0])
    if shots == list(range(shots[0], shots[-1] + 1)):
        return f"{shots[0]}-{shots[-1]} (mean)"
    return ",".join(map(str, shots)) + " (mean)"


def _group_metric(results: dict, labels: Sequence[str]) -> str:
    metrics = list(dict.fromkeys(results["tasks"][m]["metric"] for m in labels))
    return metrics[0] if len(metrics) == 1 else "mean"


def table_rows(results: dict) -> list[dict]:
    """The rows of the model-card table, in order: grouped tasks, then their group's average, then the other
    tasks, then the overall average. Each: {kind: task|group|overall, label, metric, shots, score, stderr}."""
    tasks, groups = results["tasks"], results["groups"]
    rows, seen = [], set()
    for group, g in groups.items():
        members = [label for label in results["suite_config"]["groups"][group]]
        for label in members:
            if label not in seen:
                t = tasks[label]
                rows.append({"kind": "task", "label": label, "metric": t["metric"], "shots": t["shots"],
                             "score": t["score"], "stderr": t["stderr"]})
                seen.add(label)
        rows.append({"kind": "group", "label": group, "metric": _group_metric(results, g["tasks"]), "shots": [],
                     "score": g["score"], "stderr": g["stderr"]})
    for label, t in tasks.items():
        if label not in seen:
            rows.append({"kind": "task", "label": label, "metric": t["metric"], "shots": t["shots"],
                         "score": t["score"], "stderr": t["stderr"]})
    if results.get("overall"):
        o = results["overall"]
        averaged = [label for label, t in tasks.items() if t["average"]]
        rows.append({"kind": "overall", "label": "Average", "metric": _group_metric(results, averaged) if
                     o["over"] == "tasks" else "mean", "shots": [], "score": o["score"], "stderr": o["stderr"]})
    return rows


def markdown_table(results: dict) -> str:
    """Markdown like the model cards': a row per task, per group and the average (scores in %), then a
    per-shot table when scores are means over several shot counts."""
    title = f"### {results['name']}: {results['suite']}"
    if results.get("description"):
        title += f" ({results['description']})"
    lines = [title, "", "| Task | Metric | Shots | Score | ± |", "|---|---|---:|---:|---:|"]
    for row in table_rows(results):
        bold = row["kind"] != "task"
        pct = is_percent(row["metric"])
        label = f"**{row['label']}**" if bold else row["label"]
        shots = _shots_text(row["shots"]) if row["shots"] else ""
        lines.append(f"| {label} | {row['metric']} | {shots} | {format_score(row['score'], pct, bold)} | "
                     f"{format_score(row['stderr'], pct)} |")
    multi = {label: t for label, t in results["tasks"].items() if len(t["shots"]) > 1}
    if multi:
        shot_counts = sorted({k for t in multi.values() for k in t["shots"]})
        by = {(p["task"], p["shots"]): p for p in results["per_shot"]}
        lines += ["", "| Task | Metric | " + " | ".join(f"{k}-shot" for k in shot_counts) + " | Mean |",
                  "|---|---|" + "---:|" * (len(shot_counts) + 1)]
        for label, t in multi.items():
            metric = t["metric"].removeprefix("centered_")
            pct = is_percent(metric)
            cells = [format_score(by[(label, k)]["value"], pct) if (label, k) in by else "" for k in shot_counts]
            mean = format_score(t["raw_score"], pct)
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + f" | {mean} |")
    footer = (f"lm-evaluation-harness {results['lm_eval_version']}"
              + (f", limit {results['args']['limit']} examples per task" if results["args"].get("limit") else "")
              + (". Centered accuracy: (acc - chance) / (1 - chance)." if any(
                  t["centered"] for t in results["tasks"].values()) else "."))
    return "\n".join(lines + ["", footer]) + "\n"


def card_rows(results: dict) -> list[dict]:
    """Headline scores as {task, metric, value, stderr, shots} rows (mixlm.model_card.eval_scores_from_json
    reads them): one per task, group and the average; `shots` is None for shot-averaged scores."""
    out = []
    for row in table_rows(results):
        shots = row["shots"][0] if len(row["shots"]) == 1 else None
        metric = row["metric"]
        if len(row["shots"]) > 1:
            metric = f"{metric} (mean over {_shots_text(row['shots']).removesuffix(' (mean)')} shots)"
        out.append({"task": row["label"], "metric": metric, "value": row["score"], "stderr": row["stderr"],
                    "shots": shots, "kind": row["kind"]})
    return out


def model_index_entries(results: dict) -> list[dict]:
    """The model card's model-index `results` entries (Hub schema: task, dataset, metrics, source), one per
    task, group and the average; values are fractions (centered accuracy for centered suites)."""
    source = {"name": f"mixlm eval, lm-evaluation-harness {results.get('lm_eval_version', '')}".strip(),
              "url": "https://github.com/EleutherAI/lm-evaluation-harness"}
    entries = []
    for row in table_rows(results):
        if row["score"] is None or not math.isfinite(row["score"]):
            continue
        task = results["tasks"].get(row["label"]) if row["kind"] == "task" else None
        dataset = {"name": row["label"], "type": task["lm_eval_task"] if task else f"mixlm/{results['suite']}"}
        metric_name = row["metric"]
        if len(row["shots"]) == 1:
            dataset["args"] = {"num_few_shot": row["shots"][0]}
            metric_name += f" ({row['shots'][0]}-shot)"
        elif row["shots"]:
            metric_name += f" (mean over {_shots_text(row['shots']).removesuffix(' (mean)')} shots)"
        entries.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": dataset,
            "metrics": [{"type": row["metric"], "value": round(float(row["score"]), 6), "name": metric_name}],
            "source": source,
        })
    return entries
