"""`mixlm eval`: lm-evaluation-harness suites on exported models, scored the way the seed papers report them.

    suite = load_suite("regmix")                         # suites.py: configs/eval/regmix.yaml
    results = evaluate_model("hf/x", suite, limit=100)   # harness.py: lm_eval.simple_evaluate per shot count
    write_results(results, "hf/x/eval_regmix.json")      # results.py: + eval_regmix.md (the model-card table)
    model_index_entries(results)                         # report.py: the card's model-index `results` entries
    run_tasks_on_live_model(cfg, graphdef, params, tokenizer, ["mixlm_demo"], limit=50)  # live.py: training
    compare([results_a, results_b], "eval_compare")      # compare.py: side-by-side Markdown / CSV + bar chart

One module per job; import from the module (this package imports none of them, so `mixlm.eval.suites` never
pulls in lm-eval):

    errors.py    EvalError
    suites.py    Suite, SuiteTask: suites as data (configs/eval/*.yaml), load_suite, adhoc_suite (--tasks)
    task_scores.py  pure functions of lm-eval's metrics: pick_metric, shot_average, centered_accuracy,
                 score_suite
    harness.py   lm-eval runs: task_manager, check_model_dir, load_lm, load_run_lm, run_suite, evaluate_model
    local_tasks.py  tasks generated from local files: per-domain perplexity (--domains), multiple choice (--mc-task)
    flax_lm.py   FlaxLM: an lm-eval `LM` over our Flax params (no export, no torch)
    live.py      run_tasks_on_live_model: the train loop's lm-eval hook on the live model
    report.py    tables of one results document: markdown_table, card_rows, model_index_entries
    results.py   the results document (mixlm-eval/1): finish_results, write_results, load_results
    compare.py   several results side by side: compare_rows / _markdown / _csv / _bar_chart, compare
"""
