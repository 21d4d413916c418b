"""The study's data: a prepared folder (keyed by its manifests' bytes) or the demo corpus (made by the study), and
the selection knobs: each domain variant `<domain>_top<percent>` (its documents scored by a rater weighting, the
top fraction kept: `mixlm select pick`, then `mixlm prepare`) prepared once in a stage of its own, keyed by its
signals, weighting and fraction, so any study with the same knob reuses it.

With knobs the search mixes the whole domains and their variants: a mixture that puts weight on `prose_top25`
beside `prose` draws the best quarter of prose more often than the rest, so the weights of a domain's variants
are a soft quality threshold chosen with the mixture (Meta-rater x RegMix). The variants overlap the whole
domain, so a document may be drawn through either: the repetition bound counts each variant's own tokens.
The `prepared` stage links the data's domains and the variants into one folder the proxies read.

Every stage here outputs {prepared_dir, domains (mixed), targets, tokens: {domain: train tokens}, manifests:
{domain: manifest_fingerprint}, tokenizer} as the stages after it need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mixlm import storage
from mixlm.errors import ConfigError
from mixlm.study.graph import Stage, StageWork, content_hash
from mixlm.study.pipeline import Study
from mixlm.study.verbs import run_verb

MANIFEST = "manifest.json"


def manifest_fingerprint(text: str) -> str:
    """A prepared domain's identity: the sha256 of its manifest.json without the paths it names (the tokenizer
    folder, the input files, the plan id made from them): its counts, shards' and inputs' sha256, tokenizer
    fingerprint and options. The same corpus prepared in another folder has the same fingerprint."""
    manifest = json.loads(text)
    manifest.get("tokenizer", {}).pop("name", None)
    for key in ("tokenizer", "plan"):
        manifest.get("options", {}).pop(key, None)
    for source in manifest.get("sources", []):
        source.pop("path", None)
    return content_hash(manifest)


def manifest_digests(prepared_dir) -> dict[str, str]:
    """{domain: manifest_fingerprint} for every prepared domain under `prepared_dir` ({} when none)."""
    root = storage.location(prepared_dir)
    if not root.exists():
        return {}
    out = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        manifest = folder / MANIFEST
        if manifest.exists():
            out[folder.name] = manifest_fingerprint(manifest.read_text())
    return out


def describe_prepared(prepared_dir, domains: list[str], targets: list[str]) -> dict:
    """The outputs of a data stage over `prepared_dir`: its domains' train tokens and manifest digests, the
    tokenizer, and the mixed domains (`domains`, or every prepared one not in `targets`)."""
    from mixlm.data.prepared import DomainManifest

    digests = manifest_digests(prepared_dir)
    if not digests:
        raise ConfigError(f"data.prepared_dir={prepared_dir}: no prepared domain (<domain>/manifest.json) there; run "
                          "`mixlm prepare` first")
    missing = [d for d in [*domains, *targets] if d not in digests]
    if missing:
        raise ConfigError(f"data: {missing} are not prepared in {prepared_dir}; prepared: {sorted(digests)}")
    tokens, tokenizer = {}, None
    for name in digests:
        manifest = DomainManifest.load(storage.location(prepared_dir) / name / MANIFEST)
        tokens[name] = int(manifest.splits["train"].tokens)
        tokenizer = tokenizer or manifest.tokenizer.get("name")
    mixed = list(domains) or [d for d in digests if d not in targets]
    return {"prepared_dir": os.fspath(prepared_dir), "domains": mixed, "natural_domains": mixed,
            "targets": list(targets), "tokens": tokens, "manifests": digests, "tokenizer": tokenizer}


def _demo_work(study: Study):
    demo = study.spec.data.demo

    def work(task: StageWork) -> dict:
        from mixlm.data.demo_corpus import prepare_demo_data

        made = prepare_demo_data(task.folder / "data", docs_per_domain=demo.docs_per_domain,
                                 vocab_size=demo.vocab_size, seed=demo.seed, target_domains=tuple(demo.targets))
        task.log(f"study: demo corpus prepared in {made['prepared']}")
        out = describe_prepared(made["prepared"], study.spec.data.domains, study.spec.data.target)
        return {**out, "raw": os.fspath(made["raw"])}

    return work


def _prepared_work(study: Study):
    def work(task: StageWork) -> dict:
        return describe_prepared(study.spec.data.prepared_dir, study.spec.data.domains, study.spec.data.target)

    return work


def data_stages(study: Study) -> Stage:
    """The data stage (and the selection stages): returns the stage whose outputs describe the study's data."""
    spec = study.spec
    if spec.data.demo is not None:
        settings = {"demo": vars(spec.data.demo), "domains": spec.data.domains, "target": spec.data.target}
        data = Stage("data", "data", settings)
        study.stage(data, _demo_work(study))
    else:
        settings = {"manifests": manifest_digests(spec.data.prepared_dir), "domains": spec.data.domains,
                    "target": spec.data.target}
        data = Stage("data", "data", settings)
        study.stage(data, _prepared_work(study))
    if spec.selection is None or not spec.selection.domains:
        return data
    return _selection_stages(study, data)


def variant_name(domain: str, keep: float) -> str:
    """`prose_top25` for the top 25% of prose."""
    percent = f"{keep * 100:.4g}".replace(".", "p")
    return f"{domain}_top{percent}"


def _folder_fingerprint(path: str) -> str:
    """A cheap identity of a folder of files a user made (names, sizes, modification times), or of a file."""
    root = Path(path)
    if root.is_file():
        stat = root.stat()
        return content_hash([root.name, stat.st_size, stat.st_mtime_ns])
    if not root.is_dir():
        raise ConfigError(f"selection: {path}: no such file or folder")
    entries = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
               for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return content_hash(entries)


def _engine_flags(study: Study) -> list[str]:
    engine = study.spec.engine
    flags = ["--engine", engine.kind, "--workers", str(engine.workers)]
    return flags + (["--ray-address", engine.ray_address] if engine.ray_address else [])


def _selection_stages(study: Study, data: Stage) -> Stage:
    spec = study.spec
    variants: list[Stage] = []
    for domain, knob in spec.selection.domains.items():
        if knob.signals:
            signals_stage, signals_id = None, _folder_fingerprint(knob.signals)
        else:
            documents = list(knob.documents)
            signals_stage = Stage(f"score-{domain}", "score", {
                "documents": [_folder_fingerprint(d) for d in documents] or ["demo", domain]}, deps=(data,))
            signals_id = signals_stage.key
            study.stage(signals_stage, _score_work(study, domain, documents))
        for keep in knob.keep:
            name = variant_name(domain, keep)
            deps = (data,) if signals_stage is None else (data, signals_stage)
            stage = Stage(f"select-{name}", "select", {"signals": signals_id, "weights": knob.weights, "keep": keep,
                                                        "domain": domain}, deps=deps)
            study.stage(stage, _select_work(study, domain, name, keep, knob, signals_stage))
            variants.append(stage)
    prepared = Stage("prepared", "prepared", {"variants": [v.name for v in variants]}, deps=(data, *variants))
    study.stage(prepared, _link_work(study, data, variants))
    return prepared


def _score_work(study: Study, domain: str, documents: list[str]):
    def work(task: StageWork) -> dict:
        inputs = documents or [os.path.join(study.outputs("data")["raw"], f"{domain}.jsonl")]
        run_verb(task, ["select", "signals", *inputs, "--out", task.folder / "signals", *_engine_flags(study),
                        "--no-progress"])
        return {"signals": os.fspath(task.folder / "signals")}

    return work


def _select_work(study: Study, domain: str, name: str, keep: float, knob, signals_stage: Stage | None):
    def work(task: StageWork) -> dict:
        from mixlm.data.prepared import DomainManifest

        data = study.outputs("data")
        signals = knob.signals if signals_stage is None else study.outputs(signals_stage.name)["signals"]
        manifest = DomainManifest.load(storage.location(data["prepared_dir"]) / domain / MANIFEST)
        selection = task.folder / "selection"
        run_verb(task, ["select", "pick", "--signals", signals, "--weights", yaml.safe_dump(knob.weights,
                        default_flow_style=True).strip(), "--top-fraction", repr(keep), "--out", selection,
                        *_engine_flags(study)])
        options = manifest.options
        prepare = ["prepare", "--out", task.folder / "prepared", "--tokenizer", manifest.tokenizer["name"],
                   "--domain", f"{name}={selection / 'documents.jsonl.zst'}", "--seed", str(manifest.seed),
                   "--text-field", str(options.get("text_field", "text")), *_engine_flags(study), "--no-progress"]
        prepare += ["--bos"] if options.get("prepend_bos") else []
        prepare += ["--no-eos"] if options.get("append_eos") is False else []
        run_verb(task, prepare)
        return {"variant": name, "prepared": os.fspath(task.folder / "prepared" / name)}

    return work


def _link_work(study: Study, data: Stage, variants: list[Stage]):
    def work(task: StageWork) -> dict:
        source = study.outputs("data")
        folder = Path(os.fspath(task.folder)) / "prepared"
        folder.mkdir(parents=True, exist_ok=True)
        links = {d: Path(source["prepared_dir"]).resolve() / d for d in source["manifests"]}
        links.update({study.outputs(v.name)["variant"]: Path(study.outputs(v.name)["prepared"]).resolve()
                      for v in variants})
        for name, target in links.items():
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
        out = describe_prepared(folder, [], source["targets"])
        added = [study.outputs(v.name)["variant"] for v in variants]
        return {**out, "domains": [*source["domains"], *added], "natural_domains": source["domains"],
                "variants": {study.outputs(v.name)["variant"]: v.settings["domain"] for v in variants}}

    return work
