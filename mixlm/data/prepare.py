"""`mixlm prepare`: raw documents per domain -> tokenized, shuffled ArrayRecord shards + manifest.

Per domain, in two resumable phases under `<out>/<domain>/.work/`, each an engine map (mixlm.engine: this
host's processes, or Ray tasks on a cluster) over the work of every domain at once:

1. Tokenize into resumable chunks, a task per input file (mixlm.data.tokenize_chunks).
2. Shard: a seeded permutation of all documents; the first ones form the held-out validation split,
   the rest are cut into train shards of about `shard_tokens` tokens, a task per shard. Each shard is
   written to a temp file and renamed, then marked done; a rerun skips finished shards. The manifest is
   written last: its presence means the domain is complete, and a rerun with the same inputs and options
   does nothing.

The output is a pure function of (inputs, tokenizer, options): running it twice, with any number of
workers, on either engine, gives identical bytes.
One `mixlm prepare` at a time writes a domain folder: it holds the folder's lock (`RunFolderLock`, the
lock of run folders) from start to end, and a second one is refused naming the first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import MALFORMED_KINDS, InputUnit, counted, describe_unit, file_digest, resolve_input
from mixlm.data.prepare_options import PrepareOptions, plan_options
from mixlm.data.prepared import MANIFEST, DomainManifest, PreparedDomain, ShardInfo, SplitInfo
from mixlm.data.tokenize_chunks import ChunkStore, finished_chunks, save_npy, tokenize_units
from mixlm.data.tokenizer import TokenizerSpec, load_tokenizer_spec
from mixlm.engine import Engine, LocalEngine
from mixlm.errors import PrepareError, ShardError
from mixlm.folder_lock import writer_lock

ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access to any document
_WORK = ".work"
# This host's [size, mtime_ns, sha256] of the domain's input files and outputs, so that a rerun reads only the
# files that changed: not part of the prepared data (a copied folder just computes it again).
STATS_FILE = ".prepare-stats.json"


class PreparedFolderLockedError(PrepareError):
    """Another `mixlm prepare` is writing the domain folder (it holds the folder's lock)."""


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# ---- phase 2: shuffle, split, write shards ------------------------------------------------------
def _shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.array_record"


def _write_shard(path: Path, store: ChunkStore, doc_ids: np.ndarray) -> ShardInfo:
    from array_record.python.array_record_module import ArrayRecordWriter

    # a name of its own: a task of a killed driver still running on a cluster never writes into this one's file
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        writer = ArrayRecordWriter(str(tmp), ARRAY_RECORD_OPTIONS)
        for i in doc_ids.tolist():
            writer.write(store.doc(i).tobytes())
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    size, digest = file_digest(path)
    return ShardInfo(path.name, len(doc_ids), int(store.lengths[doc_ids].sum()), size, digest)


@functools.lru_cache(maxsize=4)
def _chunk_store(work: str, units: int, plan_key: str) -> ChunkStore:
    # Once per worker process and domain (the chunk files are memory-mapped), not once per shard.
    return ChunkStore(Path(work), [m for u in range(units) for m in finished_chunks(Path(work), u)])


def write_shard(item: tuple[str, str, int, str, str, np.ndarray]) -> dict:
    """An engine task: (domain folder, its work folder, its input units, plan key, shard file name, document
    ids) -> the shard's ShardInfo as a dict. A shard marked done by an earlier run, still of its recorded size,
    is kept, not rewritten."""
    dom_dir, work, units, plan_key, name, ids = item
    dom_dir, work = Path(dom_dir), Path(work)
    done = work / f"{name}.json"
    if done.is_file() and (dom_dir / name).is_file():
        info = json.loads(done.read_text())
        if (dom_dir / name).stat().st_size == info["bytes"]:  # finished by an interrupted run
            return info
    info = _write_shard(dom_dir / name, _chunk_store(str(work), units, plan_key), ids)
    storage.write_atomic(done, json.dumps(asdict(info)))
    return asdict(info)


def _split_documents(n: int, domain: str, options: PrepareOptions) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([options.seed, _stable_int(domain)]).permutation(n)
    if options.validation_docs > 0:
        n_val = options.validation_docs
    elif options.validation_fraction > 0 and n >= 2:
        n_val = max(1, round(options.validation_fraction * n))
    else:
        n_val = 0
    n_val = min(n_val, max(n - 1, 0))
    return order[n_val:], order[:n_val]


# ---- a domain, end to end -----------------------------------------------------------------------
def _read_stats(dom_dir: Path) -> dict:
    try:
        stats = storage.read_json(dom_dir / STATS_FILE)
    except (OSError, ValueError):
        return {"inputs": {}, "outputs": {}}
    ok = isinstance(stats, dict) and all(isinstance(stats.get(k), dict) for k in ("inputs", "outputs"))
    return stats if ok else {"inputs": {}, "outputs": {}}


def _output_files(manifest: DomainManifest) -> dict[str, str | None]:
    """{file name: sha256 or None} of the domain's shards and split indexes."""
    files: dict[str, str | None] = {}
    for split in manifest.splits.values():
        files.update({shard.file: shard.sha256 for shard in split.shards})
        files[split.index] = None
    return files


def _output_stats(dom_dir: Path, manifest: DomainManifest) -> dict:
    out = {}
    for name, digest in _output_files(manifest).items():
        st = (dom_dir / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns, digest]
    return out


def _outputs_unchanged(dom_dir: Path, manifest: DomainManifest, known: dict) -> bool:
    """True when every output file has the size and modification time recorded when it was written (or last
    verified) on this host: then no byte of it needs reading to trust it."""
    for name in _output_files(manifest):
        entry = known.get(name)
        try:
            st = (dom_dir / name).stat()
        except OSError:
            return False
        if not isinstance(entry, list) or entry[:2] != [st.st_size, st.st_mtime_ns]:
            return False
    return True


def _clear_outputs(dom_dir: Path) -> None:
    for p in dom_dir.iterdir() if dom_dir.is_dir() else ():
        if p.name == MANIFEST or p.name.endswith((".array_record", ".index.npy")) or (
                ".array_record." in p.name and p.name.endswith(".tmp")):
            p.unlink()


def _short(digest: str | None) -> str:
    return f"{digest[:12]}..." if digest else "none"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _plan_changes(existing: DomainManifest, provenance: list[dict], spec: TokenizerSpec, output_options: dict,
                  manifest_path: Path) -> list[str]:
    """What differs between a prepared domain's manifest and this run's inputs and options, one phrase
    each: an input file added / gone / of another size or content (and modified after the manifest was
    written), another tokenizer, an option with its old and new value."""
    changes = []
    old = {s["path"]: s for s in existing.sources}
    new = {s["path"]: s for s in provenance}
    prepared_at = manifest_path.stat().st_mtime
    for path in new.keys() - old.keys():
        changes.append(f"new input {path}")
    for path in old.keys() - new.keys():
        changes.append(f"input {path} is no longer given")
    for path in [p for p in new if p in old]:
        was, now = old[path], new[path]
        what = []
        if was.get("bytes") != now.get("bytes"):
            what.append(f"size {was.get('bytes', 0):,} -> {now.get('bytes', 0):,} bytes")
        if was.get("sha256") != now.get("sha256"):
            what.append(f"sha256 {_short(was.get('sha256'))} -> {_short(now.get('sha256'))}")
        if was.get("options", {}) != now.get("options", {}):
            what.append(f"options {was.get('options')} -> {now.get('options')}")
        if what:
            with contextlib.suppress(OSError):
                modified = os.stat(path).st_mtime
                if modified > prepared_at:
                    what.append(f"modified {_when(modified)}, after it was prepared ({_when(prepared_at)})")
            changes.append(f"input {path}: {', '.join(what)}")
    if existing.tokenizer.get("fingerprint") != spec.fingerprint:
        old_tok = existing.tokenizer
        changes.append(f"tokenizer {old_tok.get('name')} (vocab {old_tok.get('vocab_size')}) -> {spec.name} "
                       f"(vocab {spec.vocab_size}), fingerprint {_short(old_tok.get('fingerprint'))} -> "
                       f"{_short(spec.fingerprint)}")
    for key, value in output_options.items():
        if key != "tokenizer" and existing.options.get(key) != value:
            changes.append(f"option {key}: {existing.options.get(key)!r} -> {value!r}")
    return changes or ["the text field of a source (?text_field=...) or the manifest's plan format"]


def _domain_lock(dom_dir: Path):
    """Holds the domain folder's lock (an flock the kernel drops with its holder) while the block runs;
    PreparedFolderLockedError naming the holder when another prepare has it."""
    return writer_lock(dom_dir, "mixlm prepare", PreparedFolderLockedError, error=PrepareError,
                       rerun_note="(then rerun: a finished domain is reused)")


@dataclass
class _DomainWork:
    """A domain to prepare (not up to date): what phase 1 and 2 need, filled in as they run."""

    name: str
    sources: list[str]
    units: list[InputUnit]
    dom_dir: Path
    stats: dict
    provenance: list[dict]
    plan_id: str
    output_options: dict
    metas: list[dict] = field(default_factory=list)
    splits: dict = field(default_factory=dict)  # split -> (shard names, document ids of each), in order
    store_lengths: np.ndarray | None = None  # tokens of every document, in chunk order

    @property
    def work(self) -> Path:
        return self.dom_dir / _WORK


def _known_of(unit: InputUnit, known: dict) -> dict:
    """The recorded stats a unit's description needs: its file's (all of them for a dataset folder)."""
    if unit.kind in ("jsonl", "parquet", "text"):
        return {unit.location: known[unit.location]} if unit.location in known else {}
    return known


def describe_input(item: tuple[InputUnit, dict]) -> tuple[dict, dict]:
    """An engine task: (unit, the stats an earlier run recorded of its files) -> (its provenance, those stats
    now). A file of unchanged size and modification time is not read."""
    unit, known = item
    known = dict(known)
    return describe_unit(unit, known), known


def _plan_domain(domain: str, sources: Sequence[str] | str, out_dir: str | Path, options: PrepareOptions,
                 spec: TokenizerSpec, engine: Engine, locks: contextlib.ExitStack) -> DomainManifest | _DomainWork:
    """Takes the domain folder's lock (held by `locks`) and returns its manifest when it is up to date, else
    what is left to do (the work folder made ready: stale work of other inputs or options removed)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise PrepareError(f"domain {domain!r}: no sources given")
    units = [u for spec_ in sources for u in resolve_input(domain, spec_, options.text_field)]
    dom_dir = Path(out_dir) / domain
    stats = _read_stats(dom_dir)
    # unchanged inputs (size, mtime) are not read; the others are hashed by the engine's workers
    known = stats["inputs"]
    described = engine.map(describe_input, [(u, _known_of(u, known)) for u in units], desc=f"prepare {domain}: inputs")
    provenance = [prov for prov, _ in described]
    for _, known in described:
        stats["inputs"].update(known)
    output_options = plan_options(options)
    plan = {
        "domain": domain,
        "sources": provenance,
        "text_fields": [u.text_field for u in units],
        "tokenizer": spec.fingerprint,
        "options": output_options,
    }
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:20]

    locks.enter_context(_domain_lock(dom_dir))  # one prepare at a time in a domain folder
    work = dom_dir / _WORK
    if (dom_dir / MANIFEST).is_file():
        try:
            existing = DomainManifest.load(dom_dir / MANIFEST)
        except (ShardError, KeyError, TypeError):  # an unreadable manifest is stale output
            existing = None
        if existing is not None and existing.options.get("plan") == plan_id:
            try:
                # outputs of the size and mtime recorded when written or last verified here are trusted
                # unread; any other: every shard's size, record count and sha256
                if not _outputs_unchanged(dom_dir, existing, stats["outputs"]):
                    PreparedDomain(out_dir, domain, checksums=True)
                print(f"prepare {domain}: up to date ({dom_dir})", file=sys.stderr)
                storage.write_json(dom_dir / STATS_FILE, {**stats, "outputs": _output_stats(dom_dir, existing)})
                return existing
            except ShardError as e:
                print(f"prepare {domain}: {e}; preparing the domain again", file=sys.stderr)
                existing = None
        if existing is not None and not options.overwrite:
            changes = _plan_changes(existing, provenance, spec, output_options, dom_dir / MANIFEST)
            raise PrepareError(
                f"domain {domain!r}: {dom_dir} holds data prepared from other inputs or options "
                f"({'; '.join(changes)}); pass --overwrite to replace it, or choose another --out"
            )
        _clear_outputs(dom_dir)
    if (
        not (work / "plan.json").is_file()
        or json.loads((work / "plan.json").read_text()).get("plan") != plan_id
    ):
        shutil.rmtree(work, ignore_errors=True)  # stale partial work from other inputs or options
        _clear_outputs(dom_dir)
        work.mkdir(parents=True)
        storage.write_atomic(work / "plan.json", json.dumps({"plan": plan_id, **plan}, indent=1))
    return _DomainWork(domain, sources, units, dom_dir, stats, provenance, plan_id, output_options)


def _plan_key(d: _DomainWork) -> str:
    # The plan and when its work folder was made: a worker's cached chunk store is never a stale folder's.
    return f"{d.plan_id}-{(d.work / 'plan.json').stat().st_mtime_ns}"


def _shard_items(d: _DomainWork, options: PrepareOptions) -> list[tuple]:
    """The domain's shards as `write_shard` items (train shards, then the validation shard), from its chunks."""
    store = ChunkStore(d.work, d.metas)
    if not len(store.lengths):
        malformed = {k: sum(m["malformed"][k] for m in d.metas) for k in MALFORMED_KINDS}
        raise PrepareError(
            f"domain {d.name!r}: no usable documents in {', '.join(d.sources)} "
            f"(malformed: {malformed}); check the paths and --text-field"
        )
    train_ids, val_ids = _split_documents(len(store.lengths), d.name, options)
    train_tokens = int(store.lengths[train_ids].sum())
    num_shards = max(1, min(len(train_ids), math.ceil(train_tokens / options.shard_tokens)))
    groups = {"train": np.array_split(train_ids, num_shards), "validation": [val_ids] if len(val_ids) else []}
    items, key = [], _plan_key(d)
    for split, ids_list in groups.items():
        names = [_shard_name(split, i, len(ids_list)) for i in range(len(ids_list))]
        d.splits[split] = (names, ids_list)
        items += [(str(d.dom_dir), str(d.work), len(d.units), key, name, ids) for name, ids in zip(names, ids_list)]
    d.store_lengths = store.lengths
    return items


def _finish_domain(d: _DomainWork, shards: dict[str, dict], spec: TokenizerSpec, options: PrepareOptions
                   ) -> DomainManifest:
    """Split indexes, the manifest (written last: the domain is complete) and this host's stats of the outputs."""
    splits = {}
    for split, (names, ids_list) in d.splits.items():
        ids = np.concatenate(ids_list) if ids_list else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(d.store_lengths[ids])]).astype(np.int64)
        index = f"{split}.index.npy"
        save_npy(d.dom_dir / index, offsets)
        splits[split] = SplitInfo(len(ids), int(offsets[-1]), index, [ShardInfo(**shards[n]) for n in names])
    per_unit = [{"documents": 0, "malformed": dict.fromkeys(MALFORMED_KINDS, 0)} for _ in d.units]
    for m in d.metas:
        per_unit[m["unit"]]["documents"] += m["documents"]
        for k, v in m["malformed"].items():
            per_unit[m["unit"]]["malformed"][k] += v
    manifest = DomainManifest(
        domain=d.name,
        dtype=spec.dtype.name,
        tokenizer=spec.describe(),
        seed=options.seed,
        splits=splits,
        sources=[{**p, **u} for p, u in zip(d.provenance, per_unit)],
        malformed={k: sum(u["malformed"][k] for u in per_unit) for k in MALFORMED_KINDS},
        options={
            "plan": d.plan_id,
            **d.output_options,
            "tokenizer": spec.name,
            "array_record_options": ARRAY_RECORD_OPTIONS,
        },
    )
    storage.write_atomic(d.dom_dir / MANIFEST, manifest.to_json())
    storage.write_json(d.dom_dir / STATS_FILE, {**d.stats, "outputs": _output_stats(d.dom_dir, manifest)})
    if not options.keep_work:
        shutil.rmtree(d.work, ignore_errors=True)
    return manifest


def _prepare(domains: Mapping[str, Sequence[str] | str], out_dir: str | Path, options: PrepareOptions,
             spec: TokenizerSpec, engine: Engine | None) -> dict[str, DomainManifest]:
    """Every domain through both phases: each phase one engine map over all domains' work."""
    if options.append_eos and spec.eos_id is None:
        raise PrepareError(f"tokenizer {spec.name!r} has no eos token; set one or pass --no-eos")
    if options.prepend_bos and spec.bos_id is None:
        raise PrepareError(f"tokenizer {spec.name!r} has no bos token; drop --bos")
    own_engine = engine is None
    engine = engine or LocalEngine(options.workers, progress=options.progress)
    try:
        with contextlib.ExitStack() as locks:
            done: dict[str, DomainManifest] = {}
            todo: list[_DomainWork] = []
            for name, sources in domains.items():
                planned = _plan_domain(name, sources, out_dir, options, spec, engine, locks)
                if isinstance(planned, DomainManifest):
                    done[name] = planned
                else:
                    todo.append(planned)
            if todo:
                metas = tokenize_units([(d.name, d.units, d.work) for d in todo], spec, options, engine)
                items = []
                for d in todo:
                    d.metas = metas[d.name]
                    items += _shard_items(d, options)
                infos = engine.map(write_shard, items, desc="prepare: shards", count=lambda info: info["documents"])
                shards = {(item[0], item[4]): info for item, info in zip(items, infos)}
                for d in todo:
                    mine = {name: info for (folder, name), info in shards.items() if folder == str(d.dom_dir)}
                    done[d.name] = _finish_domain(d, mine, spec, options)
                _chunk_store.cache_clear()  # the work folders are gone: drop this process's maps of them
            return {name: done[name] for name in domains}
    finally:
        if own_engine:
            engine.close()


def prepare_domain(
    domain: str,
    sources: Sequence[str] | str,
    out_dir: str | Path,
    options: PrepareOptions,
    tokenizer: TokenizerSpec | None = None,
    engine: Engine | None = None,
) -> DomainManifest:
    """Prepares one domain from its source specs (see mixlm/data/inputs.py) into `<out_dir>/<domain>/`.
    Returns the manifest; a domain already prepared with the same inputs and options is left as is.
    `tokenizer`: a loaded TokenizerSpec; `engine`: where the work runs (default: `options.workers` local
    processes)."""
    spec = tokenizer or load_tokenizer_spec(options.tokenizer)
    return _prepare({domain: sources}, out_dir, options, spec, engine)[domain]


def malformed_report(manifest: DomainManifest) -> str:
    """One line per source file with malformed records (empty string when there are none)."""
    lines = []
    for src in manifest.sources:
        bad = {k: v for k, v in src["malformed"].items() if v}
        if bad:
            lines.append(
                f"  {src['path']}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in bad.items())
            )
    return "\n".join(lines)


def prepare_domains(
    domains: Mapping[str, Sequence[str] | str], out_dir: str | Path, options: PrepareOptions,
    engine: Engine | None = None,
) -> dict[str, DomainManifest]:
    """Prepares each domain (name -> source specs) into `<out_dir>/<name>/` on `engine` (default:
    `options.workers` local processes); prints a summary per domain."""
    for name in domains:
        if not name or "/" in name or name.startswith("."):
            raise PrepareError(f"domain name {name!r}: use a plain folder name (letters, digits, _ or -)")
    spec = load_tokenizer_spec(options.tokenizer)
    t0 = time.perf_counter()
    out = _prepare(domains, out_dir, options, spec, engine)
    secs = time.perf_counter() - t0
    for name, m in out.items():
        _summary(name, m)
    print(f"prepare: {counted(len(out), 'domain')} in {secs:.1f}s", file=sys.stderr)
    return out


def _summary(name: str, m: DomainManifest) -> None:
    bad = sum(m.malformed.values())
    print(
        f"prepare {name}: {counted(m.documents, 'document')}, {counted(m.tokens, 'token')} "
        f"({counted(m.splits['validation'].documents, 'document')} held out), "
        f"{counted(len(m.splits['train'].shards), 'train shard')}, {counted(bad, 'malformed record')}, "
        f"vocab {m.tokenizer['vocab_size']:,}",
        file=sys.stderr,
    )
    if bad:
        print(malformed_report(m), file=sys.stderr)
