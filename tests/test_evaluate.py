"""mixlm eval: suites as data, scoring (shot means, groups, centered accuracy) against hand-computed numbers, the
offline demo task set on a tiny exported model (its accuracies equal our own log-likelihood computation), the
Flax lm-eval model against lm-eval's transformers model per example, live-model evaluation on a training
state, compare tables, and the errors a user sees.

Suites that need Hub datasets (hellaswag, mmlu, ...) cannot run offline: for them only the YAML structure and
the task names (against lm-eval's own task index) are tested."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixlm.cli import main as cli_main
from mixlm.config import ExperimentConfig, MeshConfig, ModelConfig
from mixlm.errors import EvalError
from mixlm.eval.harness import check_model_dir, demo_tasks_dir, task_manager
from mixlm.eval.live import run_tasks_on_live_model
from mixlm.eval.report import model_index_entries
from mixlm.eval.results import load_results
from mixlm.eval.suites import available_suites, load_suite, suite_from_dict
from mixlm.eval.task_scores import centered_accuracy, score_suite
from mixlm.eval_tasks import TASKS, write_demo_tasks
from mixlm.models import build_model, merge_params, split_params

CFG = ModelConfig(family="llama", name="eval-tiny", num_layers=2, d_model=64, num_heads=4, mlp_dim=128,
                  vocab_size=320, max_seq_len=64, init_std=0.2)
MC_TASKS = [t for t, (kind, _, _) in TASKS.items() if kind == "multiple_choice"]
LIMIT = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (large init so choices differ clearly), a BPE tokenizer trained on demo text, and
    the model exported as a transformers folder."""
    from mixlm.data.demo_corpus import GENERATORS
    from mixlm.data.tokenizer import train_tokenizer_from_texts
    from mixlm.hf.export import export_hf
    from mixlm.hf.param_readers import MemoryReader

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    texts = [gen(rng) for gen in GENERATORS.values() for _ in range(150)]
    tokenizer_dir = train_tokenizer_from_texts(texts, root / "tokenizer", vocab_size=CFG.vocab_size)
    graphdef, params = split_params(build_model(CFG, rngs=nnx.Rngs(0)))
    export_hf(MemoryReader(ExperimentConfig(model=CFG), params), root / "hf", tokenizer=str(tokenizer_dir))
    return {"root": root, "graphdef": graphdef, "params": params, "tokenizer": tokenizer_dir, "hf": root / "hf"}


@pytest.fixture(scope="module")
def demo_results(tiny):
    """`mixlm eval HF_DIR --suite demo` through the CLI (offline: conftest sets HF_*_OFFLINE)."""
    out = tiny["root"] / "results" / "eval_demo.json"
    rc = cli_main(["eval", str(tiny["hf"]), "--suite", "demo", "--limit", str(LIMIT), "--batch-size", "4",
                   "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), out


# --- suites as data ------------------------------------------------------------------------------------------


def test_suite_yamls_name_real_lm_eval_tasks():
    """Structure only: the hub-dataset suites cannot run offline. Every task exists in lm-eval 0.4.13's index,
    explicit metrics are ones the task declares, and each suite says what the papers report."""
    suites = {name: load_suite(name) for name in available_suites()}
    assert set(suites) >= {"regmix", "metarater", "codelion", "dclm", "demo"}
    names = sorted({t for s in suites.values() for t in s.lm_eval_tasks()})
    manager = task_manager(names)  # raises for an unknown name
    for suite in suites.values():
        for task in suite.tasks:
            cfg = manager.task_index[task.task].cfg or {}
            declared = [m["metric"] for m in cfg.get("metric_list") or []]
            if task.metric and declared:
                assert task.metric.partition(",")[0] in declared, (suite.name, task.task, declared)

    regmix = suites["regmix"]
    assert len(regmix.tasks) == 13 and all(t.shots == (0, 1, 2, 3, 4, 5) for t in regmix.tasks)
    assert regmix.metric_preference == ("acc_norm", "acc")
    metarater = suites["metarater"]
    assert [g for g, _ in metarater.groups] == ["General Knowledge", "Commonsense Reasoning", "Reading Comprehension"]
    assert {t.task for t in metarater.tasks} >= {"mmlu", "nq_open"}
    codelion = {t.task: t for t in suites["codelion"].tasks}
    assert codelion["mmlu"].shots == (5,) and codelion["truthfulqa_mc2"].shots == (0,)
    dclm = suites["dclm"]
    assert dclm.centered and all(t.chance is not None for t in dclm.tasks)
    by_label = {t.label: t for t in dclm.tasks}
    assert by_label["hellaswag_zeroshot"].shots == (0,) and by_label["hellaswag"].shots == (10,)
    assert by_label["boolq"].chance == 0.62 and by_label["agi_eval_lsat_ar"].shots == (3,)


@pytest.mark.parametrize("raw, message", [
    ({"tasks": [{"task": "a", "shot": 1}]}, "did you mean 'shots'"),
    ({"centered": True, "tasks": ["a"]}, "needs `chance:`"),
    ({"tasks": ["a"], "groups": {"G": ["b"]}}, "not task labels"),
    ({"tasks": ["a", "a"]}, "duplicate task label"),
    ({"tasks": [{"task": "a", "shots": -1}]}, "non-negative"),
    ({"tasks": []}, "non-empty"),
])
def test_suite_validation_errors(raw, message):
    with pytest.raises(EvalError, match=message):
        suite_from_dict(raw, "my_suite.yaml")


# --- scoring against hand-computed numbers ----------------------------------------------------------------------


def test_shot_average_groups_and_centered_accuracy_by_hand():
    suite = suite_from_dict({
        "name": "t", "shots": [0, 1], "centered": True,
        "tasks": [{"task": "a", "chance": 0.25}, {"task": "b", "chance": 0.5},
                  {"task": "c", "metric": "exact_match,strict", "chance": 0.0, "shots": 0},
                  {"task": "d", "metric": "bits_per_byte", "average": False, "shots": 0}],
        "groups": {"G": ["a", "b"]},
    })
    results = {
        0: {"a": {"acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.03},
            "b": {"acc,none": 0.7, "acc_stderr,none": 0.04},  # no acc_norm: acc
            "c": {"exact_match,flexible": 0.9, "exact_match,strict": 0.2, "exact_match_stderr,strict": 0.02},
            "d": {"bits_per_byte,none": 1.5, "bits_per_byte_stderr,none": "N/A"}},
        1: {"a": {"acc,none": 0.1, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.04},
            "b": {"acc,none": 0.8, "acc_stderr,none": 0.03}},
    }
    scored = score_suite(suite, results)
    a, b, c, d = (scored["tasks"][k] for k in "abcd")
    # a: mean acc_norm (0.6 + 0.7) / 2 = 0.65, se sqrt(.03^2 + .04^2) / 2 = .025; centered (0.65 - .25) / .75
    assert a["metric"] == "centered_acc_norm" and a["raw_score"] == pytest.approx(0.65)
    assert a["score"] == pytest.approx(8 / 15) and a["stderr"] == pytest.approx(0.025 / 0.75)
    # b: mean acc 0.75, centered (0.75 - .5) / .5 = 0.5, se .025 / .5
    assert b["metric"] == "centered_acc" and b["score"] == pytest.approx(0.5) and b["stderr"] == pytest.approx(0.05)
    # c: the named filter, not the better-looking one
    assert c["score"] == pytest.approx(0.2) and c["stderr"] == pytest.approx(0.02) and c["shots"] == [0]
    assert d["score"] == 1.5 and d["stderr"] is None and not d["centered"]
    group = scored["groups"]["G"]
    assert group["score"] == pytest.approx((8 / 15 + 0.5) / 2)
    assert group["stderr"] == pytest.approx(math.sqrt((0.025 / 0.75) ** 2 + 0.05**2) / 2)
    overall = scored["overall"]  # d is not averaged
    assert overall["n"] == 3 and overall["score"] == pytest.approx((8 / 15 + 0.5 + 0.2) / 3)
    assert [(p["task"], p["shots"], p["metric"]) for p in scored["per_shot"]] == [
        ("a", 0, "acc_norm"), ("a", 1, "acc_norm"), ("b", 0, "acc"), ("b", 1, "acc"), ("c", 0, "exact_match"),
        ("d", 0, "bits_per_byte")]
    assert centered_accuracy(0.81, 0.62) == pytest.approx(0.5)

    # overall over groups: the group counts once, the ungrouped task once; --shots replaces every task's shots
    by_groups = suite_from_dict({"name": "g", "shots": [0, 1], "tasks": ["a", "b", "c"],
                                    "metric_preference": ["acc"], "groups": {"G": ["a", "b"]}, "overall": "groups"})
    results[0]["c"] = {"acc,none": 0.2}
    scored = score_suite(by_groups.with_shots([0]), results)
    assert scored["overall"]["score"] == pytest.approx(((0.5 + 0.7) / 2 + 0.2) / 2)
    assert all(t["shots"] == [0] for t in scored["tasks"].values())


def test_regmix_mean_over_six_shots():
    suite = load_suite("regmix")
    results = {k: {} for k in range(6)}
    for task in suite.lm_eval_tasks():
        for k in range(6):
            if task == "lambada_openai":  # reports acc and perplexity only
                results[k][task] = {"acc,none": 0.5 + 0.01 * k, "perplexity,none": 30.0}
            else:
                results[k][task] = {"acc,none": 0.9, "acc_norm,none": 0.30 + 0.02 * k}
    scored = score_suite(suite, results)
    assert scored["tasks"]["hellaswag"]["score"] == pytest.approx(0.35)  # (0.30 + ... + 0.40) / 6
    assert scored["tasks"]["lambada_openai"]["metric"] == "acc"
    assert scored["tasks"]["lambada_openai"]["score"] == pytest.approx(0.525)
    assert scored["overall"]["score"] == pytest.approx((12 * 0.35 + 0.525) / 13)


def test_metarater_groups_and_dclm_core_by_hand():
    metarater = load_suite("metarater")
    values = {"arc_easy": 0.6, "arc_challenge": 0.3, "sciq": 0.9, "hellaswag": 0.4, "social_iqa": 0.5,
              "winogrande": 0.55, "race": 0.35, "openbookqa": 0.25, "mmlu": 0.27}
    results = {0: {t: {"acc,none": v, "acc_norm,none": v} for t, v in values.items()}}
    results[0]["nq_open"] = {"exact_match,remove_whitespace": 0.05}
    scored = score_suite(metarater, results)
    assert scored["groups"]["General Knowledge"]["score"] == pytest.approx((0.6 + 0.3 + 0.9) / 3)
    assert scored["groups"]["Commonsense Reasoning"]["score"] == pytest.approx((0.4 + 0.5 + 0.55) / 3)
    assert scored["groups"]["Reading Comprehension"]["score"] == pytest.approx((0.35 + 0.25) / 2)
    assert scored["tasks"]["nq_open"]["score"] == 0.05
    assert scored["overall"]["score"] == pytest.approx((sum(values.values()) + 0.05) / 10)

    dclm = load_suite("dclm")
    results = {}
    for t in dclm.tasks:  # every task exactly 40% of the way from chance to perfect, hellaswag 0-shot 20%
        fraction = 0.2 if t.label == "hellaswag_zeroshot" else 0.4
        value = t.chance + (1 - t.chance) * fraction
        metric = t.metric or "acc_norm"
        results.setdefault(t.shots[0], {})[t.task] = {f"{metric},none": value, f"{metric}_stderr,none": 0.01}
    scored = score_suite(dclm, results)
    assert scored["tasks"]["boolq"]["raw_score"] == pytest.approx(0.62 + 0.38 * 0.4)
    assert scored["tasks"]["boolq"]["score"] == pytest.approx(0.4)
    assert scored["tasks"]["hellaswag_zeroshot"]["score"] == pytest.approx(0.2)
    assert scored["tasks"]["hellaswag"]["score"] == pytest.approx(0.4)
    assert scored["overall"]["score"] == pytest.approx((20 * 0.4 + 0.2) / 21)


# --- the offline demo task set -----------------------------------------------------------------------------------


def test_demo_tasks_are_deterministic_and_well_formed(tmp_path):
    a, b = write_demo_tasks(tmp_path / "a", num_test=30), write_demo_tasks(tmp_path / "b", num_test=30)
    for task in TASKS:
        assert (a / f"{task}.test.jsonl").read_text() == (b / f"{task}.test.jsonl").read_text()
        text = (a / f"{task}.yaml").read_text()
        assert f"{a}/{task}.test.jsonl" in text and "$" not in text  # absolute paths, template filled in
    for task in MC_TASKS:
        for line in (a / f"{task}.test.jsonl").read_text().splitlines():
            doc = json.loads(line)
            assert len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4


def _own_choice_loglikelihoods(tiny, docs):
    """Per doc, the summed log-probability of each choice after its question: our Flax model called directly,
    tokenized as lm-eval does (continuation = tokens of question + ' ' + choice after those of the question)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny["tokenizer"]))
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(merge_params(tiny["graphdef"], p)(t)[..., : CFG.vocab_size]))
    out = []
    for doc in docs:
        context = tokenizer.encode(doc["question"])
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["question"] + " " + choice)
            n = len(whole) - len(context)
            window = whole[-(CFG.max_seq_len + 1):]
            inputs = np.zeros((1, CFG.max_seq_len), np.int32)  # right padding: causal, so harmless
            inputs[0, : len(window) - 1] = window[:-1]
            logp = np.asarray(forward(tiny["params"], jnp.asarray(inputs)))[0]
            targets = window[1:]
            lls.append(sum(float(logp[i, targets[i]]) for i in range(len(targets) - n, len(targets))))
        out.append(lls)
    return out


def test_demo_suite_accuracies_equal_our_own_loglikelihoods(tiny, demo_results):
    results, path = demo_results
    folder = demo_tasks_dir()  # the set the CLI run generated in this process
    for task in MC_TASKS:
        docs = [json.loads(x) for x in (folder / f"{task}.test.jsonl").read_text().splitlines()[:LIMIT]]
        lls = _own_choice_loglikelihoods(tiny, docs)
        acc = np.mean([np.argmax(ll) == d["label"] for ll, d in zip(lls, docs)])
        lengths = [np.array([len(c) for c in d["choices"]], float) for d in docs]  # lm-eval: characters
        acc_norm = np.mean([np.argmax(np.array(ll) / n) == d["label"] for ll, n, d in zip(lls, lengths, docs)])
        metrics = results["runs"][0]["results"][task]
        assert metrics["acc,none"] == pytest.approx(acc, abs=1e-12), task
        assert metrics["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12), task
        label = next(t["label"] for t in results["suite_config"]["tasks"] if t["task"] == task)
        assert results["tasks"][label]["score"] == pytest.approx(acc_norm)  # the suite prefers acc_norm

    # the document: every task, shot, metric and stderr, lm-eval's version and arguments, card rows
    assert results["lm_eval_version"] == "0.4.13" and results["args"]["limit"] == LIMIT
    assert results["runs"][0]["config"]["limit"] == LIMIT
    assert {p["lm_eval_task"] for p in results["per_shot"]} == set(TASKS)
    assert all({"shots", "metric", "value", "stderr"} <= set(p) for p in results["per_shot"])
    assert results["groups"]["Multiple choice"]["score"] == pytest.approx(
        np.mean([results["tasks"][k]["score"] for k in ("arithmetic", "records", "prose", "code")]))
    assert results["overall"]["n"] == 5  # bits per byte is reported, not averaged
    table = path.with_suffix(".md").read_text()
    assert "| **Multiple choice** |" in table and "| **Average** |" in table and "bits_per_byte" in table

    from mixlm.model_card import eval_scores_from_json

    scores = eval_scores_from_json(results)  # what `mixlm export/release --eval-results` reads
    assert {s.task for s in scores} >= {"arithmetic", "Multiple choice", "Average"}
    entries = model_index_entries(results)
    assert len(entries) == len(results["rows"])
    first = entries[0]
    assert first["task"]["type"] == "text-generation" and first["dataset"]["args"] == {"num_few_shot": 0}
    assert first["metrics"][0]["type"] == "acc_norm"


def test_flax_lm_agrees_with_hf_per_example(tiny):
    """Our Flax `LM` on the live params vs lm-eval's `hf` model on the exported folder, 1-shot so contexts are
    longer than the 64-token window: loglikelihoods, greedy flags, rolling log-likelihoods (several windows)
    and greedy generations, example by example."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from mixlm.eval.flax_lm import FlaxLM

    manager = task_manager(list(TASKS))
    models = {"hf": HFLM(pretrained=str(tiny["hf"]), device="cpu", batch_size=4, dtype="float32"),
              "flax": FlaxLM(CFG, tiny["graphdef"], tiny["params"], tiny["tokenizer"], batch_size=4)}
    samples = {}
    for name, lm in models.items():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), num_fewshot=1, limit=6, task_manager=manager,
                                      log_samples=True)
        samples[name] = out["samples"]
    tokenizer = models["flax"].tokenizer
    longest = max(len(tokenizer.encode(d["arguments"][0][0])) for d in samples["hf"]["mixlm_demo_ppl"])
    assert longest > 2 * CFG.max_seq_len  # rolling log-likelihoods over several windows are compared too
    code = max(len(tokenizer.encode("".join(a))) for d in samples["hf"]["mixlm_demo_code"] for a in d["arguments"])
    assert code > CFG.max_seq_len + 1  # and loglikelihoods whose context was cut on the left
    compared = {"loglikelihood": 0, "rolling": 0, "generate": 0}
    for task in TASKS:
        for hf_doc, flax_doc in zip(samples["hf"][task], samples["flax"][task], strict=True):
            assert hf_doc["arguments"] == flax_doc["arguments"]
            for hf_resp, flax_resp in zip(hf_doc["filtered_resps"], flax_doc["filtered_resps"], strict=True):
                if isinstance(hf_resp, str):
                    assert hf_resp == flax_resp
                    compared["generate"] += 1
                elif isinstance(hf_resp, (tuple, list)):
                    assert abs(hf_resp[0] - flax_resp[0]) <= 1e-3 and hf_resp[1] == flax_resp[1]
                    compared["loglikelihood"] += 1
                else:
                    assert abs(hf_resp - flax_resp) <= 1e-3
                    compared["rolling"] += 1
    assert min(compared.values()) > 0, compared


def test_run_tasks_on_live_model_from_a_training_state(tiny):
    """The train loop's hook: the sharded state of build_setup (vocabulary padded for the mesh)."""
    from mixlm.sharding import make_mesh
    from mixlm.train import build_setup

    cfg = ExperimentConfig(model=CFG, mesh=MeshConfig())
    cfg = cfg.replace(data=type(cfg.data)(tokenizer=str(tiny["tokenizer"])),
                      eval=type(cfg.eval)(tasks=["mixlm_demo_prose", "mixlm_demo_arithmetic_gen"], limit=4))
    setup = build_setup(cfg, make_mesh(cfg.mesh))
    state = setup.init_state(jax.random.key(0))
    metrics = run_tasks_on_live_model(cfg, setup.graphdef, state.params, None, None, None)
    assert set(metrics) == {"lm_eval/mixlm_demo_prose/acc", "lm_eval/mixlm_demo_prose/acc_norm",
                            "lm_eval/mixlm_demo_arithmetic_gen/exact_match"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

    # a run folder whose metrics.jsonl holds these is something `eval compare` can read
    run = tiny["root"] / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0, **metrics}) + "\n")
    doc = load_results(run)
    assert doc["tasks"]["mixlm_demo_prose"]["metric"] == "acc_norm"
    assert doc["tasks"]["mixlm_demo_prose"]["score"] == metrics["lm_eval/mixlm_demo_prose/acc_norm"]


# --- compare -----------------------------------------------------------------------------------------------------


def test_compare_tables_and_bar_chart(tiny, demo_results, capsys):
    results, path = demo_results
    other = json.loads(json.dumps(results))
    other["name"] = "better"
    other["tasks"]["prose"]["score"] = 0.99
    other_path = tiny["root"] / "better.json"
    other_path.write_text(json.dumps(other))
    prefix = tiny["root"] / "cmp" / "side_by_side"
    assert cli_main(["eval", "compare", str(path), str(other_path), "--out", str(prefix)]) == 0
    markdown = prefix.with_suffix(".md").read_text()
    assert markdown == capsys.readouterr().out
    assert "| prose | acc_norm |" in markdown and "**99.00**" in markdown
    rows = [line.split(",") for line in prefix.with_suffix(".csv").read_text().splitlines()]
    assert rows[0] == ["task", "metric", "hf", "better"]  # runs are named after their model folders
    prose = next(r for r in rows if r[0] == "prose")
    assert float(prose[3]) == 0.99 and float(prose[2]) == pytest.approx(results["tasks"]["prose"]["score"])
    png = prefix.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _hand_made_results(name: str, quiz_acc: float, web_nll: float, web_bpb: float) -> dict:
    """A results document like `eval --mc-task quiz=... --domains web.jsonl` writes, from hand-set scores."""
    from mixlm.eval.results import finish_results

    suite = suite_from_dict({"name": "local", "tasks": [
        {"task": "quiz"}, {"task": "web", "metric": "nll_per_token", "average": False},
        {"task": "web_bpb", "metric": "bits_per_byte", "average": False}]})
    scored = score_suite(suite, {0: {"quiz": {"acc,none": quiz_acc}, "web": {"nll_per_token,none": web_nll},
                                     "web_bpb": {"bits_per_byte,none": web_bpb}}})
    return finish_results(scored, suite, name=name, args={})


def test_compare_bolds_by_direction_and_shows_losses_in_their_unit(tmp_path, capsys):
    """Losses are lower-is-better and not percentages: in `eval compare` the lower NLL / bits per byte is bold,
    the higher accuracy is bold; NLL prints as 5.4326 (not 543.26) in compare and in the results table; the
    chart puts accuracies on a % axis and each loss on an axis of its own, at its own value."""
    from mixlm.eval.compare import compare_figure
    from mixlm.eval.report import markdown_table

    small = _hand_made_results("small", quiz_acc=0.6, web_nll=5.4326, web_bpb=1.25)
    large = _hand_made_results("large", quiz_acc=0.7, web_nll=4.0, web_bpb=0.9)
    paths = []
    for doc in (small, large):
        paths.append(tmp_path / f"{doc['name']}.json")
        paths[-1].write_text(json.dumps(doc))
    assert cli_main(["eval", "compare", *map(str, paths), "--out", str(tmp_path / "cmp")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["quiz"] == "| quiz | acc | 60.00 | **70.00** |"
    assert rows["web"] == "| web | nll_per_token | 5.4326 | **4.0000** |"
    assert rows["web_bpb"] == "| web_bpb | bits_per_byte | 1.2500 | **0.9000** |"
    assert "| web | nll_per_token | 0 | 5.4326 |" in markdown_table(small)

    fig = compare_figure([small, large])
    by_label = {ax.get_ylabel(): ax for ax in fig.axes}
    assert set(by_label) == {"score (%, higher is better)", "nll_per_token (lower is better)",
                             "bits_per_byte (lower is better)"}
    heights = {label: sorted(round(p.get_height(), 6) for p in ax.patches) for label, ax in by_label.items()}
    assert heights["score (%, higher is better)"] == [60.0, 60.0, 70.0, 70.0]  # quiz and the Average row
    assert heights["nll_per_token (lower is better)"] == [4.0, 5.4326]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["small", "large"]


# --- errors --------------------------------------------------------------------------------------------------------


def test_unknown_task_is_a_clear_error(tiny, capsys):
    assert cli_main(["eval", str(tiny["hf"]), "--tasks", "hellaswagg"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s): 'hellaswagg'" in err and "closest: hellaswag" in err
    with pytest.raises(EvalError, match="no suite 'regmx'.*Did you mean regmix"):
        load_suite("regmx")


def test_not_a_hf_model_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["eval", str(tmp_path / "empty"), "--suite", "demo"]) == 2
    assert "not a Hugging Face model folder (no config.json)" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(EvalError, match="is a mixlm training run.*mixlm export"):
        check_model_dir(run)
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="no model_type"):
        check_model_dir(tmp_path / "weird")
    with pytest.raises(EvalError, match="no such folder"):
        check_model_dir(tmp_path / "missing")


def test_hub_suite_offline_is_one_line_naming_the_dataset(tiny, capsys, monkeypatch):
    """A hub task (arc_easy) with HF_*_OFFLINE set: exit 2 and one stderr line naming the dataset and the ways
    to make it available, not lm-eval's traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tiny["root"] / "empty-datasets-cache"))
    assert cli_main(["eval", str(tiny["hf"]), "--tasks", "arc_easy", "--limit", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mixlm eval:")]
    assert len(err) == 1, err
    assert "arc_easy (allenai/ai2_arc/ARC-Easy)" in err[0]
    assert "HF_DATASETS_CACHE" in err[0] and "--include-path" in err[0]
