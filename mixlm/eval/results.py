"""The results document of `mixlm eval` (format mixlm-eval/1): assembled from scores, written as JSON + the
Markdown table, read back (also from a training run's metrics.jsonl of live-model lm-eval metrics)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from mixlm import storage
from mixlm.errors import EvalError
from mixlm.eval.report import card_rows, markdown_table
from mixlm.eval.suites import Suite, adhoc_suite
from mixlm.eval.task_scores import finite_number, score_suite
from mixlm.run_dir import RunDir

RESULTS_FORMAT = "mixlm-eval/1"


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


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


def write_results(results: dict, path: str | Path):
    """Writes the JSON document and, next to it, the Markdown table (same name, .md), each atomically, to a local
    folder or an object store; returns both paths."""
    path = storage.location(path)
    storage.write_atomic(path, json.dumps(results, indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    storage.write_atomic(md, markdown_table(results))
    return path, md


def _results_from_metrics_log(path: Path) -> dict:
    """A results-like document from a training run's metrics.jsonl: the last record with lm_eval/ keys."""
    last = None
    for record in RunDir(path.parent).metrics():
        if any(str(k).startswith("lm_eval/") for k in record):
            last = record
    if last is None:
        raise EvalError(f"{path}: no lm_eval/ metrics (set eval.tasks to run lm-eval during training)")
    by_task: dict[str, dict] = {}
    for key, value in last.items():
        if str(key).startswith("lm_eval/") and finite_number(value) is not None:
            _, task, metric = key.split("/", 2)
            by_task.setdefault(task, {})[metric.replace("@", ",") if "@" in metric else f"{metric},none"] = value
    suite = adhoc_suite(list(by_task))
    scored = score_suite(suite, {0: by_task})
    name = path.parent.name
    args = {"model": str(path.parent), "step": last.get("step"), "source": "metrics.jsonl (live model)"}
    return finish_results(scored, suite, name=name, args=args)


def load_results(path: str | Path) -> dict:
    """A results document from a `mixlm eval` JSON, a folder holding exactly one eval_*.json (or a training
    run folder whose metrics.jsonl has lm_eval/ metrics), local or on an object store."""
    path = storage.location(path)
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

