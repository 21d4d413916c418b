"""Online mixing against offline mixtures, head to head on CPU: natural, uniform and RegMix-optimised mixtures
against DoReMi, ADO, ODM and Aioli, at one token budget, on the demo corpus and on a corpus of real text shipped
with Debian and the project's Python packages; every domain's and target's validation loss (mean of the seeds
± 2 standard errors) and the compute each method spent, proxies and reference runs included.

    nice -n 10 .venv/bin/python benchmarks/online_vs_offline.py            # both corpora, 4 seeds (~40 min)
    .venv/bin/python benchmarks/online_vs_offline.py --quick               # a smoke run: 40 steps, 1 seed

Every run is the demo sweep's proxy (benchmarks/demo_sweep.py: llama 2 layers, d 64, seq 64, batch 16, first-fit
packing, AdamW 3e-3 cosine) for --steps steps (450: the budget `demo_sweep_budget.md`'s RegMix sweep optimised
for), seed s setting init and data order alike for every method. Methods:

  natural, uniform     the token shares; equal weights
  regmix:<target>      demo: the mixtures `demo_sweep_budget.md` optimised from 64 proxies at this budget; text:
                       a sweep of --regmix-proxies proxies run here, fitted and optimised the same way
  doremi               a reference run (uniform), a DoReMi proxy against it (objective weights, eta 1, c 1e-3,
                       every step), then a run on the proxy's averaged weights: all three per seed
  ado, odm, aioli      one online run each (ADO from the natural mixture, ODM and Aioli from uniform)

Compute: tokens trained, plus forward-only tokens (DoReMi's reference losses, Aioli's probe evaluations) at a
third of a trained token, and wall seconds. Work goes to runs/online_vs_offline/ (git-ignored); a finished run is
read back (benchmark.json), not retrained. The report: benchmarks/results/online_vs_offline.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import re
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_sweep import TARGET_DOMAINS as DEMO_TARGETS
from demo_sweep import prepare as prepare_demo
from demo_sweep import proxy_config

ROWS, SEQ = 16, 64  # the proxy's batch: tokens per step = ROWS * SEQ
FORWARD_COST = 1 / 3  # a forward-only token against a trained one (forward + backward)
# benchmarks/results/demo_sweep_budget.md: 64 proxies of 450 steps, 780 s of proxy training in all.
DEMO_SWEEP = {"report": ROOT / "benchmarks" / "results" / "demo_sweep_budget.md", "proxies": 64, "seconds": 780.0,
              "steps": 450}


# ---- the real-text corpus ------------------------------------------------------------------------------------
def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _chunks(text: str, size: int = 1500) -> list[str]:
    """Documents of up to ~`size` characters, cut at blank lines (a longer paragraph is its own document, cut at
    3,000 characters by the caller)."""
    out, current = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if current and len(current) + len(paragraph) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return out + ([current] if current else [])


def text_sources() -> dict[str, list[Path]]:
    """The files of each domain, sorted: four training domains and two eval-only targets."""
    site = Path(sysconfig.get_paths()["purelib"])
    code = sorted(p for pkg in ("numpy", "scipy", "jax", "flax", "optax", "grain", "orbax")
                  for p in (site / pkg).rglob("*.py"))
    licenses = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(
        p for p in site.glob("*.dist-info/**/*") if p.is_file() and "LICEN" in p.name.upper())
    return {
        "code": code,  # Python source of the numerical stack
        "licenses": [p for p in licenses if p.is_file()],  # license texts
        "manpages": sorted(Path("/usr/share/man/man1").glob("*.gz")),  # groff sources of Debian's man pages
        "changelogs": sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")),  # Debian package changelogs
        "manuals": sorted(Path("/usr/share/info").glob("*.info*.gz")),  # target: GNU info manuals (prose)
        "readmes": sorted(p for p in site.rglob("*") if p.suffix in (".md", ".rst") and p.is_file()),  # target
    }


def text_documents(docs_per_domain: int, files_per_domain: int = 400) -> dict[str, list[str]]:
    """Up to `docs_per_domain` documents per domain, spread over up to `files_per_domain` files of it."""
    out = {}
    for domain, files in text_sources().items():
        if not files:
            raise SystemExit(f"text corpus: no files for domain {domain!r} on this host")
        picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(files_per_domain, len(files)))]
        docs = [d[:3000] for path in dict.fromkeys(picked) for d in _chunks(_read(path)) if len(d) >= 64]
        keep = np.linspace(0, len(docs) - 1, min(docs_per_domain, len(docs))).astype(int)
        out[domain] = [docs[i] for i in dict.fromkeys(keep.tolist())]
    return out


TEXT_TARGETS = ("manuals", "readmes")


def prepare_text(out: Path, docs_per_domain: int = 2000) -> dict:
    from mixlm.data.prepare import PrepareOptions, prepare_domains
    from mixlm.data.tokenizer import train_tokenizer

    data = out / "data"
    if (data / "tokenizer").is_dir() and len(list((data / "prepared").glob("*/manifest.json"))) == 6:
        return {"tokenizer": data / "tokenizer", "prepared": data / "prepared"}
    raw = data / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    sources = {}
    for domain, docs in text_documents(docs_per_domain).items():
        sources[domain] = str(raw / f"{domain}.jsonl")
        Path(sources[domain]).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    training = {d: p for d, p in sources.items() if d not in TEXT_TARGETS}
    tokenizer = train_tokenizer(training, data / "tokenizer", vocab_size=1024)
    prepare_domains(sources, data / "prepared", PrepareOptions(tokenizer=str(tokenizer), seed=0,
                                                               validation_fraction=0.05, progress=False))
    return {"tokenizer": tokenizer, "prepared": data / "prepared"}


# ---- runs ----------------------------------------------------------------------------------------------------
def run_once(base: Path, run_dir: Path, mixture: dict[str, float], overrides: list[str]) -> dict:
    """{'losses', 'seconds', 'train_tokens', 'forward_tokens', 'average'} of one training run (read back when
    it finished before). forward_tokens: DoReMi's reference forward and Aioli's probe evaluations."""
    from mixlm.config import load_config
    from mixlm.hooks import default_hooks
    from mixlm.train import train

    done = run_dir / "benchmark.json"  # the trainer writes its own result.json beside it
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "mixture.yaml").write_text(yaml.safe_dump(mixture, sort_keys=False))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cfg = load_config(str(base), [*overrides, f"data.mixture={run_dir / 'mixture.yaml'}", f"train.output_dir={run_dir}"])
    hooks = default_hooks(cfg)
    online = [h for h in hooks if getattr(h, "state_key", "") == "online_mixing"]
    started = time.perf_counter()
    result = train(cfg, hooks=hooks, log_fn=lambda _: None)
    seconds = time.perf_counter() - started
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    forward = 0
    if online and online[0].strategy.needs_reference:
        forward += tokens
    if online and online[0].strategy.kind == "aioli":  # one validation of every training domain per update
        forward += len(online[0].history) * cfg.eval.batches * ROWS * SEQ * len(mixture)
    out = {"losses": {k: v for k, v in result.eval.items() if k.startswith("val_loss")}, "seconds": seconds,
           "train_tokens": tokens, "forward_tokens": forward,
           "average": online[0].average_weights(cfg.train.steps) if online else mixture}
    done.write_text(json.dumps(out))
    return out


def combine(*parts: dict) -> dict:
    """One method's cost over several runs, with the last run's losses."""
    return {"losses": parts[-1]["losses"], "average": parts[-1]["average"],
            **{k: sum(p[k] for p in parts) for k in ("seconds", "train_tokens", "forward_tokens")}}


def regmix_from_report(path: Path) -> dict[str, dict[str, float]]:
    """The optimised mixtures (opt_<target>) of a demo_sweep report's mixtures table."""
    lines = path.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| mixture |"))
    domains = [c.strip() for c in lines[head].strip("|").split("|")[1:] if not c.strip().startswith("predicted")]
    out = {}
    for line in lines[head + 2:]:
        if not line.startswith("| opt_"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0][4:]] = {d: float(w) for d, w in zip(domains, cells[1:1 + len(domains)])}
    return out


def regmix_sweep(out: Path, base: Path, prepared: Path, domains: list[str], targets: dict[str, list[str]],
                 proxies: int, steps: int) -> tuple[dict[str, dict[str, float]], dict]:
    """RegMix on this corpus: `proxies` proxies on sampled mixtures, a fit per target, optimise; (mixtures, the
    sweep's cost)."""
    from mixlm.mixing import fit, load_prior, loss_column, mixtures_table, optimize, read_csv, sample_mixtures
    from mixlm.sweep import plan_sweep, run_sweep

    prior = load_prior(prepared, domains=domains)
    strengths = {"min_strength": 1.0, "max_strength": 50.0}  # demo_sweep's range
    tokens = steps * ROWS * SEQ
    table = mixtures_table(sample_mixtures(prior, proxies, seed=0, token_budget=tokens, **strengths), domains)
    runs = plan_sweep(str(base), table, out / "sweep")
    started = time.perf_counter()
    run_sweep(runs, out / "sweep", domains, parallel=0)
    seconds = time.perf_counter() - started
    results = read_csv(out / "sweep" / "results.csv")
    mixtures = {}
    for target, columns in targets.items():
        result = fit(table, results, [loss_column(d) for d in columns], regressors=("lightgbm", "loglinear", "linear"),
                     folds=min(5, proxies // 2))
        mixtures[target] = optimize(result, prior, token_budget=tokens, **strengths)
    return mixtures, {"proxies": proxies, "seconds": seconds, "train_tokens": proxies * tokens}


# ---- one corpus ----------------------------------------------------------------------------------------------
def compare(name: str, out: Path, data: dict, targets: tuple[str, ...], args) -> dict:
    from mixlm.data.tokenizer import load_tokenizer_spec
    from mixlm.mixing import load_prior

    prepared = Path(data["prepared"]).resolve()
    vocab = load_tokenizer_spec(str(data["tokenizer"])).vocab_size
    domains = sorted(p.parent.name for p in prepared.glob("*/manifest.json") if p.parent.name not in targets)
    config = proxy_config(prepared, vocab, args.steps, args.eval_batches)
    config["eval"]["domains"] = list(targets)
    base = out / "proxy.yaml"
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    prior = load_prior(prepared, domains=domains)
    natural = {d: float(s) for d, s in zip(domains, prior.shares_D)}
    uniform = {d: 1.0 / len(domains) for d in domains}
    target_domains = {"mean": domains, **{t: [t] for t in targets}}
    if name == "demo":
        regmix = regmix_from_report(DEMO_SWEEP["report"])
        sweep_cost = {"proxies": DEMO_SWEEP["proxies"], "seconds": DEMO_SWEEP["seconds"],
                      "train_tokens": DEMO_SWEEP["proxies"] * DEMO_SWEEP["steps"] * ROWS * SEQ}
    else:
        regmix, sweep_cost = regmix_sweep(out, base, prepared, domains, target_domains, args.regmix_proxies, args.steps)
    online = {
        "ado": (natural, ["mixing.kind=ado", "mixing.every=10", f"mixing.warmup_steps={args.steps // 10}"]),
        "odm": (uniform, ["mixing.kind=odm"]),
        # 3 rounds; probes 2 sweeps x 4 steps per domain (the paper's 4 x 4 would spend 64 of each 150 steps)
        "aioli": (uniform, ["mixing.kind=aioli", f"mixing.every={args.steps // 3}",
                            "mixing.options={sweeps: 2, probe_steps: 4}" if args.steps >= 300 else
                            "mixing.options={sweeps: 1, probe_steps: 1}"]),
    }
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        seeded = [f"train.seed={seed}", f"data.seed={seed}"]
        for method, mixture in [("natural", natural), ("uniform", uniform),
                                *((f"regmix:{t}", m) for t, m in regmix.items())]:
            results.setdefault(method, []).append(run_once(base, out / f"{method.replace(':', '_')}_s{seed}",
                                                           mixture, seeded))
        reference = run_once(base, out / f"doremi_reference_s{seed}", uniform, [*seeded, "checkpoint.save_at_end=true"])
        proxy = run_once(base, out / f"doremi_proxy_s{seed}", uniform, [*seeded, "mixing.kind=doremi",
                         f"mixing.options={json.dumps({'reference': str(out / f'doremi_reference_s{seed}')})}"])
        final = run_once(base, out / f"doremi_s{seed}", proxy["average"], seeded)
        results.setdefault("doremi", []).append(combine(reference, proxy, final))
        for method, (mixture, overrides) in online.items():
            results.setdefault(method, []).append(run_once(base, out / f"{method}_s{seed}", mixture,
                                                           [*seeded, *overrides]))
        print(f"{name}: seed {seed} done", flush=True)
    for method, runs in results.items():  # RegMix's sweep is paid once for every target it optimised
        if method.startswith("regmix:"):
            for r in runs:
                r["sweep"] = sweep_cost
    return {"domains": domains, "targets": target_domains, "results": results, "natural": natural,
            "regmix": regmix, "sweep": sweep_cost}


# ---- the report ----------------------------------------------------------------------------------------------
def target_values(runs: list[dict], columns: list[str]) -> np.ndarray:
    return np.array([np.mean([r["losses"][f"val_loss/{d}"] for d in columns]) for r in runs])


def mean_2se(values: np.ndarray) -> str:
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{values.mean():.4f} ± {2 * se:.4f}"


def report_corpus(title: str, got: dict, args) -> list[str]:
    results, domains, targets = got["results"], got["domains"], got["targets"]
    evaluated = [*domains, *(t for t in targets if t != "mean")]
    lines = [f"## {title}", "", ("Validation loss (nats/token, lower is better): mean of the seeds ± 2 standard "
                                 "errors. `mean` is the unweighted mean of the training domains' losses."), "",
             "| method | " + " | ".join(evaluated) + " | mean | compute (M trained-token equiv.) | wall s |",
             "|---|" + "---|" * (len(evaluated) + 3)]
    for method, runs in results.items():
        cost = np.mean([r["train_tokens"] + FORWARD_COST * r["forward_tokens"] for r in runs])
        seconds = np.mean([r["seconds"] for r in runs])
        if "sweep" in runs[0]:
            cost += runs[0]["sweep"]["train_tokens"]
            seconds += runs[0]["sweep"]["seconds"]
        cells = [mean_2se(target_values(runs, [d])) for d in evaluated] + [mean_2se(target_values(runs, domains))]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {cost / 1e6:.2f} | {seconds:.0f} |")
    lines += ["", ("Paired by seed, target(method) − target(uniform) (negative: better than uniform) ± 2 standard "
                   "errors of the paired differences; **bold**: beyond 2 standard errors."), "",
              "| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for method, runs in results.items():
        cells = []
        for columns in targets.values():
            diff = target_values(runs, columns) - target_values(results["uniform"], columns)
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            text = f"{diff.mean():+.4f} ± {2 * se:.4f}"
            cells.append(f"**{text}**" if abs(diff.mean()) > 2 * se else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", ("Mixtures trained on (the online methods: their weights averaged over the steps, mean of the "
                   "seeds):"), "", "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for method, runs in results.items():
        weights = [np.mean([r["average"][d] for r in runs]) for d in domains]
        lines.append(f"| {method} | " + " | ".join(f"{w:.3f}" for w in weights) + " |")
    best = {t: min(results, key=lambda m: target_values(results[m], columns).mean()) for t, columns in targets.items()}
    lines += ["", "Lowest mean per target: " + ", ".join(f"{t}: {m}" for t, m in best.items()) + ".", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "online_vs_offline")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--regmix-proxies", type=int, default=24, help="the text corpus's RegMix sweep")
    parser.add_argument("--corpus", choices=("demo", "text", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 seed, 6 RegMix proxies: a smoke run")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "online_vs_offline.md")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.regmix_proxies = 40, 2, 6
        args.out, args.report = args.out.with_name(args.out.name + "_quick"), args.out.with_name("quick") / "report.md"
    command = ".venv/bin/python benchmarks/online_vs_offline.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before, started = os.getloadavg(), time.perf_counter()

    import jax

    jax.config.update("jax_compilation_cache_dir", str(args.out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    corpora = {}
    if args.corpus in ("demo", "both"):
        corpora["demo"] = compare("demo", args.out / "demo", prepare_demo(args.out / "demo"), DEMO_TARGETS, args)
    if args.corpus in ("text", "both"):
        corpora["text"] = compare("text", args.out / "text", prepare_text(args.out / "text"), TEXT_TARGETS, args)
    minutes, load_after = (time.perf_counter() - started) / 60, os.getloadavg()
    from machine import describe_machine  # the host line every results file carries

    lines = ["# Online mixing against offline mixtures (DoReMi, ADO, ODM, Aioli vs natural, uniform, RegMix)", "",
             (f"Machine: {describe_machine()}. Date: {datetime.date.today().isoformat()}. Command: `{command}` "
              f"(from the repo root). Wall time {minutes:.1f} min; load average (1/5/15 min) before "
              f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)} "
              "(a shared host: wall seconds are indicative only)."), "",
             (f"Every run: llama 2 layers, d 64, seq 64, batch 16, {args.steps} steps ({args.steps * ROWS * SEQ:,} "
              f"tokens), first-fit packing, {args.seeds} seeds (init and data order, the same for every method), "
              f"scored on {args.eval_batches} x 16 x 64 held-out tokens per domain. Compute counts every run a method "
              "needs (RegMix: its proxy sweep, once for all targets; DoReMi: reference + proxy + final run) in "
              "trained-token equivalents (forward-only tokens at 1/3)."), ""]
    if args.corpus != "text" and args.steps != DEMO_SWEEP["steps"]:
        lines += [(f"**Sized down:** {args.steps} steps, not the {DEMO_SWEEP['steps']} the demo's RegMix mixtures "
                   f"were optimised for (its sweep's proxies trained {DEMO_SWEEP['steps']} steps), so RegMix is "
                   f"scored off its budget; {args.seeds} seeds, not 4, so the standard errors are rough."), ""]
    elif args.seeds < 4:
        lines += [f"**Sized down:** {args.seeds} seeds, not 4, so the standard errors are rough.", ""]
    titles = {"demo": "Demo corpus (mixlm/data/demo_corpus.py; targets office and homework are eval-only)",
              "text": "Real text (Debian and Python packages on this host; targets manuals and readmes are eval-only)"}
    for name, got in corpora.items():
        lines += report_corpus(titles[name], got, args)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
