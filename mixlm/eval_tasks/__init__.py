"""The offline lm-eval task set that mixlm generates itself, over the demo corpus's four domains.

    folder = write_demo_tasks("/tmp/tasks")          # jsonl data + one lm-eval task YAML per task
    TaskManager(include_path=str(folder), include_defaults=False)   # then simple_evaluate(...) offline

| task | output type | what the model must know | chance |
|---|---|---|---|
| mixlm_demo_arithmetic | multiple_choice | `37 + 48 =` → 85 among near misses | 0.25 |
| mixlm_demo_records | multiple_choice | the type of a record field (`city:` → a city, not a name or a number) | 0.25 |
| mixlm_demo_prose | multiple_choice | `The quiet river follows the old` → a noun, not a verb, adjective or name | 0.25 |
| mixlm_demo_code | multiple_choice | `return result -` → the function's first argument | 0.25 |
| mixlm_demo_arithmetic_gen | generate_until | greedy `37 + 48 =` → `85` (exact match) | 0 |
| mixlm_demo_ppl | loglikelihood_rolling | bits per byte on held-out documents of all four domains | - |

Questions are drawn with their own seed from the vocabularies of mixlm.data.demo_corpus, so they are
deterministic and independent of the training corpus's draws. lm-eval runs offline only from local files
given by ABSOLUTE paths, so the YAMLs are written from the templates next to this file, with the folder
filled in. Every task carries the tag `mixlm_demo`, so `--tasks mixlm_demo` runs all of them.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mixlm.data import demo_corpus as dc

VERSION = 1  # bump when the questions change: it goes into every task's metadata and the results JSON
TAG = "mixlm_demo"
TEMPLATES = Path(__file__).resolve().parent
CHANCE = {
    "mixlm_demo_arithmetic": 0.25,
    "mixlm_demo_records": 0.25,
    "mixlm_demo_prose": 0.25,
    "mixlm_demo_code": 0.25,
    "mixlm_demo_arithmetic_gen": 0.0,
}


def _distinct(rng: np.random.Generator, pool: list[str], k: int, exclude: set[str]) -> list[str]:
    options = [p for p in dict.fromkeys(pool) if p not in exclude]
    return [str(x) for x in rng.choice(options, size=k, replace=False)]


def _mc(question: str, answer: str, distractors: list[str], rng: np.random.Generator) -> dict:
    choices = [answer, *distractors]
    order = rng.permutation(len(choices))
    return {"question": question, "choices": [choices[i] for i in order], "label": int(np.argmax(order == 0))}


def _arithmetic_mc(rng: np.random.Generator) -> dict:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    op = ["+", "-", "*"][int(rng.integers(0, 3))]
    c = a + b if op == "+" else a - b if op == "-" else a * b
    near = [c + d for d in (-11, -10, -2, -1, 1, 2, 10, 11)]
    return _mc(f"{a} {op} {b} =", str(c), _distinct(rng, [str(x) for x in near], 3, {str(c)}), rng)


def _record_prefix(rng: np.random.Generator) -> str:
    return f"id: {int(rng.integers(1000, 9999))} | name: {rng.choice(dc.NAMES)} {rng.choice(dc.SURNAMES)}"


def _records_mc(rng: np.random.Generator) -> dict:
    name, surname, city = str(rng.choice(dc.NAMES)), str(rng.choice(dc.SURNAMES)), str(rng.choice(dc.CITIES))
    age = str(int(rng.integers(18, 90)))
    field = ["name", "city", "age"][int(rng.integers(0, 3))]
    if field == "name":  # the first name comes right after "name:"; a city, a number or a surname does not
        question = f"id: {int(rng.integers(1000, 9999))} | name:"
        answer, wrong = name, [city, age, surname]
    elif field == "city":
        question = _record_prefix(rng) + " | city:"
        answer, wrong = city, [name, age, surname]
    else:
        question = _record_prefix(rng) + f" | city: {city} | age:"
        answer, wrong = age, [name, str(rng.choice(dc.CITIES)), surname]
    return _mc(question, answer, wrong, rng)


def _prose_mc(rng: np.random.Generator) -> dict:
    question = (f"The {rng.choice(dc.ADJECTIVES)} {rng.choice(dc.NOUNS)} {rng.choice(dc.VERBS)} "
                f"the {rng.choice(dc.ADJECTIVES)}")
    wrong = [str(rng.choice(dc.VERBS)), str(rng.choice(dc.ADJECTIVES)), str(rng.choice(dc.NAMES))]
    return _mc(question, str(rng.choice(dc.NOUNS)), wrong, rng)


def _code_mc(rng: np.random.Generator) -> dict:
    a, b, c, other = (str(x) for x in rng.choice(dc.IDENTS, size=4, replace=False))
    fn = rng.choice(["compute", "update", "merge", "scan"])
    question = f"def {fn}_{a}({a}, {b}):\n    {c} = {a} {rng.choice(['+', '-', '*'])} {b}\n    return {c} -"
    return _mc(question, a, [b, c, other], rng)


def _arithmetic_gen(rng: np.random.Generator) -> dict:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return {"question": f"{a} + {b} =", "answer": str(a + b)}


# task -> (template, question maker, few-shot delimiter as written in YAML double quotes)
TASKS: dict[str, tuple[str, Callable[[np.random.Generator], dict] | None, str]] = {
    "mixlm_demo_arithmetic": ("multiple_choice", _arithmetic_mc, "\\n"),
    "mixlm_demo_records": ("multiple_choice", _records_mc, "\\n"),
    "mixlm_demo_prose": ("multiple_choice", _prose_mc, " "),
    "mixlm_demo_code": ("multiple_choice", _code_mc, "\\n\\n"),
    "mixlm_demo_arithmetic_gen": ("generate_until", _arithmetic_gen, "\\n"),
    "mixlm_demo_ppl": ("loglikelihood_rolling", None, ""),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_demo_tasks(out_dir: str | Path, *, num_test: int = 200, num_train: int = 16, seed: int = 1234,
                     ppl_docs_per_domain: int = 25) -> Path:
    """Writes `<out_dir>/<task>.{train,test}.jsonl` and `<out_dir>/<task>.yaml` for every task in TASKS
    (few-shot examples come from the train split); returns the folder, absolute, for `--include-path`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for i, (task, (template, make, delimiter)) in enumerate(TASKS.items()):
        rng = np.random.default_rng([seed, i])
        if make is None:  # held-out documents of every domain, drawn with this task's own seed
            rows = [{"text": gen(rng), "domain": name} for name, gen in dc.GENERATORS.items()
                    for _ in range(ppl_docs_per_domain)]
            _write_jsonl(out / f"{task}.test.jsonl", rows)
        else:
            _write_jsonl(out / f"{task}.train.jsonl", [make(rng) for _ in range(num_train)])
            _write_jsonl(out / f"{task}.test.jsonl", [make(rng) for _ in range(num_test)])
        text = string.Template((TEMPLATES / f"{template}.yaml.tmpl").read_text()).substitute(
            task=task, data_dir=out.as_posix(), fewshot_delimiter=delimiter, version=VERSION, seed=seed
        )
        (out / f"{task}.yaml").write_text(text)
    return out


__all__ = ["CHANCE", "TAG", "TASKS", "VERSION", "write_demo_tasks"]
