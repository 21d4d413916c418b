"""Eval suites as data (configs/eval/<name>.yaml): which lm-eval tasks, at which shots, scored by which metric.

    name: metarater
    metric_preference: [acc_norm, acc]   # the first metric the task reports is its score
    shots: [0]                           # default for every task; several -> the score is their mean
    centered: false                      # true: score = (acc - chance) / (1 - chance)  (DCLM core)
    tasks:
      - arc_easy                                            # lm-eval task name = row label
      - {task: nq_open, metric: exact_match}                # an explicit metric (optionally 'metric,filter')
      - {label: hellaswag_zeroshot, task: hellaswag, shots: 0, chance: 0.25, average: true}
    groups: {General Knowledge: [arc_easy, ...]}            # group score = mean of its tasks' scores
    overall: tasks                       # tasks: mean over averaged tasks; groups: mean over groups (+ ungrouped)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixlm.config import read_yaml_file
from mixlm.errors import ConfigError, EvalError

SUITES_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
DEFAULT_PREFERENCE = ("acc_norm", "acc")
# For ad-hoc --tasks runs: the first of these a task reports is its score (then any metric it reports).
ADHOC_PREFERENCE = ("acc_norm", "acc", "exact_match", "em", "contains", "f1", "mcc", "bits_per_byte",
                    "word_perplexity", "perplexity")


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    label: str  # the row name in tables (a task may appear twice, e.g. hellaswag at 0 and 10 shots)
    task: str  # lm-eval task or group name
    shots: tuple[int, ...]  # the score is the mean over these few-shot counts
    metric: str = ""  # '' -> the suite's metric_preference; may carry a filter: 'exact_match,strict-match'
    chance: float | None = None  # accuracy of random guessing (needed when the suite is centered)
    average: bool = True  # False: reported, but left out of group and overall means


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[SuiteTask, ...]
    metric_preference: tuple[str, ...] = DEFAULT_PREFERENCE
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (group name, task labels), in order
    centered: bool = False
    overall: str = "tasks"  # tasks | groups
    description: str = ""
    source: str = ""
    any_metric: bool = False  # ad-hoc runs: fall back to any metric a task reports

    def with_shots(self, shots: Sequence[int]) -> Suite:
        """The same suite with every task at `shots` (the --shots override)."""
        shots = _shots(list(shots), f"suite {self.name}: --shots")
        return dataclasses.replace(self, tasks=tuple(dataclasses.replace(t, shots=shots) for t in self.tasks))

    def lm_eval_tasks(self) -> list[str]:
        return list(dict.fromkeys(t.task for t in self.tasks))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["groups"] = {name: list(labels) for name, labels in self.groups}
        return d


_SUITE_KEYS = {"name", "description", "source", "metric_preference", "shots", "centered", "tasks", "groups",
               "overall"}
_TASK_KEYS = {"task", "label", "shots", "metric", "chance", "average"}


def _shots(value, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise EvalError(f"{where}: shots must be a non-negative integer or a list of them, got {value!r}")
    return tuple(dict.fromkeys(values))


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        close = [difflib.get_close_matches(k, sorted(allowed), n=1) for k in extra]
        hints = "".join(f" ({k!r}: did you mean {c[0]!r}?)" for k, c in zip(extra, close) if c)
        raise EvalError(f"{where}: unknown key(s) {', '.join(extra)}{hints}; allowed: {', '.join(sorted(allowed))}")


def suite_from_dict(raw: Any, where: str = "suite") -> Suite:
    """A Suite from a parsed suite YAML, validated; errors name `where` and the key."""
    if not isinstance(raw, dict):
        raise EvalError(f"{where}: expected a mapping with name, tasks, ...; got {type(raw).__name__}")
    _unknown(raw, _SUITE_KEYS, where)
    name = str(raw.get("name") or Path(where).stem)
    default_shots = _shots(raw.get("shots", 0), f"{where}: shots")
    preference = raw.get("metric_preference", list(DEFAULT_PREFERENCE))
    if isinstance(preference, str):
        preference = [preference]
    if not preference or not all(isinstance(m, str) for m in preference):
        raise EvalError(f"{where}: metric_preference must be a list of metric names, got {preference!r}")
    centered = bool(raw.get("centered", False))
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise EvalError(f"{where}: `tasks` must be a non-empty list of task names or mappings")
    tasks = []
    for i, entry in enumerate(entries):
        at = f"{where}: tasks[{i}]"
        entry = {"task": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("task"), str) or not entry["task"]:
            raise EvalError(f"{at}: expected a task name or a mapping with `task:`, got {entry!r}")
        _unknown(entry, _TASK_KEYS, at)
        chance = entry.get("chance")
        if chance is not None and not (isinstance(chance, (int, float)) and 0 <= chance < 1):
            raise EvalError(f"{at} ({entry['task']}): chance must be a number in [0, 1), got {chance!r}")
        task = SuiteTask(
            label=str(entry.get("label", entry["task"])), task=entry["task"],
            shots=_shots(entry["shots"], f"{at}: shots") if "shots" in entry else default_shots,
            metric=str(entry.get("metric", "")), chance=None if chance is None else float(chance),
            average=bool(entry.get("average", True)),
        )
        if centered and task.average and task.chance is None:
            raise EvalError(f"{at} ({task.label}): the suite is centered, so every averaged task needs `chance:` "
                            "(the accuracy of random guessing, e.g. 0.25 for four choices)")
        tasks.append(task)
    labels = [t.label for t in tasks]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise EvalError(f"{where}: duplicate task label(s) {duplicates}; give repeated tasks a distinct `label:`")
    groups_raw = raw.get("groups") or {}
    if not isinstance(groups_raw, dict):
        raise EvalError(f"{where}: `groups` must map a group name to a list of task labels")
    groups = []
    for group, members in groups_raw.items():
        if not isinstance(members, list) or not members:
            raise EvalError(f"{where}: group {group!r} must list task labels")
        missing = [m for m in members if m not in labels]
        if missing:
            raise EvalError(f"{where}: group {group!r} names {missing}, which are not task labels of the suite "
                            f"({', '.join(labels)})")
        groups.append((str(group), tuple(members)))
    overall = raw.get("overall", "tasks")
    if overall not in ("tasks", "groups"):
        raise EvalError(f"{where}: overall must be 'tasks' or 'groups', got {overall!r}")
    if overall == "groups" and not groups:
        raise EvalError(f"{where}: overall: groups needs `groups:`")
    return Suite(name=name, tasks=tuple(tasks), metric_preference=tuple(preference), groups=tuple(groups),
                 centered=centered, overall=overall, description=str(raw.get("description", "")),
                 source=str(raw.get("source", "")))


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A suite by name (configs/eval/<name>.yaml) or from a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(str(name_or_path), available_suites(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise EvalError(f"no suite {str(name_or_path)!r}: known suites are {', '.join(available_suites())} "
                        f"(configs/eval/*.yaml), or pass a suite YAML path.{hint}")
    try:
        raw = read_yaml_file(path)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    return suite_from_dict(raw, str(path))


def adhoc_suite(tasks: Sequence[str], shots: Sequence[int] = (0,)) -> Suite:
    """A suite for `--tasks a,b,c`: each task its own row, scored by the first of ADHOC_PREFERENCE it reports."""
    odd = [t for t in tasks if not isinstance(t, str)]
    if odd:  # eval.tasks is validated by mixlm.config; a caller may still pass anything
        raise EvalError(f"tasks: expected lm-eval task names (strings), got {repr(odd[0])[:80]}")
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise EvalError("--tasks: no task names given")
    shots = _shots(list(shots), "--shots")
    return Suite(name="tasks", tasks=tuple(SuiteTask(n, n, shots) for n in dict.fromkeys(names)),
                 metric_preference=ADHOC_PREFERENCE, any_metric=True)

