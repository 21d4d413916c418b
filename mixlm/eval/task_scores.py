"""Scores as pure functions of lm-eval's per-task metrics: the metric a task is scored by, shot means, centered
accuracy, group and overall means.

Standard errors: the mean of k per-shot scores gets sqrt(sum se_i^2) / k (it treats the shots as independent,
which overstates precision a little: they share examples); centering divides it by (1 - chance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mixlm.errors import EvalError
from mixlm.eval.suites import Suite, SuiteTask

LOWER_IS_BETTER = frozenset({"bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity", "nll_per_token",
                             "token_perplexity", "ter"})
# Losses by name: a metric naming one of these is lower-is-better even when not listed above.
_LOSS_WORDS = ("loss", "nll", "perplexity", "bits_per_")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller `metric` is better: losses, NLL, perplexities, bits per byte, TER. Takes a table's
    metric name as shown ('centered_acc', 'nll_per_token (mean over 0-5 shots)', 'val_loss/web')."""
    name = metric.removeprefix("centered_").partition(" ")[0]
    return name in LOWER_IS_BETTER or any(word in name for word in _LOSS_WORDS)


def finite_number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def metric_value(metrics: dict, spec: str) -> tuple[str, float, float | None] | None:
    """(metric, value, stderr) of `spec` ('acc' or 'exact_match,strict-match') in lm-eval's metrics of one
    task ({'acc,none': 0.5, 'acc_stderr,none': 0.01, ...}); the 'none' filter is preferred; None if absent."""
    name, _, wanted_filter = spec.partition(",")
    keys = [k for k in metrics if k.partition(",")[0] == name and "," in k]
    if wanted_filter:
        keys = [k for k in keys if k.partition(",")[2] == wanted_filter]
    keys = [k for k in keys if finite_number(metrics[k]) is not None]
    if not keys:
        return None
    key = f"{name},none" if f"{name},none" in keys else keys[0]
    stderr = finite_number(metrics.get(f"{name}_stderr,{key.partition(',')[2]}"))
    return name, float(metrics[key]), stderr


def reported_metrics(metrics: dict) -> list[str]:
    """The metric names (without filter) a task reports, in lm-eval's order."""
    out = []
    for k, v in metrics.items():
        name = k.partition(",")[0]
        if "," in k and not name.endswith("_stderr") and finite_number(v) is not None and name not in out:
            out.append(name)
    return out


def pick_metric(suite: Suite, task: SuiteTask, metrics: dict) -> tuple[str, float, float | None]:
    """The (metric, value, stderr) that scores `task`: its explicit metric, else the first of the suite's
    preference that lm-eval reported (ad-hoc runs: else the first metric reported)."""
    specs = [task.metric] if task.metric else list(suite.metric_preference)
    for spec in specs:
        found = metric_value(metrics, spec)
        if found:
            return found
    available = reported_metrics(metrics)
    if suite.any_metric and available:
        return metric_value(metrics, available[0])
    raise EvalError(f"task {task.label} ({task.task}): lm-eval reported {available or 'no metrics'}, none of "
                    f"{specs}; set `metric:` for it in the suite YAML")


def shot_average(values: Sequence[float], stderrs: Sequence[float | None]) -> tuple[float, float | None]:
    """(mean of per-shot scores, sqrt(sum se^2) / k); the stderr is None when any shot lacks one."""
    mean = sum(values) / len(values)
    if any(s is None for s in stderrs):
        return mean, None
    return mean, math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def centered_accuracy(acc: float, chance: float) -> float:
    """DCLM's centered accuracy: 0 at chance, 1 at perfect; (acc - chance) / (1 - chance)."""
    return (acc - chance) / (1.0 - chance)


def _mean_with_stderr(items: Sequence[tuple[float, float | None]]) -> tuple[float, float | None]:
    return shot_average([v for v, _ in items], [s for _, s in items])


def score_suite(suite: Suite, results_by_shot: dict[int, dict[str, dict]]) -> dict:
    """Scores from lm-eval's `results` dicts, one per few-shot count ({shots: {task: {'acc,none': ...}}}):

        {"per_shot": [{task, lm_eval_task, shots, metric, value, stderr}],
         "tasks": {label: {lm_eval_task, metric, shots, score, stderr, chance, centered, average}},
         "groups": {name: {tasks, score, stderr}}, "overall": {score, stderr, over, n} | None}
    """
    per_shot, tasks = [], {}
    for task in suite.tasks:
        values, errors, metric = [], [], None
        for k in task.shots:
            metrics = results_by_shot.get(k, {}).get(task.task)
            if metrics is None:
                raise EvalError(f"task {task.label}: lm-eval returned no results for {task.task} at {k} shots")
            metric, value, stderr = pick_metric(suite, task, metrics)
            per_shot.append({"task": task.label, "lm_eval_task": task.task, "shots": k, "metric": metric,
                             "value": value, "stderr": stderr})
            values.append(value)
            errors.append(stderr)
        raw, raw_stderr = shot_average(values, errors)
        score, stderr = raw, raw_stderr
        centered = suite.centered and task.chance is not None
        if centered:
            score = centered_accuracy(raw, task.chance)
            stderr = None if raw_stderr is None else raw_stderr / (1.0 - task.chance)
        tasks[task.label] = {"lm_eval_task": task.task, "metric": f"centered_{metric}" if centered else metric,
                             "shots": list(task.shots), "score": score, "stderr": stderr, "raw_score": raw,
                             "chance": task.chance, "centered": centered,
                             # perplexities and bits per byte are never averaged with accuracies
                             "average": task.average and not lower_is_better(metric)}
    groups = {}
    for name, members in suite.groups:
        counted = [m for m in members if tasks[m]["average"]]
        if not counted:
            raise EvalError(f"suite {suite.name}: group {name!r} has no averaged task (all are `average: false` "
                            "or scored by perplexity / bits per byte)")
        score, stderr = _mean_with_stderr([(tasks[m]["score"], tasks[m]["stderr"]) for m in counted])
        groups[name] = {"tasks": counted, "score": score, "stderr": stderr}
    if suite.overall == "groups":
        grouped = {m for _, members in suite.groups for m in members}
        items = [(g["score"], g["stderr"]) for g in groups.values()]
        items += [(t["score"], t["stderr"]) for label, t in tasks.items() if t["average"] and label not in grouped]
    else:
        items = [(t["score"], t["stderr"]) for t in tasks.values() if t["average"]]
    overall = None
    if items:
        score, stderr = _mean_with_stderr(items)
        overall = {"score": score, "stderr": stderr, "over": suite.overall, "n": len(items)}
    return {"per_shot": per_shot, "tasks": tasks, "groups": groups, "overall": overall}

