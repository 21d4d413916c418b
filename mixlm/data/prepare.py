"""`mixlm prepare`: raw documents per domain -> tokenized, shuffled ArrayRecord shards + manifest.

Per domain, in two resumable phases under `<out>/<domain>/.work/`:

1. Tokenize into resumable chunks (mixlm.data.tokenize_chunks).
2. Shard: a seeded permutation of all documents; the first ones form the held-out validation split,
   the rest are cut into train shards of about `shard_tokens` tokens. Each shard is written to a temp
   file and renamed; a rerun skips finished shards. The manifest is written last: its presence means the
   domain is complete, and a rerun with the same inputs and options does nothing.

The output is a pure function of (inputs, tokenizer, options): running it twice gives identical bytes.
One `mixlm prepare` at a time writes a domain folder: it holds the folder's lock (`RunFolderLock`, the
lock of run folders) from start to end, and a second one is refused naming the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import MALFORMED_KINDS, counted, describe_unit, file_digest, resolve_input
from mixlm.data.prepare_options import PrepareOptions, plan_options
from mixlm.data.prepared import MANIFEST, DomainManifest, PreparedDomain, ShardInfo, SplitInfo
from mixlm.data.tokenize_chunks import ChunkStore, Progress, save_npy, tokenize_units, tokenizer_pool
from mixlm.data.tokenizer import TokenizerSpec, load_tokenizer_spec
from mixlm.errors import CheckpointError, PrepareError, RunFolderLockedError, ShardError
from mixlm.folder_lock import RunFolderLock

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

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), ARRAY_RECORD_OPTIONS)
    for i in doc_ids.tolist():
        writer.write(store.doc(i).tobytes())
    writer.close()
    os.replace(tmp, path)
    size, digest = file_digest(path)
    return ShardInfo(path.name, len(doc_ids), int(store.lengths[doc_ids].sum()), size, digest)


def _write_split(
    dom_dir: Path, work: Path, split: str, groups: list[np.ndarray], store: ChunkStore, progress: Progress
) -> SplitInfo:
    shards = []
    for i, ids in enumerate(groups):
        name = _shard_name(split, i, len(groups))
        done = work / f"{name}.json"
        if done.is_file() and (dom_dir / name).is_file():
            info = ShardInfo(**json.loads(done.read_text()))
            if (dom_dir / name).stat().st_size == info.bytes:  # finished by an interrupted run
                shards.append(info)
                progress.update(info.documents, info.tokens)
                continue
        info = _write_shard(dom_dir / name, store, ids)
        storage.write_atomic(done, json.dumps(asdict(info)))
        shards.append(info)
        progress.update(info.documents, info.tokens)
    ids = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(store.lengths[ids])]).astype(np.int64)
    index = f"{split}.index.npy"
    save_npy(dom_dir / index, offsets)
    return SplitInfo(len(ids), int(offsets[-1]), index, shards)


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
        if p.name == MANIFEST or p.name.endswith((".array_record", ".array_record.tmp", ".index.npy")):
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


@contextlib.contextmanager
def _domain_lock(dom_dir: Path):
    """Holds the domain folder's lock (mixlm.folder_lock.RunFolderLock: an flock the kernel drops with its holder)
    while the block runs; PreparedFolderLockedError naming the holder when another prepare has it."""
    lock = RunFolderLock(dom_dir, log=lambda message: print(message, file=sys.stderr))
    try:
        lock.acquire()
    except RunFolderLockedError:
        try:
            held = json.loads(lock.path.read_text())
            who = f"host {held['host']}, pid {held['pid']}, since {held['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that is just starting"
        raise PreparedFolderLockedError(
            f"{dom_dir} is being written by another mixlm prepare ({who}; lock {lock.path}): wait for it to "
            "finish (then rerun: a finished domain is reused) or stop it, or choose another --out"
        ) from None
    except CheckpointError as e:
        cause = e.__context__ if isinstance(e.__context__, OSError) else e
        raise PrepareError(f"cannot write to {dom_dir} ({getattr(cause, 'strerror', None) or cause}); fix its "
                           "permissions or free space there, or choose another --out") from None
    try:
        yield
    finally:
        lock.release()


def prepare_domain(
    domain: str,
    sources: Sequence[str] | str,
    out_dir: str | Path,
    options: PrepareOptions,
    tokenizer: TokenizerSpec | None = None,
    pool=None,
) -> DomainManifest:
    """Prepares one domain from its source specs (see mixlm/data/inputs.py) into `<out_dir>/<domain>/`.
    Returns the manifest; a domain already prepared with the same inputs and options is left as is.
    `tokenizer` / `pool`: a loaded TokenizerSpec and a `tokenizer_pool` to reuse across domains."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise PrepareError(f"domain {domain!r}: no sources given")
    units = [u for spec in sources for u in resolve_input(domain, spec, options.text_field)]
    spec = tokenizer or load_tokenizer_spec(options.tokenizer)
    if options.append_eos and spec.eos_id is None:
        raise PrepareError(f"tokenizer {spec.name!r} has no eos token; set one or pass --no-eos")
    if options.prepend_bos and spec.bos_id is None:
        raise PrepareError(f"tokenizer {spec.name!r} has no bos token; drop --bos")
    dom_dir = Path(out_dir) / domain
    stats = _read_stats(dom_dir)
    provenance = [describe_unit(u, stats["inputs"]) for u in units]  # unchanged inputs (size, mtime) are not read
    output_options = plan_options(options)
    plan = {
        "domain": domain,
        "sources": provenance,
        "text_fields": [u.text_field for u in units],
        "tokenizer": spec.fingerprint,
        "options": output_options,
    }
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:20]

    with _domain_lock(dom_dir):  # one prepare at a time in a domain folder
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

        if pool is None and options.workers > 1:
            with tokenizer_pool(spec, options) as own_pool:
                metas = tokenize_units(domain, units, work, spec, options, own_pool)
        else:
            metas = tokenize_units(domain, units, work, spec, options, pool)
        per_unit = [{"documents": 0, "malformed": dict.fromkeys(MALFORMED_KINDS, 0)} for _ in units]
        for m in metas:
            per_unit[m["unit"]]["documents"] += m["documents"]
            for k, v in m["malformed"].items():
                per_unit[m["unit"]]["malformed"][k] += v
        sources_info = [{**p, **u} for p, u in zip(provenance, per_unit)]
        malformed = {k: sum(u["malformed"][k] for u in per_unit) for k in MALFORMED_KINDS}
        store = ChunkStore(work, metas)
        if not len(store.lengths):
            raise PrepareError(
                f"domain {domain!r}: no usable documents in {', '.join(sources)} "
                f"(malformed: {malformed}); check the paths and --text-field"
            )

        train_ids, val_ids = _split_documents(len(store.lengths), domain, options)
        train_tokens = int(store.lengths[train_ids].sum())
        num_shards = max(1, min(len(train_ids), math.ceil(train_tokens / options.shard_tokens)))
        progress = Progress(options.progress, f"shard {domain}", len(store.lengths))
        try:
            splits = {
                "train": _write_split(
                    dom_dir, work, "train", np.array_split(train_ids, num_shards), store, progress
                ),
                "validation": _write_split(
                    dom_dir, work, "validation", [val_ids] if len(val_ids) else [], store, progress
                ),
            }
        finally:
            progress.close()
        manifest = DomainManifest(
            domain=domain,
            dtype=spec.dtype.name,
            tokenizer=spec.describe(),
            seed=options.seed,
            splits=splits,
            sources=sources_info,
            malformed=malformed,
            options={
                "plan": plan_id,
                **output_options,
                "tokenizer": spec.name,
                "array_record_options": ARRAY_RECORD_OPTIONS,
            },
        )
        storage.write_atomic(dom_dir / MANIFEST, manifest.to_json())
        storage.write_json(dom_dir / STATS_FILE, {**stats, "outputs": _output_stats(dom_dir, manifest)})
        del store
        if not options.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return manifest


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
    domains: Mapping[str, Sequence[str] | str], out_dir: str | Path, options: PrepareOptions
) -> dict[str, DomainManifest]:
    """Prepares each domain (name -> source specs) into `<out_dir>/<name>/`; prints a summary per domain."""
    for name in domains:
        if not name or "/" in name or name.startswith("."):
            raise PrepareError(f"domain name {name!r}: use a plain folder name (letters, digits, _ or -)")
    spec = load_tokenizer_spec(options.tokenizer)
    out = {}
    with tokenizer_pool(spec, options) as pool:
        for name, sources in domains.items():
            t0 = time.perf_counter()
            m = prepare_domain(name, sources, out_dir, options, tokenizer=spec, pool=pool)
            out[name] = m
            _summary(name, m, time.perf_counter() - t0)
    return out


def _summary(name: str, m: DomainManifest, secs: float) -> None:
    bad = sum(m.malformed.values())
    print(
        f"prepare {name}: {counted(m.documents, 'document')}, {counted(m.tokens, 'token')} "
        f"({counted(m.splits['validation'].documents, 'document')} held out), "
        f"{counted(len(m.splits['train'].shards), 'train shard')}, {counted(bad, 'malformed record')}, "
        f"vocab {m.tokenizer['vocab_size']:,}, {secs:.1f}s",
        file=sys.stderr,
    )
    if bad:
        print(malformed_report(m), file=sys.stderr)
