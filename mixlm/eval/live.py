"""lm-eval tasks on the live Flax model during training (no export): the train loop's eval hook.

    run_tasks_on_live_model(cfg, graphdef, params, tokenizer, ["mixlm_demo"], limit=50)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from mixlm.config import ExperimentConfig
from mixlm.errors import EvalError
from mixlm.eval.flax_lm import FlaxLM
from mixlm.eval.harness import expand_tags, run_suite, task_manager
from mixlm.eval.suites import SuiteTask, adhoc_suite
from mixlm.eval.task_scores import finite_number


def run_tasks_on_live_model(cfg, graphdef, params: dict, tokenizer=None, tasks: Sequence[str] | None = None,
                            limit: float | None = None, *, num_fewshot: int = 0, batch_size: int = 8,
                            include_paths: Sequence[str | Path] = ()) -> dict[str, float]:
    """lm-eval tasks on the live Flax model (no export), for the train loop's eval hook.

    cfg: the ExperimentConfig (or a ModelConfig); graphdef/params: setup.graphdef and state.params (sharded
    is fine); tokenizer: a transformers tokenizer or folder (default cfg.data.tokenizer); tasks/limit default
    to cfg.eval.tasks / cfg.eval.limit (0 = all examples). Returns {'lm_eval/<task>/<metric>': value} for every
    metric lm-eval reports (filters other than 'none' appended as '<metric>@<filter>'), ready for the
    metrics log; tags such as `mixlm_demo` expand to their tasks."""
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
                if filt and not name.endswith("_stderr") and finite_number(value) is not None:
                    out[f"lm_eval/{task}/{name}" + ("" if filt == "none" else f"@{filt}")] = float(value)
    return out

