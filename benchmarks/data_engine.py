"""The data engines on this host: documents/s of `prepare`, rule signals, MinHash dedup and classifier scoring,
with the local engine (1 and 2 worker processes) and the Ray engine (a local 2-CPU cluster, 1 and 2 tasks at
once), on the same multi-file corpus. Every run writes a fresh output folder (nothing reused); wall-clock
rates, so the load of other jobs on the host lowers them (the load average is recorded). The Ray cluster's start
is timed once, apart. Also checks that every engine wrote the same bytes.

    python benchmarks/data_engine.py [--files 8] [--docs-per-file 500] [--rounds 3] [--out benchmarks/results/data_engine.md]

The corpus is synthetic pseudo-word prose (benchmarks/selection_throughput.py), tokenized with the gpt-neox
tokenizer (../shared/data/tokenizers/gpt-neox) when it is there, else with a 8k BPE trained here. Never
asserts a time.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe_machine  # benchmarks/machine.py
from selection_throughput import synthetic_documents

SETUPS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def _digest(folder: Path) -> str:
    """One hash of every output file's bytes (timings and host stats left out)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in (".array_record", ".npy", ".npz", ".parquet", ".zst") or p.name == "manifest.json"):
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=8, help="input files (4 domains)")
    parser.add_argument("--docs-per-file", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the 4 setups, alternating; each rate is the median over the rounds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_engine.md"))
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "gpt-neox"),
                        help="tokenizer folder for prepare (default: the shared gpt-neox one; missing: a BPE trained here)")
    args = parser.parse_args(argv)

    import ray

    from mixlm.data.prepare import PrepareOptions, prepare_domains
    from mixlm.data.tokenizer import train_tokenizer_from_texts
    from mixlm.engine import make_engine
    from mixlm.selection.classifier import train_classifier
    from mixlm.selection.corpus_dedup import dedup_corpus
    from mixlm.selection.dedup import MinHashSettings
    from mixlm.selection.signal_tables import TableSettings, compute_tables

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="data-engine-"))
    try:
        docs = synthetic_documents(args.files * args.docs_per_file, seed=0)
        files, domains = [], {}
        for k in range(args.files):
            domain = f"d{k % 4}"
            path = tmp / "raw" / domain / f"part-{k:03d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            part = docs[k * args.docs_per_file:(k + 1) * args.docs_per_file]
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
            files.append(str(path))
            domains.setdefault(domain, [str(path.parent)])
        if Path(args.tokenizer).is_dir():
            tokenizer, tok_note = args.tokenizer, f"tokenizer {Path(args.tokenizer).name}"
        else:
            tokenizer = str(train_tokenizer_from_texts(docs[:2000], tmp / "tok", vocab_size=8192))
            tok_note = "8k byte-level BPE trained on 2,000 of the documents"
        classifier = tmp / "clf"
        train_classifier(docs[:300], synthetic_documents(300, seed=9), classifier, backend="sklearn")

        def prepare(engine, out):
            m = prepare_domains(domains, out, PrepareOptions(tokenizer=tokenizer, progress=False,
                                                            shard_tokens=200_000, chunk_docs=250), engine)
            return sum(x.documents for x in m.values())

        def signals(engine, out):
            return compute_tables(files, out, TableSettings(), engine=engine)["documents"]

        def classify(engine, out):
            return compute_tables(files, out, TableSettings(rules=False, classifier=str(classifier)),
                                  engine=engine)["documents"]

        def minhash(engine, out):
            return dedup_corpus(files, out, "minhash", MinHashSettings(), engine).documents_in

        stages = (("prepare (tokenize + shard)", prepare), ("rule signals (37)", signals),
                  ("classifier score (sklearn)", classify), ("MinHash dedup (features + band shuffle)", minhash))
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                      os.environ.get("PYTHONPATH")]))}})
        ray_start = time.perf_counter() - t0
        runs: dict[tuple[str, str, int], list[float]] = {}
        digests: dict[str, set] = {}
        for name, fn in stages:
            for round_ in range(args.rounds):  # the setups alternate, so a change in the host's load hits all
                for kind, workers in SETUPS:
                    out = tmp / "out" / f"{name[:8]}-{kind}-{workers}"
                    shutil.rmtree(out, ignore_errors=True)
                    with make_engine(kind, workers=workers, progress=False) as engine:
                        fn(engine, tmp / "warm" / f"{kind}-{workers}")  # warm-up: worker start, imports, models
                        shutil.rmtree(tmp / "warm", ignore_errors=True)
                        start = time.perf_counter()
                        n = fn(engine, out)
                        runs.setdefault((name, kind, workers), []).append(n / (time.perf_counter() - start))
                    digests.setdefault(name, set()).add(_digest(out))
                    print(f"{name}: round {round_ + 1}: {kind} x{workers}: {runs[(name, kind, workers)][-1]:,.0f} "
                          "docs/s", flush=True)
        rates = {key: float(statistics.median(values)) for key, values in runs.items()}
        ray.shutdown()
        load_end = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "# Data engines on this host: local processes vs Ray",
        "",
        f"Machine: {describe_machine()}.",
        (f"Load average (1, 5, 15 min) at start: {load_start[0]:.2f}, {load_start[1]:.2f}, {load_start[2]:.2f}; at "
        f"end: {load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f} (the host is shared: other jobs' load "
        "lowers every rate, the 2-worker ones most)."),
        f"Command: `python benchmarks/data_engine.py {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        (f"Corpus: {args.files} jsonl files in 4 domains, {args.files * args.docs_per_file:,} synthetic prose "
        f"documents (~919 gpt-neox tokens each); prepare with the {tok_note}. Each rate is documents / wall "
        f"second of one run on a fresh output folder, after a warm-up run with the same engine (worker start, "
        f"imports and model loads excluded), the median of {args.rounds} rounds over the 4 setups in turn. Ray: a local cluster of 2 CPUs (ray.init took "
        f"{ray_start:.1f} s), `workers` = tasks in flight."),
        "",
        ("| stage | local x1 | local x2 | ray x1 | ray x2 | Ray time / local time, x1 | Ray time / local time, x2 "
         "| local x2 / x1 speed-up | same bytes on all 4 |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, _ in stages:
        r = {(k, w): rates[(name, k, w)] for k, w in SETUPS}
        lines.append(f"| {name} | {r['local', 1]:,.0f} | {r['local', 2]:,.0f} | {r['ray', 1]:,.0f} | "
                     f"{r['ray', 2]:,.0f} | {r['local', 1] / r['ray', 1]:.2f} | "
                     f"{r['local', 2] / r['ray', 2]:.2f} | {r['local', 2] / r['local', 1]:.2f}x | "
                     f"{'yes' if len(digests[name]) == 1 else 'NO: ' + ', '.join(sorted(digests[name]))} |")
    lines += ["", ("Ray time / local time: the local rate over the Ray rate at the same worker count (the target: "
              "<= 1.3 on one host). local x1 runs in the driver process; x2 in 2 worker processes; Ray xN keeps N "
              "tasks in flight on the 2-CPU cluster. Written by benchmarks/data_engine.py.")]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
