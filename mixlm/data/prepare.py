"""`mixlm prepare`: raw documents per domain -> tokenized, shuffled ArrayRecord shards + manifest.

Per domain, in two resumable phases under `<out>/<domain>/.work/`:

1. Tokenize: the sources' documents are read in a fixed order and tokenized in batches over
   `workers` processes (results kept in order); every `chunk_docs` documents of a source are saved as a
   chunk (`tok-<unit>-<chunk>.*`, written to a temp name and renamed). A rerun skips finished chunks.
   A long document is tokenized in pieces of at most `_PIECE_CHARS` characters, cut before a space between
   two word characters, when the tokenizer provably gives the same ids that way (`piecewise_problem`);
   memory then stays bounded whatever the document's size. A stretch that cannot be cut (or any document,
   for another tokenizer) longer than `max_document_chars` is refused naming the file, the document and its
   size: whole, it would take about `_TOKENIZER_BYTES_PER_CHAR` bytes of memory per character.
2. Shard: a seeded permutation of all documents; the first ones form the held-out validation split,
   the rest are cut into train shards of about `shard_tokens` tokens. Each shard is written to a temp
   file and renamed; a rerun skips finished shards. The manifest is written last: its presence means the
   domain is complete, and a rerun with the same inputs and options does nothing.

The output is a pure function of (inputs, tokenizer, options): running it twice gives identical bytes.
One `mixlm prepare` at a time writes a domain folder: it holds the folder's lock (`RunFolderLock`, the
lock of run folders) from start to end, and a second one is refused naming the first.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixlm.data.inputs import (
    MALFORMED_KINDS,
    InputUnit,
    PrepareError,
    describe_unit,
    file_digest,
    parquet_file,
    read_located_documents,
    resolve_input,
)
from mixlm.data.prepared import MANIFEST, DomainManifest, PreparedDomain, ShardError, ShardInfo, SplitInfo

ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access to any document
_WORK = ".work"
_PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of at most this many characters
_ENCODE_CHARS = 1 << 20  # characters per tokenizer call (and per batch read ahead): bounds its memory
# Peak memory of a fast tokenizer per character of one text (an Encoding keeps ids, offsets, token strings,
# masks): measured ~170 on a byte-level BPE (a 5 MB document, 830 MB RSS); used only in messages.
_TOKENIZER_BYTES_PER_CHAR = 170


class PreparedFolderLockedError(PrepareError):
    """Another `mixlm prepare` is writing the domain folder (it holds the folder's lock)."""


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: str  # HF tokenizer folder or hub name
    text_field: str = "text"
    append_eos: bool = True
    prepend_bos: bool = False
    seed: int = 0
    validation_fraction: float = 0.01  # share of documents held out (at least 1 when > 0 and >= 2 documents)
    validation_docs: int = 0  # > 0: exactly this many held-out documents instead
    shard_tokens: int = 50_000_000  # target train tokens per shard
    workers: int = 1  # tokenizer processes (1: in this process)
    batch_docs: int = 256  # documents per tokenizer call
    chunk_docs: int = 50_000  # documents per resumable tokenization chunk
    strict: bool = False  # malformed input is an error instead of counted and skipped
    overwrite: bool = False  # replace a domain prepared with other inputs or options
    progress: bool = True
    keep_work: bool = False  # keep the .work folder (tokenized chunks) after success
    max_document_chars: int = 10_000_000  # longest text tokenized whole (a document, or a piece that cannot be cut)


# ---- tokenizer ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerSpec:
    """A fast tokenizer reduced to what prepare needs; picklable for worker processes."""

    name: str
    backend_json: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    @property
    def fingerprint(self) -> str:
        blob = f"{self.backend_json}\n{self.eos_id}\n{self.bos_id}".encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }


def load_tokenizer_spec(name_or_path: str) -> TokenizerSpec:
    """Loads any HF tokenizer (folder or hub name) with `AutoTokenizer`; it must have a fast backend."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise PrepareError(f"tokenizer {name_or_path!r}: cannot load it with AutoTokenizer ({e})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise PrepareError(f"tokenizer {name_or_path!r}: has no fast (tokenizers) backend; convert it first")
    return TokenizerSpec(str(name_or_path), backend.to_str(), len(tok), tok.eos_token_id, tok.bos_token_id)


def piecewise_problem(spec: TokenizerSpec) -> str | None:
    r"""None when the tokenizer gives a text the same ids whole as in pieces cut before a space between two
    word characters (`document_pieces`), else why it may not.

    Why those cuts are exact: (1) added tokens are matched first, over the whole text; one holding no
    whitespace cannot contain the space and one of whitespace only cannot contain the word character before
    it, so no match spans a cut (a token that strips spaces on its right could: refused). (2) An NFC
    normaliser (or none) never composes a space with its neighbours. (3) The ByteLevel pre-tokenizer's GPT-2
    regex ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) has no look-behind; a
    match holds a space only at its start or in a run of whitespace, so a word character then a space
    always ends one pre-token and starts the next, and the text up to the word character splits the same
    with the space or with the end of the text after it (a prefix space is added only to a piece that does
    not start with one). (4) The model (BPE) works on each pre-token alone.
    """
    backend = json.loads(spec.backend_json)
    normalizer = backend.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return f"its normalizer is {normalizer.get('type')}, not NFC or none"
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        return f"its pre-tokenizer is {pre.get('type')}, not ByteLevel with the GPT-2 regex"
    for added in backend.get("added_tokens", []):
        content = added["content"]
        if added.get("rstrip") or (any(c.isspace() for c in content) and not content.isspace()):
            return f"its added token {content!r} could span a cut"
    return None


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"  # what the regex \w matches in a str


def _cut_before(text: str, lo: int, hi: int) -> int:
    """The last position p in [lo, hi] with text[p] a space between two word characters, or -1."""
    p = text.rfind(" ", lo, hi + 1)
    while p >= lo:
        if 0 < p < len(text) - 1 and _word_char(text[p - 1]) and _word_char(text[p + 1]):
            return p
        p = text.rfind(" ", lo, p)
    return -1


_CUT = re.compile(r"(?<=\w) (?=\w)")


def document_pieces(text: str, piece_chars: int) -> list[str]:
    """`text` cut into pieces of at most `piece_chars` characters, each cut just before a space between two
    word characters (see `piecewise_problem`); a stretch with no such space within `piece_chars` stays one
    longer piece. "".join(pieces) == text."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _cut_before(text, start + 1, start + piece_chars)
        if cut < 0:
            found = _CUT.search(text, start + piece_chars)
            if found is None:
                break
            cut = found.start()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


_WORKER: dict = {}


def _init_worker(spec: TokenizerSpec, append_eos: bool, prepend_bos: bool) -> None:
    from tokenizers import Tokenizer

    if _WORKER.get("key") == (spec.fingerprint, append_eos, prepend_bos):
        return
    tok = Tokenizer.from_str(spec.backend_json)
    tok.no_truncation()  # a saved truncation / padding setting would cut or pad every document
    tok.no_padding()
    _WORKER.update(
        key=(spec.fingerprint, append_eos, prepend_bos),
        tok=tok,
        dtype=spec.dtype,
        eos=np.array([spec.eos_id] if append_eos else [], spec.dtype),
        bos=np.array([spec.bos_id] if prepend_bos else [], spec.dtype),
    )


def _tokenize(item):
    """(unit, chunk, documents (each a list of its pieces), flags...) -> same with the documents replaced by
    (flat tokens, lengths). The pieces go to the tokenizer in calls of at most `_ENCODE_CHARS` characters
    (or one piece), so memory stays bounded by the piece and batch sizes, not by a document's."""
    unit, chunk, docs, final, last, counts = item
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    pieces = [piece for doc in docs for piece in doc]
    ids, start = [], 0
    while start < len(pieces):
        end, size = start + 1, len(pieces[start])
        while end < len(pieces) and size + len(pieces[end]) <= _ENCODE_CHARS:
            size, end = size + len(pieces[end]), end + 1
        encodings = tok.encode_batch(pieces[start:end], add_special_tokens=False)
        ids += [np.array(e.ids, dtype) for e in encodings]
        start = end
    parts, lengths, k = [], [], 0
    for doc in docs:
        parts += [_WORKER["bos"], *ids[k : k + len(doc)], _WORKER["eos"]]
        lengths.append(sum(len(x) for x in parts[-len(doc) - 2 :]))
        k += len(doc)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return unit, chunk, flat, np.array(lengths, np.int64), final, last, counts


# ---- helpers ------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def counted(n: int, noun: str) -> str:
    """'1 document', '2,000 documents'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def count_documents(unit: InputUnit) -> int | None:
    """The unit's document count when it is cheap to know (uncompressed jsonl: lines, blank ones included;
    parquet: rows, from the footer; a text file: 1), else None. Progress bars use it for their ETA."""
    if unit.kind == "text":
        return 1
    if unit.kind == "parquet":
        return parquet_file(unit.location).metadata.num_rows
    if unit.kind == "jsonl" and not unit.location.endswith((".gz", ".zst")):
        lines, last = 0, b"\n"
        with open(unit.location, "rb") as f:
            while block := f.read(1 << 24):
                lines, last = lines + block.count(b"\n"), block[-1:]
        return lines + (last != b"\n")
    return None


class _Progress:
    """A tqdm bar over documents with tokens/s in the postfix (silent when disabled); `total` (documents,
    None when unknown) gives it an ETA."""

    def __init__(self, enabled: bool, desc: str, total: int | None = None):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, unit="doc", unit_scale=True, file=sys.stderr,
                            dynamic_ncols=True)
        self.tokens, self.start = 0, time.perf_counter()

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(docs)
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- phase 1: tokenize into resumable chunks ----------------------------------------------------
def _chunk_name(unit: int, chunk: int) -> str:
    return f"tok-{unit:05d}-{chunk:06d}"


def _finished_chunks(work: Path, unit: int) -> list[dict]:
    metas = []
    while (work / f"{_chunk_name(unit, len(metas))}.json").is_file():
        metas.append(json.loads((work / f"{_chunk_name(unit, len(metas))}.json").read_text()))
        if metas[-1]["last"]:
            break
    return metas


def _write_chunk(
    work: Path, unit: int, chunk: int, tokens: np.ndarray, lengths: np.ndarray, counts: dict, last: bool
) -> dict:
    name = _chunk_name(unit, chunk)
    _atomic_save_npy(work / f"{name}.tokens.npy", tokens)
    _atomic_save_npy(work / f"{name}.lengths.npy", lengths)
    meta = {
        "unit": unit,
        "chunk": chunk,
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "malformed": counts,
        "last": last,
    }
    _atomic_write_bytes(
        work / f"{name}.json", json.dumps(meta).encode()
    )  # written last: marks the chunk done
    return meta


def _too_long(unit: InputUnit, where: str, size: int, longest: int, options: PrepareOptions,
              cut_problem: str | None, tokenizer: str) -> PrepareError:
    need = longest * _TOKENIZER_BYTES_PER_CHAR
    memory = f"about {need / 2**30:.1f} GiB" if need >= 2**30 else f"about {need / 2**20:.0f} MiB"
    memory += " of memory to tokenize whole"
    if cut_problem is None:
        what = (f"holds a stretch of {longest:,} characters with no space between two words to cut it at "
                f"({memory})")
    else:
        what = f"cannot be tokenized in pieces with tokenizer {tokenizer} ({cut_problem}) and takes {memory}"
    return PrepareError(
        f"{unit.label}: the document at {where} ({size:,} characters) {what}, over --max-document-chars "
        f"{options.max_document_chars:,}; raise --max-document-chars if the host has the memory, or split "
        "the document"
    )


def _batches(units: list[InputUnit], work: Path, options: PrepareOptions, spec: TokenizerSpec):
    """Yields (unit, chunk, documents, final_of_chunk, last_of_unit, malformed counts) for unfinished chunks;
    each document is a list of its pieces (one, unless it is long and the tokenizer allows cuts)."""
    cut_problem = piecewise_problem(spec)
    piece_chars = min(_PIECE_CHARS, options.max_document_chars)
    for u, unit in enumerate(units):
        done = _finished_chunks(work, u)
        if done and done[-1]["last"]:
            continue
        skip, chunk = len(done) * options.chunk_docs, len(done)
        located, counts = read_located_documents(unit, options.strict)
        docs, chars, in_chunk, seen = [], 0, 0, 0
        for where, text in located:
            seen += 1
            if seen <= skip:  # finished chunks of an interrupted run: their counts are already saved
                if seen == skip:
                    counts.update(dict.fromkeys(counts, 0))
                continue
            pieces = [text]
            if len(text) > piece_chars and cut_problem is None:
                pieces = document_pieces(text, piece_chars)
            longest = max(len(piece) for piece in pieces)
            if longest > options.max_document_chars:
                raise _too_long(unit, where, len(text), longest, options, cut_problem, spec.name)
            docs.append(pieces)
            chars += len(text)
            in_chunk += 1
            if in_chunk == options.chunk_docs:
                yield u, chunk, docs, True, False, dict(counts)
                counts.update(dict.fromkeys(counts, 0))
                docs, chars, in_chunk, chunk = [], 0, 0, chunk + 1
            elif len(docs) == options.batch_docs or chars >= _ENCODE_CHARS:
                yield u, chunk, docs, False, False, None
                docs, chars = [], 0
        yield u, chunk, docs, True, True, dict(counts)


def _bounded_imap(pool, items, window: int):
    """pool.imap in order, but reads at most `window` items ahead (imap would read the whole corpus)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(_tokenize, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@contextlib.contextmanager
def tokenizer_pool(spec: TokenizerSpec, options: PrepareOptions):
    """`options.workers` tokenizer processes (None for 1: tokenize in this process); share one across domains."""
    if options.workers <= 1:
        yield None
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax / threads
    pool = ctx.Pool(options.workers, _init_worker, (spec, options.append_eos, options.prepend_bos))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _tokenize_units(
    domain: str, units: list[InputUnit], work: Path, spec: TokenizerSpec, options: PrepareOptions, pool
) -> list[dict]:
    items = _batches(units, work, options, spec)
    counts = [count_documents(u) for u in units] if options.progress else [None]
    progress = _Progress(options.progress, f"tokenize {domain}", None if None in counts else sum(counts))
    if pool is not None:
        results = _bounded_imap(pool, items, 4 * options.workers)
    else:
        _init_worker(spec, options.append_eos, options.prepend_bos)
        results = map(_tokenize, items)
    try:
        parts_tokens, parts_lengths = [], []
        for unit, chunk, flat, lengths, final, last, counts in results:
            parts_tokens.append(flat)
            parts_lengths.append(lengths)
            progress.update(len(lengths), int(lengths.sum()))
            if final:
                _write_chunk(
                    work,
                    unit,
                    chunk,
                    np.concatenate(parts_tokens).astype(spec.dtype, copy=False),
                    np.concatenate(parts_lengths),
                    counts,
                    last,
                )
                parts_tokens, parts_lengths = [], []
    finally:
        progress.close()
    return [m for u in range(len(units)) for m in _finished_chunks(work, u)]


# ---- phase 2: shuffle, split, write shards ------------------------------------------------------
class _ChunkStore:
    """Random access to tokenized documents across the chunk files (memory-mapped)."""

    def __init__(self, work: Path, metas: list[dict]):
        self.tokens = [
            np.load(work / f"{_chunk_name(m['unit'], m['chunk'])}.tokens.npy", mmap_mode="r") for m in metas
        ]
        lengths = [np.load(work / f"{_chunk_name(m['unit'], m['chunk'])}.lengths.npy") for m in metas]
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.chunk_of = np.repeat(np.arange(len(metas)), [len(x) for x in lengths])
        starts = [np.cumsum(x) - x for x in lengths]
        self.start_in_chunk = np.concatenate(starts) if starts else np.zeros(0, np.int64)

    def doc(self, i: int) -> np.ndarray:
        s = self.start_in_chunk[i]
        return self.tokens[self.chunk_of[i]][s : s + self.lengths[i]]


def _shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.array_record"


def _write_shard(path: Path, store: _ChunkStore, doc_ids: np.ndarray) -> ShardInfo:
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
    dom_dir: Path, work: Path, split: str, groups: list[np.ndarray], store: _ChunkStore, progress: _Progress
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
        _atomic_write_bytes(done, json.dumps(asdict(info)).encode())
        shards.append(info)
        progress.update(info.documents, info.tokens)
    ids = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(store.lengths[ids])]).astype(np.int64)
    index = f"{split}.index.npy"
    _atomic_save_npy(dom_dir / index, offsets)
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
def _clear_outputs(dom_dir: Path) -> None:
    for p in dom_dir.iterdir() if dom_dir.is_dir() else ():
        if p.name == MANIFEST or p.name.endswith((".array_record", ".array_record.tmp", ".index.npy")):
            p.unlink()


def _short(digest: str | None) -> str:
    return f"{digest[:12]}..." if digest else "none"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _plan_changes(existing: DomainManifest, provenance: list[dict], spec: TokenizerSpec, plan_options: dict,
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
    for key, value in plan_options.items():
        if key != "tokenizer" and existing.options.get(key) != value:
            changes.append(f"option {key}: {existing.options.get(key)!r} -> {value!r}")
    return changes or ["the text field of a source (?text_field=...) or the manifest's plan format"]


@contextlib.contextmanager
def _domain_lock(dom_dir: Path):
    """Holds the domain folder's lock (checkpoint.RunFolderLock: an flock the kernel drops with its holder)
    while the block runs; PreparedFolderLockedError naming the holder when another prepare has it."""
    from mixlm.checkpoint import CheckpointError, RunFolderLock, RunFolderLockedError

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
    provenance = [describe_unit(u) for u in units]
    plan_options = {
        k: v
        for k, v in asdict(options).items()
        if k not in ("workers", "batch_docs", "strict", "overwrite", "progress", "keep_work", "max_document_chars")
    }
    plan = {
        "domain": domain,
        "sources": provenance,
        "text_fields": [u.text_field for u in units],
        "tokenizer": spec.fingerprint,
        "options": plan_options,
    }
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:20]

    dom_dir = Path(out_dir) / domain
    with _domain_lock(dom_dir):  # one prepare at a time in a domain folder
        work = dom_dir / _WORK
        if (dom_dir / MANIFEST).is_file():
            try:
                existing = DomainManifest.load(dom_dir / MANIFEST)
            except (ShardError, KeyError, TypeError):  # an unreadable manifest is stale output
                existing = None
            if existing is not None and existing.options.get("plan") == plan_id:
                try:
                    PreparedDomain(out_dir, domain, checksums=True)  # every shard: size, records, sha256
                    print(f"prepare {domain}: up to date ({dom_dir})", file=sys.stderr)
                    return existing
                except ShardError as e:
                    print(f"prepare {domain}: {e}; preparing the domain again", file=sys.stderr)
                    existing = None
            if existing is not None and not options.overwrite:
                changes = _plan_changes(existing, provenance, spec, plan_options, dom_dir / MANIFEST)
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
            _atomic_write_bytes(work / "plan.json", json.dumps({"plan": plan_id, **plan}, indent=1).encode())

        if pool is None and options.workers > 1:
            with tokenizer_pool(spec, options) as own_pool:
                metas = _tokenize_units(domain, units, work, spec, options, own_pool)
        else:
            metas = _tokenize_units(domain, units, work, spec, options, pool)
        per_unit = [{"documents": 0, "malformed": dict.fromkeys(MALFORMED_KINDS, 0)} for _ in units]
        for m in metas:
            per_unit[m["unit"]]["documents"] += m["documents"]
            for k, v in m["malformed"].items():
                per_unit[m["unit"]]["malformed"][k] += v
        sources_info = [{**p, **u} for p, u in zip(provenance, per_unit)]
        malformed = {k: sum(u["malformed"][k] for u in per_unit) for k in MALFORMED_KINDS}
        store = _ChunkStore(work, metas)
        if not len(store.lengths):
            raise PrepareError(
                f"domain {domain!r}: no usable documents in {', '.join(sources)} "
                f"(malformed: {malformed}); check the paths and --text-field"
            )

        train_ids, val_ids = _split_documents(len(store.lengths), domain, options)
        train_tokens = int(store.lengths[train_ids].sum())
        num_shards = max(1, min(len(train_ids), math.ceil(train_tokens / options.shard_tokens)))
        progress = _Progress(options.progress, f"shard {domain}", len(store.lengths))
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
                **plan_options,
                "tokenizer": spec.name,
                "array_record_options": ARRAY_RECORD_OPTIONS,
            },
        )
        _atomic_write_bytes(dom_dir / MANIFEST, manifest.to_json().encode())
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
