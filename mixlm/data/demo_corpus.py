"""A small synthetic corpus of four domains with clearly different statistics, for the demo and tests.

    arithmetic   "37 + 48 = 85" lines: digits and operators, exactly predictable answers
    records      pipe-separated key: value records from fixed vocabularies of names, cities, numbers
    prose        templated English sentences: a medium-entropy word-level language
    code         Python-like functions: indentation, identifiers, brackets

Training on more of a domain measurably lowers its validation loss and barely moves the others, which
is what a mixture experiment needs to show.

Two eval-only target domains (TARGET_GENERATORS, for `eval.domains`) are fresh documents of those kinds
in unequal parts, never trained on: `office` (records 1/2, sums 3/10, prose 1/5 of the documents) and
`homework` (sums 1/2, prose 1/2). Deterministic for a seed; ~2,000 documents per domain take
well under a second. `python -m mixlm.data.demo_corpus OUT_DIR` writes OUT_DIR/<domain>.jsonl.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
SURNAMES = ["Moreau", "Silva", "Wang", "Novak", "Okafor", "Haddad", "Petrov", "Sato", "Kim", "Berg", "Rossi"]
CITIES = ["Lyon", "Porto", "Osaka", "Quito", "Lagos", "Oslo", "Cusco", "Perth", "Izmir", "Turin", "Accra"]
ADJECTIVES = [
    "quiet",
    "bright",
    "old",
    "narrow",
    "golden",
    "restless",
    "patient",
    "distant",
    "small",
    "heavy",
]
NOUNS = ["river", "teacher", "garden", "engine", "village", "letter", "mountain", "market", "lantern", "ship"]
VERBS = [
    "follows",
    "remembers",
    "crosses",
    "watches",
    "carries",
    "finds",
    "builds",
    "leaves",
    "paints",
    "keeps",
]
PLACES = ["harbour", "old bridge", "library", "station", "forest", "square", "mill", "lighthouse"]
IDENTS = [
    "total",
    "count",
    "value",
    "item",
    "index",
    "result",
    "buffer",
    "node",
    "left",
    "right",
    "key",
    "acc",
]


def _equation(rng: np.random.Generator) -> str:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    op = ["+", "-", "*"][int(rng.integers(0, 3))]
    return f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}"


def _record(rng: np.random.Generator) -> str:
    return (
        f"id: {int(rng.integers(1000, 9999))} | name: {rng.choice(NAMES)} {rng.choice(SURNAMES)} | "
        f"city: {rng.choice(CITIES)} | age: {int(rng.integers(18, 90))} | score: {rng.integers(0, 1000) / 10:.1f}"
    )


def _sentence(rng: np.random.Generator) -> str:
    subject = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    obj = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    tail = f" near the {rng.choice(PLACES)}" if rng.random() < 0.5 else ""
    return f"The {subject} {rng.choice(VERBS)} the {obj}{tail}."


def _arithmetic(rng: np.random.Generator) -> str:
    return "\n".join(_equation(rng) for _ in range(int(rng.integers(4, 16))))


def _records(rng: np.random.Generator) -> str:
    return "\n".join(_record(rng) for _ in range(int(rng.integers(3, 10))))


def _prose(rng: np.random.Generator) -> str:
    return " ".join(_sentence(rng) for _ in range(int(rng.integers(3, 9))))


def _office(rng: np.random.Generator) -> str:
    """The eval-only target: an office's documents, each a records sheet (1/2), a page of sums (3/10)
    or prose (1/5), never code — a distribution the training domains make up in unequal parts."""
    u = rng.random()
    return _records(rng) if u < 0.5 else _arithmetic(rng) if u < 0.8 else _prose(rng)


def _homework(rng: np.random.Generator) -> str:
    """The second eval-only target: a page of sums (1/2) or prose (1/2); no records, no code."""
    return _arithmetic(rng) if rng.random() < 0.5 else _prose(rng)


def _code(rng: np.random.Generator) -> str:
    funcs = []
    for _ in range(int(rng.integers(1, 4))):
        a, b, c = (str(x) for x in rng.choice(IDENTS, size=3, replace=False))
        body = [
            f"def {rng.choice(['compute', 'update', 'merge', 'scan'])}_{a}({a}, {b}):",
            f"    {c} = {a} {rng.choice(['+', '-', '*'])} {b}",
        ]
        if rng.random() < 0.5:
            body += [f"    for i in range({int(rng.integers(2, 10))}):", f"        {c} = {c} + i * {b}"]
        if rng.random() < 0.5:
            body += [f"    if {c} > {int(rng.integers(0, 50))}:", f"        return {c}"]
        body.append(f"    return {c} - {a}")
        funcs.append("\n".join(body))
    return "\n\n".join(funcs)


GENERATORS: dict[str, Callable[[np.random.Generator], str]] = {
    "arithmetic": _arithmetic,
    "records": _records,
    "prose": _prose,
    "code": _code,
}
# Domains to evaluate on, never to train on: the target of a mixture search (`eval.domains`).
TARGET_GENERATORS: dict[str, Callable[[np.random.Generator], str]] = {"office": _office, "homework": _homework}


def generate_demo_corpus(
    out_dir: str | Path,
    *,
    docs_per_domain: int = 2000,
    seed: int = 0,
    domains: tuple[str, ...] = tuple(GENERATORS),
    target_domains: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Writes `<out_dir>/<domain>.jsonl` ({"text": ...} per line) for each domain of `domains`
    (GENERATORS) and `target_domains` (TARGET_GENERATORS); returns domain -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [d for d in domains if d not in GENERATORS] + [d for d in target_domains if d not in TARGET_GENERATORS]
    if unknown:
        raise ValueError(f"unknown demo domains {unknown}; training: {list(GENERATORS)}, target: {list(TARGET_GENERATORS)}")
    jobs = [(name, GENERATORS[name], [seed, i]) for i, name in enumerate(domains)]
    jobs += [(name, TARGET_GENERATORS[name], [seed, 100 + j]) for j, name in enumerate(target_domains)]
    paths = {}
    for name, generate, rng_seed in jobs:
        rng = np.random.default_rng(rng_seed)
        path = out / f"{name}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": generate(rng)}) + "\n" for _ in range(docs_per_domain))
        paths[name] = path
    return paths


def prepare_demo_data(
    out_dir: str | Path,
    *,
    docs_per_domain: int = 2000,
    vocab_size: int = 1024,
    seed: int = 0,
    workers: int = 1,
    progress: bool = False,
    target_domains: tuple[str, ...] = (),
) -> dict[str, Path]:
    """The demo's data steps in one call: corpus -> tokenizer -> prepared domains under `out_dir`.
    target_domains (e.g. ('office',)) are prepared too, with the tokenizer trained on the training
    domains only, for `eval.domains`. Returns {'raw': folder of jsonl, 'tokenizer': HF tokenizer
    folder, 'prepared': data.prepared_dir}."""
    from mixlm.data.prepare import PrepareOptions, prepare_domains
    from mixlm.data.tokenizer import train_tokenizer

    out = Path(out_dir)
    raw = generate_demo_corpus(
        out / "raw", docs_per_domain=docs_per_domain, seed=seed, target_domains=target_domains
    )
    sources = {name: str(path) for name, path in raw.items()}
    training = {name: path for name, path in sources.items() if name not in target_domains}
    tokenizer = train_tokenizer(training, out / "tokenizer", vocab_size=vocab_size)
    prepare_domains(
        sources,
        out / "prepared",
        PrepareOptions(
            tokenizer=str(tokenizer), seed=seed, validation_fraction=0.05, workers=workers, progress=progress
        ),
    )
    return {"raw": out / "raw", "tokenizer": tokenizer, "prepared": out / "prepared"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixlm.data.demo_corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir")
    parser.add_argument("--docs-per-domain", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in generate_demo_corpus(
        args.out_dir, docs_per_domain=args.docs_per_domain, seed=args.seed
    ).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
