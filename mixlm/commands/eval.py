"""mixlm eval MODEL_DIR --suite regmix|metarater|codelion|dclm|demo (or --tasks a,b,c): lm-evaluation-harness
on an exported transformers folder (or a training run's checkpoint); writes the results JSON and the model-card
Markdown table. --domains PREPARED_DIR[:a,b] | FILE.jsonl adds per-domain perplexity and bits per byte on
held-out documents, --mc-task NAME=FILE.jsonl[:SHOTS] a few-shot multiple-choice task from local questions.
mixlm eval compare RUN_OR_JSON ... : side-by-side Markdown + CSV and a bar chart of several results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,5; got {text!r}") from None


def _limit(text: str) -> float | int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--limit must be positive (a count, or a fraction below 1)")
    return int(value) if value >= 1 else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="MODEL_DIR | compare RUN_OR_JSON ...",
                        help="an exported model folder (or Hub id), or a training run folder (its newest "
                             "checkpoint, in the Flax model); or `compare` and several results JSONs / "
                             "folders holding one eval_*.json / training runs with lm_eval metrics")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--suite", help="suite name (configs/eval/*.yaml) or a suite YAML path")
    which.add_argument("--tasks", help="comma-separated lm-eval task names (or tags / groups)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--shots", type=_int_list, default=None,
                        help="few-shot counts, e.g. 0 or 0,1,2,3,4,5 (scores are their mean); "
                             "default: the suite's, 0 for --tasks")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="examples per task (a fraction below 1 = that share); for quick checks only")
    parser.add_argument("--batch-size", default="8", help="batch size, or 'auto' (hf backend)")
    parser.add_argument("--device", default="cpu", help="torch device for the hf backend: cpu, cuda, cuda:0, mps")
    parser.add_argument("--dtype", default=None, help="torch dtype (default: float32 on cpu, else the folder's)")
    parser.add_argument("--backend", default="hf", choices=("hf", "flax"),
                        help="hf: lm-eval's transformers model; flax: mixlm's Flax model on the same weights")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="folder of extra lm-eval task YAMLs (repeatable); offline tasks need absolute "
                             "data_files")
    parser.add_argument("--domains", action="append", default=[], metavar="PREPARED_DIR[:a,b] | FILE.jsonl",
                        help="per-domain perplexity / bits per byte on held-out documents: a prepared folder's "
                             "validation split (all domains, or those named), or a jsonl of {\"text\": ...} "
                             "lines (repeatable; no Hub access needed)")
    parser.add_argument("--mc-task", action="append", default=[], metavar="NAME=FILE.jsonl[:SHOTS]",
                        help="a multiple-choice task from jsonl lines {\"question\", \"choices\", \"answer\"}; "
                             "the first SHOTS lines are the few-shot examples (repeatable)")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="lm-eval bootstrap iterations for stderr of non-mean metrics (default 100000)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default MODEL_DIR/eval_<suite>.json; the .md table goes next to it); "
                             "for compare: the output prefix (default eval_compare -> .md, .csv, .png)")


def _run_compare(args: argparse.Namespace) -> int:
    from mixlm.eval.compare import compare
    from mixlm.eval.results import load_results

    inputs = args.paths[1:]
    if not inputs:
        _say("mixlm eval compare: pass one or more results JSONs or folders")
        return 2
    docs = [load_results(p) for p in inputs]
    written = compare(docs, args.out or "eval_compare")
    print(written["markdown"].read_text(), end="")
    _say("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    from mixlm import storage
    from mixlm.eval.harness import evaluate_model, model_tokenizer
    from mixlm.eval.local_tasks import (
        domain_rows,
        domains_markdown,
        parse_domain_spec,
        parse_mc_spec,
        write_domain_tasks,
        write_mc_task,
    )
    from mixlm.eval.report import markdown_table
    from mixlm.eval.results import write_results
    from mixlm.eval.suites import ADHOC_PREFERENCE, Suite, SuiteTask, adhoc_suite, load_suite

    if len(args.paths) != 1:
        _say("mixlm eval: pass exactly one MODEL_DIR (or `compare` followed by results)")
        return 2
    if not (args.suite or args.tasks or args.domains or args.mc_task):
        _say("mixlm eval: pass --suite NAME, --tasks a,b,c, --domains PREPARED_DIR or --mc-task NAME=FILE.jsonl "
             "(--list shows the suites)")
        return 2
    model = args.paths[0]
    if args.suite:
        suite = load_suite(args.suite)
        suite = suite.with_shots(args.shots) if args.shots else suite
    elif args.tasks:
        suite = adhoc_suite(args.tasks.split(","), args.shots or [0])
    else:
        suite = Suite(name="domains" if not args.mc_task else "local", tasks=(), metric_preference=ADHOC_PREFERENCE,
                      any_metric=True)
    include_paths, domain_info = list(args.include_path), {}
    if args.domains or args.mc_task:  # tasks over local files, written for this run
        folder = tempfile.mkdtemp(prefix="mixlm-local-tasks-")
        include_paths.append(folder)
        local = []
        if args.domains:
            specs = [spec for text in args.domains for spec in parse_domain_spec(text)]
            domain_info = write_domain_tasks(specs, model_tokenizer(model), folder)
            local += [SuiteTask(t, t, (0,), metric="nll_per_token", average=False) for t in domain_info]
        for text in args.mc_task:
            spec = parse_mc_spec(text)
            task = write_mc_task(spec, folder)
            local.append(SuiteTask(task, task, (spec.shots,)))
        suite = dataclasses.replace(suite, tasks=suite.tasks + tuple(local))
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    results = evaluate_model(model, suite, limit=args.limit, batch_size=batch_size, device=args.device,
                             dtype=args.dtype, backend=args.backend, include_paths=include_paths,
                             bootstrap_iters=args.bootstrap_iters, log=_say)
    if domain_info:
        results["domains"] = domain_rows(results, domain_info)
    folder = storage.location(model) if storage.location(model).is_dir() else storage.location(".")
    out = args.out or folder / f"eval_{suite.name}.json"  # a local folder or gs:// / s3://
    json_path, md_path = write_results(results, out)
    table = markdown_table(results) + (("\n" + domains_markdown(results["domains"])) if domain_info else "")
    storage.write_atomic(md_path, table)
    print(table, end="")
    _say(f"wrote {json_path} and {md_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from mixlm.errors import EvalError
    from mixlm.eval.suites import available_suites, load_suite

    try:
        if args.list:
            for name in available_suites():
                suite = load_suite(name)
                print(f"{name:<10} {len(suite.tasks):>2} tasks  {suite.description}")
            return 0
        if args.paths and args.paths[0] == "compare" and not Path("compare").is_dir():
            return _run_compare(args)
        from mixlm import storage

        for path in (*args.paths[:1], args.out or ""):  # before minutes of evaluation, not after
            storage.check_location(path, "--out" if path == args.out else "MODEL_DIR")
        return _run_eval(args)
    except EvalError as e:
        _say(f"mixlm eval: {e}")
        return 2
