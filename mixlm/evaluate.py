"""`mixlm eval`: lm-evaluation-harness suites on exported models, scored the way the seed papers report them.

    suite = load_suite("regmix")                     # configs/eval/regmix.yaml: tasks, shots, metrics, groups
    results = evaluate_model("hf/x", suite, limit=100)   # lm_eval.simple_evaluate once per shot count
    write_results(results, "hf/x/eval_regmix.json")  # + eval_regmix.md (the model-card table)
    model_index_entries(results)                     # the card's model-index `results` entries
    run_tasks_on_live_model(cfg, graphdef, params, tokenizer, ["mixlm_demo"], limit=50)   # during training
    compare([results_a, results_b])                  # side-by-side Markdown / CSV + bar chart

A suite is data (configs/eval/<name>.yaml):

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

Standard errors: the mean of k per-shot scores gets sqrt(sum se_i^2) / k (it treats the shots as independent,
which overstates precision a little: they share examples); centering divides it by (1 - chance).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import json
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

SUITES_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"
RESULTS_FORMAT = "mixlm-eval/1"
DEFAULT_PREFERENCE = ("acc_norm", "acc")
# For ad-hoc --tasks runs: the first of these a task reports is its score (then any metric it reports).
ADHOC_PREFERENCE = ("acc_norm", "acc", "exact_match", "em", "contains", "f1", "mcc", "bits_per_byte",
                    "word_perplexity", "perplexity")
LOWER_IS_BETTER = frozenset({"bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity"})
DEMO_TASK_PREFIX = "mixlm_demo"


class EvalError(RuntimeError):
    """An evaluation cannot run; the message says which model, task or file and what to do."""


# --- suites ------------------------------------------------------------------------------------------------


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
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EvalError(f"{path}: not valid YAML: {e}") from None
    return suite_from_dict(raw, str(path))


def adhoc_suite(tasks: Sequence[str], shots: Sequence[int] = (0,)) -> Suite:
    """A suite for `--tasks a,b,c`: each task its own row, scored by the first of ADHOC_PREFERENCE it reports."""
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise EvalError("--tasks: no task names given")
    shots = _shots(list(shots), "--shots")
    return Suite(name="tasks", tasks=tuple(SuiteTask(n, n, shots) for n in dict.fromkeys(names)),
                 metric_preference=ADHOC_PREFERENCE, any_metric=True)


# --- scores: pure functions of lm-eval's per-task metrics ------------------------------------------------------


def _number(x) -> float | None:
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
    keys = [k for k in keys if _number(metrics[k]) is not None]
    if not keys:
        return None
    key = f"{name},none" if f"{name},none" in keys else keys[0]
    stderr = _number(metrics.get(f"{name}_stderr,{key.partition(',')[2]}"))
    return name, float(metrics[key]), stderr


def reported_metrics(metrics: dict) -> list[str]:
    """The metric names (without filter) a task reports, in lm-eval's order."""
    out = []
    for k, v in metrics.items():
        name = k.partition(",")[0]
        if "," in k and not name.endswith("_stderr") and _number(v) is not None and name not in out:
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
                             "average": task.average and metric not in LOWER_IS_BETTER}
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


# --- running lm-eval ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def demo_tasks_dir() -> Path:
    """The generated offline task set (mixlm.eval_tasks), written once per process into a temporary folder."""
    from mixlm.eval_tasks import write_demo_tasks

    return write_demo_tasks(tempfile.mkdtemp(prefix="mixlm-eval-tasks-"))


@functools.lru_cache(maxsize=8)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def task_manager(task_names: Sequence[str], include_paths: Sequence[str | Path] = ()):
    """A lm-eval TaskManager that knows every name in `task_names`; the demo tasks are generated when asked
    for, and lm-eval's built-in index (~10 s) is read only when the include paths do not cover the names.
    Raises EvalError naming unknown tasks and the closest known ones."""
    paths = [str(Path(p).resolve()) for p in include_paths]
    for p in paths:
        if not Path(p).is_dir():
            raise EvalError(f"--include-path {p}: no such folder (it should hold lm-eval task YAMLs)")
    if any(n.startswith(DEMO_TASK_PREFIX) for n in task_names):
        paths.append(str(demo_tasks_dir()))
    paths = tuple(dict.fromkeys(paths))
    manager = _task_manager(paths, False) if paths else None
    if manager is None or not set(task_names) <= set(manager.all_tasks):
        manager = _task_manager(paths, True)
    missing = [n for n in task_names if n not in set(manager.all_tasks)]
    if missing:
        hints = []
        for n in missing:
            close = difflib.get_close_matches(n, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"{n!r}" + (f" (closest: {', '.join(close)})" if close else ""))
        raise EvalError(f"unknown lm-eval task(s): {'; '.join(hints)}. Tasks come from lm-eval "
                        f"{lm_eval_version()}'s built-in set, the generated demo set ({DEMO_TASK_PREFIX}_*), and "
                        "--include-path folders of task YAMLs (`lm-eval ls tasks` lists the built-in ones)")
    return manager


def expand_tags(task_names: Sequence[str], manager) -> list[str]:
    """Tags (e.g. `mixlm_demo`) replaced by their member tasks, so each gets its own row; groups stay."""
    def kind(entry) -> str:
        return getattr(entry.kind, "name", "")

    out = []
    for name in task_names:
        entry = manager.task_index.get(name)
        if entry is not None and kind(entry) == "TAG":
            out += sorted(n for n, e in manager.task_index.items()
                          if name in e.tags and kind(e) in ("TASK", "PY_TASK"))
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def check_model_dir(model: str | Path) -> str:
    """`model` as lm-eval's `pretrained`: a transformers folder (config.json with a model_type), or a Hub id
    when no such path exists. Raises EvalError for anything else, saying what to run."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise EvalError(f"{path}: is a file, not a model folder; pass the folder written by `mixlm export`")
        config = path / "config.json"
        if not config.is_file():
            if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
                raise EvalError(f"{path}: is a mixlm training run, not a Hugging Face model folder; export it "
                                f"first (`mixlm export {path} OUT_DIR`) and evaluate OUT_DIR")
            raise EvalError(f"{path}: not a Hugging Face model folder (no config.json); pass the folder written "
                            "by `mixlm export` or `save_pretrained`")
        try:
            hf = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"{config}: not valid JSON ({e})") from None
        if not isinstance(hf, dict) or "model_type" not in hf:
            raise EvalError(f"{config}: has no model_type, so it is not a transformers model config")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise EvalError(f"{path}: has config.json but no weights (*.safetensors); was the export interrupted?")
        if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                  "tokenizer.model")):
            raise EvalError(f"{path}: has no tokenizer files; re-export with `mixlm export ... --tokenizer DIR`")
        return str(path.resolve())
    parts = str(model).split("/")
    if len(parts) == 2 and all(parts) and not str(model).startswith("."):
        return str(model)  # a Hub id; loading errors are reported by load_lm
    raise EvalError(f"{model}: no such folder (and not a Hub id ORG/NAME)")


def load_lm(model: str, *, backend: str = "hf", batch_size: int | str = 8, device: str = "cpu",
            dtype: str | None = None):
    """The lm-eval model object: lm-eval's own `hf` model (transformers/PyTorch), or our Flax model on the
    folder's weights (`backend='flax'`)."""
    if backend == "flax":
        from mixlm.export import ExportError
        from mixlm.lm_eval_flax import FlaxLM

        try:
            return FlaxLM.from_hf_folder(model, batch_size=int(batch_size))
        except (ExportError, OSError, ValueError) as e:
            raise EvalError(f"{model}: cannot load it into the Flax model: {e}") from None
    if backend != "hf":
        raise EvalError(f"--backend must be hf or flax, got {backend!r}")
    from lm_eval.models.huggingface import HFLM

    dtype = dtype or ("float32" if device == "cpu" else "auto")
    try:
        return HFLM(pretrained=model, device=device, batch_size=batch_size, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - offline, unknown architecture, bad weights: the same advice
        raise EvalError(f"{model}: transformers could not load it as a causal LM ({type(e).__name__}: "
                        f"{str(e)[:300]})") from None


def _json_safe(x):
    return json.loads(json.dumps(x, default=str))


def run_suite(lm, suite: Suite, *, limit: float | None = None, include_paths: Sequence[str | Path] = (),
              bootstrap_iters: int = 100000, log: Callable[[str], None] | None = None, manager=None) -> dict:
    """Runs `suite` on an lm-eval model object: one simple_evaluate per distinct few-shot count. Returns the
    scored results (score_suite's keys) plus every lm-eval output under "runs"."""
    import lm_eval

    manager = manager or task_manager(suite.lm_eval_tasks(), include_paths)
    shot_counts = sorted({k for t in suite.tasks for k in t.shots})
    runs, results_by_shot = [], {}
    for k in shot_counts:
        names = list(dict.fromkeys(t.task for t in suite.tasks if k in t.shots))
        if log:
            log(f"lm-eval: {len(names)} task(s) at {k} shot(s): {', '.join(names)}")
        lm_eval_logger = logging.getLogger("lm_eval")
        level = lm_eval_logger.level
        lm_eval_logger.setLevel(logging.ERROR)  # not one "Overwriting default num_fewshot" line per task
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=k, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
        finally:
            lm_eval_logger.setLevel(level)
        if out is None:
            raise EvalError("lm-eval returned nothing (a non-zero rank in a distributed run?)")
        results_by_shot[k] = out["results"]
        runs.append(_json_safe({"shots": k, "tasks": names, **{key: out.get(key) for key in (
            "results", "groups", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better",
            "config", "configs")}}))
    return {**score_suite(suite, results_by_shot), "runs": runs}


def evaluate_model(model: str | Path, suite: Suite, *, limit: float | None = None, batch_size: int | str = 8,
                   device: str = "cpu", dtype: str | None = None, backend: str = "hf",
                   include_paths: Sequence[str | Path] = (), bootstrap_iters: int = 100000,
                   log: Callable[[str], None] | None = None) -> dict:
    """`suite` on an exported model folder; the results document that write_results saves. Task names are
    checked before the model is loaded."""
    import transformers

    pretrained = check_model_dir(model)
    manager = task_manager(suite.lm_eval_tasks(), include_paths)
    if suite.any_metric:  # ad-hoc: a tag becomes one row per member task
        names = expand_tags([t.task for t in suite.tasks], manager)
        suite = dataclasses.replace(suite, tasks=tuple(SuiteTask(n, n, suite.tasks[0].shots) for n in names))
    lm = load_lm(pretrained, backend=backend, batch_size=batch_size, device=device, dtype=dtype)
    scored = run_suite(lm, suite, limit=limit, include_paths=include_paths, bootstrap_iters=bootstrap_iters,
                       log=log, manager=manager)
    args = {"model": str(model), "suite": suite.name, "tasks": suite.lm_eval_tasks(),
            "shots": sorted({k for t in suite.tasks for k in t.shots}), "limit": limit, "batch_size": batch_size,
            "device": device, "dtype": dtype, "backend": backend,
            "include_path": [str(p) for p in include_paths], "bootstrap_iters": bootstrap_iters}
    if any(n.startswith(DEMO_TASK_PREFIX) for n in suite.lm_eval_tasks()):
        from mixlm.eval_tasks import VERSION

        args["demo_tasks"] = {"generator": "mixlm.eval_tasks", "version": VERSION}
    return finish_results(scored, suite, name=Path(str(model)).name, args=args,
                          versions={"transformers": transformers.__version__})


def finish_results(scored: dict, suite: Suite, *, name: str, args: dict, versions: dict | None = None) -> dict:
    """The results document: scores, the suite, lm-eval's outputs and versions, and card rows."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mixlm_version = version("mixlm")
    except PackageNotFoundError:
        mixlm_version = ""
    doc = {
        "format": RESULTS_FORMAT, "name": name, "suite": suite.name, "description": suite.description,
        "source": suite.source, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lm_eval_version": lm_eval_version(), "mixlm_version": mixlm_version, "versions": versions or {},
        "args": args, "suite_config": suite.to_dict(),
        **{k: scored[k] for k in ("tasks", "groups", "overall", "per_shot")}, "runs": scored.get("runs", []),
    }
    doc["rows"] = card_rows(doc)
    return doc


# --- during training ----------------------------------------------------------------------------------------


def run_tasks_on_live_model(cfg, graphdef, params: dict, tokenizer=None, tasks: Sequence[str] | None = None,
                            limit: float | None = None, *, num_fewshot: int = 0, batch_size: int = 8,
                            include_paths: Sequence[str | Path] = ()) -> dict[str, float]:
    """lm-eval tasks on the live Flax model (no export), for the train loop's eval hook.

    cfg: the ExperimentConfig (or a ModelConfig); graphdef/params: setup.graphdef and state.params (sharded
    is fine); tokenizer: a transformers tokenizer or folder (default cfg.data.tokenizer); tasks/limit default
    to cfg.eval.tasks / cfg.eval.limit (0 = all examples). Returns {'lm_eval/<task>/<metric>': value} for every
    metric lm-eval reports (filters other than 'none' appended as '<metric>@<filter>'), ready for the
    metrics log; tags such as `mixlm_demo` expand to their tasks."""
    from mixlm.config import ExperimentConfig
    from mixlm.lm_eval_flax import FlaxLM

    experiment = cfg if isinstance(cfg, ExperimentConfig) else None
    if tasks is None:
        tasks = list(experiment.eval.tasks) if experiment else []
    if limit is None and experiment:
        limit = experiment.eval.limit or None
    tokenizer = tokenizer or (experiment.data.tokenizer if experiment else None)
    if not tasks:
        return {}
    if not tokenizer:
        raise EvalError("lm-eval on the live model needs a tokenizer: set data.tokenizer")
    suite = adhoc_suite(tasks, [num_fewshot])
    manager = task_manager(suite.lm_eval_tasks(), include_paths)
    names = expand_tags(suite.lm_eval_tasks(), manager)
    suite = dataclasses.replace(suite, tasks=tuple(SuiteTask(n, n, (num_fewshot,)) for n in names))
    lm = FlaxLM(experiment.model if experiment else cfg, graphdef, params, tokenizer, batch_size=batch_size)
    scored = run_suite(lm, suite, limit=limit, manager=manager)
    out = {}
    for run in scored["runs"]:
        for task, metrics in run["results"].items():
            for key, value in metrics.items():
                name, _, filt = key.partition(",")
                if filt and not name.endswith("_stderr") and _number(value) is not None:
                    out[f"lm_eval/{task}/{name}" + ("" if filt == "none" else f"@{filt}")] = float(value)
    return out


# --- tables and the model card ------------------------------------------------------------------------------


def is_percent(metric: str) -> bool:
    """Accuracy-like metrics are shown as percentages; perplexities and bits per byte as they are."""
    return metric.removeprefix("centered_").partition(" ")[0] not in LOWER_IS_BETTER


def _fmt(value: float | None, percent: bool, bold: bool = False) -> str:
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
        lines.append(f"| {label} | {row['metric']} | {shots} | {_fmt(row['score'], pct, bold)} | "
                     f"{_fmt(row['stderr'], pct)} |")
    multi = {label: t for label, t in results["tasks"].items() if len(t["shots"]) > 1}
    if multi:
        shot_counts = sorted({k for t in multi.values() for k in t["shots"]})
        by = {(p["task"], p["shots"]): p for p in results["per_shot"]}
        lines += ["", "| Task | Metric | " + " | ".join(f"{k}-shot" for k in shot_counts) + " | Mean |",
                  "|---|---|" + "---:|" * (len(shot_counts) + 1)]
        for label, t in multi.items():
            metric = t["metric"].removeprefix("centered_")
            pct = is_percent(metric)
            cells = [_fmt(by[(label, k)]["value"], pct) if (label, k) in by else "" for k in shot_counts]
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + f" | {_fmt(t['raw_score'], pct)} |")
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


def write_results(results: dict, path: str | Path) -> tuple[Path, Path]:
    """Writes the JSON document and, next to it, the Markdown table (same name, .md); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown_table(results))
    return path, md


# --- compare ---------------------------------------------------------------------------------------------------


def _results_from_metrics_log(path: Path) -> dict:
    """A results-like document from a training run's metrics.jsonl: the last record with lm_eval/ keys."""
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and any(str(k).startswith("lm_eval/") for k in record):
            last = record
    if last is None:
        raise EvalError(f"{path}: no lm_eval/ metrics (set eval.tasks to run lm-eval during training)")
    by_task: dict[str, dict] = {}
    for key, value in last.items():
        if str(key).startswith("lm_eval/") and _number(value) is not None:
            _, task, metric = key.split("/", 2)
            by_task.setdefault(task, {})[metric.replace("@", ",") if "@" in metric else f"{metric},none"] = value
    suite = adhoc_suite(list(by_task))
    scored = score_suite(suite, {0: by_task})
    name = path.parent.name
    args = {"model": str(path.parent), "step": last.get("step"), "source": "metrics.jsonl (live model)"}
    return finish_results(scored, suite, name=name, args=args)


def load_results(path: str | Path) -> dict:
    """A results document from a `mixlm eval` JSON, a folder holding exactly one eval_*.json (or a training
    run folder whose metrics.jsonl has lm_eval/ metrics)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("eval_*.json"))
        if len(found) == 1:
            path = found[0]
        elif len(found) > 1:
            raise EvalError(f"{path}: several results ({', '.join(p.name for p in found)}); pass one JSON file")
        elif (path / "metrics.jsonl").is_file():
            return _results_from_metrics_log(path / "metrics.jsonl")
        else:
            raise EvalError(f"{path}: no eval_*.json and no metrics.jsonl; run `mixlm eval` on it first")
    if not path.is_file():
        raise EvalError(f"{path}: no such file or folder")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise EvalError(f"{path}: not a `mixlm eval` results file (format {RESULTS_FORMAT})")
    doc["_file"] = str(path)  # names the column when two runs share a name
    return doc


def _unique_names(docs: Sequence[dict]) -> list[str]:
    """Column names: the runs' names; where two share one, the results file's stem, else a number."""
    names = [d.get("name") or f"run{i}" for i, d in enumerate(docs)]
    names = [n if names.count(n) == 1 or not d.get("_file") else Path(d["_file"]).stem
             for n, d in zip(names, docs)]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def compare_rows(docs: Sequence[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) of the side-by-side table: one row per task / group / average label (first-seen order),
    one score column per run (None where a run lacks the row)."""
    names = _unique_names(docs)
    order: list[tuple[str, str, str]] = []  # (kind, label, metric)
    scores: dict[tuple[str, str], list] = {}
    for i, doc in enumerate(docs):
        for row in table_rows(doc):
            key = (row["kind"], row["label"])
            if key not in scores:
                scores[key] = [None] * len(docs)
                order.append((row["kind"], row["label"], row["metric"]))
            scores[key][i] = row["score"]
    kinds = {"task": 0, "group": 1, "overall": 2}
    order.sort(key=lambda r: kinds[r[0]])
    return ["task", "metric", *names], [[label, metric, *scores[(kind, label)]] for kind, label, metric in order]


def compare_markdown(docs: Sequence[dict]) -> str:
    header, rows = compare_rows(docs)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for label, metric, *values in rows:
        pct = is_percent(metric)
        numbers = [v for v in values if v is not None]
        best = (min if metric.removeprefix("centered_") in LOWER_IS_BETTER else max)(numbers) if len(numbers) > 1 else None
        cells = [_fmt(v, pct, bold=v is not None and v == best) for v in values]
        lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    suites = sorted({d.get("suite", "") for d in docs})
    return "\n".join(lines) + f"\n\nScores in % except perplexity / bits per byte; best per row in bold. Suite: " \
        f"{', '.join(suites)}.\n"


def compare_csv(docs: Sequence[dict]) -> str:
    import csv
    import io

    header, rows = compare_rows(docs)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for label, metric, *values in rows:
        writer.writerow([label, metric, *["" if v is None else f"{v:.6g}" for v in values]])
    return buffer.getvalue()


def compare_bar_chart(docs: Sequence[dict], path: str | Path) -> Path:
    """A grouped bar chart PNG of the accuracy-like rows (tasks, groups, average), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    header, rows = compare_rows(docs)
    rows = [r for r in rows if is_percent(r[1])]
    if not rows:
        raise EvalError("nothing to plot: no accuracy-like scores in these results")
    names = header[2:]
    x = np.arange(len(rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * max(1, len(names)) ** 0.5 + 2), 4.5))
    for i, name in enumerate(names):
        heights = [100 * r[2 + i] if r[2 + i] is not None else np.nan for r in rows]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, [r[0] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("score (%)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(f"mixlm eval compare: {', '.join(sorted({d.get('suite', '') for d in docs}))}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(paths_or_docs: Sequence[str | Path | dict], out_prefix: str | Path) -> dict[str, Path]:
    """Writes <prefix>.md, <prefix>.csv and <prefix>.png for several results; returns the three paths."""
    docs = [d if isinstance(d, dict) else load_results(d) for d in paths_or_docs]
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    md.write_text(compare_markdown(docs))
    csv_path.write_text(compare_csv(docs))
    png = compare_bar_chart(docs, prefix.with_name(prefix.name + ".png"))
    return {"markdown": md, "csv": csv_path, "png": png}


__all__ = [
    "EvalError", "Suite", "SuiteTask", "adhoc_suite", "available_suites", "card_rows", "centered_accuracy",
    "check_model_dir", "compare", "compare_bar_chart", "compare_csv", "compare_markdown", "compare_rows",
    "evaluate_model", "load_results", "load_suite", "markdown_table", "model_index_entries", "run_suite",
    "run_tasks_on_live_model", "score_suite", "shot_average", "suite_from_dict", "task_manager", "write_results",
]
