"""Running lm-evaluation-harness: task names checked against lm-eval's index (and the generated offline demo
set), an exported folder loaded as an lm-eval model (transformers, or our Flax model on its weights) or a
training run's checkpoint in the Flax model, a suite run once per few-shot count and turned into the results
document. Tasks whose Hub datasets cannot be reached (offline) fail with one EvalError line saying what to do.

    results = evaluate_model("hf/x", load_suite("regmix"), limit=100)   # lm_eval.simple_evaluate per shot count
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mixlm import storage
from mixlm.errors import EvalError
from mixlm.eval.results import finish_results, lm_eval_version
from mixlm.eval.suites import Suite
from mixlm.eval.task_scores import score_suite

DEMO_TASK_PREFIX = "mixlm_demo"


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


def check_model_dir(model: str | Path) -> str:
    """`model` as lm-eval's `pretrained`: a transformers folder (config.json with a model_type), or a Hub id
    when no such path exists. Raises EvalError for anything else, saying what to run."""
    if storage.is_remote(model):
        raise EvalError(f"{model}: transformers loads a model folder from a local disk (or a Hub id); copy the "
                        "exported folder here first, or evaluate the training run folder itself")
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


def is_run_folder(model: str | Path) -> bool:
    """A mixlm training run (its output folder, its checkpoints/ folder or one checkpoint step folder), local or
    on an object store."""
    path = storage.location(model)
    return path.is_dir() and not (path / "config.json").is_file() and (
        (path / "checkpoints").is_dir() or path.name == "checkpoints" or (path / "state").is_dir())


def model_tokenizer(model: str | Path):
    """The transformers tokenizer of an exported folder or of a run (its data.tokenizer)."""
    import transformers

    if is_run_folder(model):
        from mixlm.errors import ExportError
        from mixlm.hf.param_readers import open_checkpoint

        try:
            name = open_checkpoint(model).cfg.data.tokenizer
        except ExportError as e:
            raise EvalError(str(e)) from None
        if not name:
            raise EvalError(f"{model}: the run's config has no data.tokenizer, so its documents cannot be "
                            "decoded; set data.tokenizer to the tokenizer folder the run was trained with")
    else:
        name = check_model_dir(model)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as e:
        raise EvalError(f"{name}: cannot load the tokenizer ({e})") from None


def load_run_lm(run: str | Path, *, batch_size: int | str = 8):
    """FlaxLM on a training run's newest complete checkpoint (no export)."""
    from mixlm.errors import ExportError
    from mixlm.eval.flax_lm import FlaxLM

    try:
        return FlaxLM.from_checkpoint(run, batch_size=8 if batch_size == "auto" else int(batch_size))
    except (ExportError, OSError, ValueError) as e:
        raise EvalError(f"{run}: cannot load its checkpoint into the Flax model: {e}") from None


def load_lm(model: str, *, backend: str = "hf", batch_size: int | str = 8, device: str = "cpu",
            dtype: str | None = None):
    """The lm-eval model object: lm-eval's own `hf` model (transformers/PyTorch), or our Flax model on the
    folder's weights (`backend='flax'`)."""
    if backend == "flax":
        from mixlm.errors import ExportError
        from mixlm.eval.flax_lm import FlaxLM

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


def _offline_cause(error: BaseException) -> BaseException | None:
    """The Hub-unreachable error behind `error` (datasets' ConnectionError, huggingface_hub's offline mode),
    found along its __cause__ / __context__ chain; None for any other failure."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _hub_datasets(names: Sequence[str], manager) -> list[str]:
    """'task (dataset_path[/dataset_name])' for each task that reads a Hub dataset (not local json/csv)."""
    out = []
    for name in names:
        entry = manager.task_index.get(name) if manager is not None else None
        cfg = (getattr(entry, "cfg", None) or {}) if entry is not None else {}
        path = cfg.get("dataset_path", "")
        if path in ("json", "csv", "parquet", "text", "arrow"):
            continue
        out.append(f"{name} ({path}{'/' + cfg['dataset_name'] if cfg.get('dataset_name') else ''})" if path
                   else name)
    return out


def offline_error(names: Sequence[str], manager, error: BaseException) -> EvalError:
    """One line: which tasks need which Hub datasets, and the two ways to make them available offline."""
    needed = _hub_datasets(names, manager) or list(names)
    return EvalError(f"lm-eval task(s) {', '.join(needed)} need Hub datasets that are not in the local cache "
                     f"and the Hub cannot be reached ({type(error).__name__}; HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                     "set?): download them once online into the datasets cache (HF_DATASETS_CACHE, default "
                     "~/.cache/huggingface/datasets), or pass --include-path DIR with task YAMLs over local files "
                     "(dataset_path: json, absolute data_files), or evaluate local data with --domains / --mc-task")


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
        except Exception as e:  # only the Hub-unreachable kind is turned into advice
            cause = _offline_cause(e)
            if cause is None:
                raise
            raise offline_error(names, manager, cause) from None
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

    run = is_run_folder(model)
    pretrained = (str(model) if storage.is_remote(model) else str(Path(model).resolve())) if run else check_model_dir(model)
    manager = task_manager(suite.lm_eval_tasks(), include_paths)
    if suite.any_metric:  # ad-hoc: a tag becomes one row per member task (other tasks keep their own shots)
        tasks = []
        for t in suite.tasks:
            tasks += [dataclasses.replace(t, label=n, task=n) for n in expand_tags([t.task], manager)]
        suite = dataclasses.replace(suite, tasks=tuple(tasks))
    if run:  # a training run: its checkpoint in the Flax model, no export
        backend = "flax"
        lm = load_run_lm(pretrained, batch_size=batch_size)
    else:
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

