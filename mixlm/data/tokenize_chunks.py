"""`mixlm prepare`, phase 1: a domain's documents tokenized into resumable chunks under `<domain>/.work/`.

Each input unit (a file, a dataset split) is one engine task (`tokenize_unit`; mixlm.engine runs them in
processes here or on a Ray cluster): it reads the unit's documents in order and tokenizes them in batches;
every `chunk_docs` documents are saved as a chunk (`tok-<unit>-<chunk>.*`, each file written whole), the
chunk's JSON last: a rerun (after a crash, or a killed driver) skips finished chunks. The chunks depend only
on the unit and the options, never on which worker tokenized them, so the shards written from them are the
same bytes on any engine. A long document is tokenized in
pieces of at most `_PIECE_CHARS` characters, cut before a space between two word characters, when the
tokenizer provably gives the same ids that way (mixlm.data.tokenizer.piecewise_problem); memory then stays
bounded whatever the document's size. A stretch that cannot be cut (or any document, for another tokenizer)
longer than `max_document_chars` is refused naming the file, the document and its size: whole, it would take
about `_TOKENIZER_BYTES_PER_CHAR` bytes of memory per character. `ChunkStore` reads the chunks back.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import InputUnit, read_located_documents
from mixlm.data.prepare_options import PrepareOptions
from mixlm.data.tokenizer import TokenizerSpec, document_pieces, piecewise_problem
from mixlm.errors import PrepareError

_PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of at most this many characters
_ENCODE_CHARS = 1 << 20  # characters per tokenizer call (and per batch read ahead): bounds its memory
# Peak memory of a fast tokenizer per character of one text (an Encoding keeps ids, offsets, token strings,
# masks): measured ~170 on a byte-level BPE (a 5 MB document, 830 MB RSS); used only in messages.
_TOKENIZER_BYTES_PER_CHAR = 170


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


def save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as an .npy file, written whole (storage.write_atomic)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    storage.write_atomic(path, buffer.getvalue())


def _chunk_name(unit: int, chunk: int) -> str:
    return f"tok-{unit:05d}-{chunk:06d}"


def finished_chunks(work: Path, unit: int) -> list[dict]:
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
    save_npy(work / f"{name}.tokens.npy", tokens)
    save_npy(work / f"{name}.lengths.npy", lengths)
    meta = {
        "unit": unit,
        "chunk": chunk,
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "malformed": counts,
        "last": last,
    }
    storage.write_atomic(work / f"{name}.json", json.dumps(meta))  # written last: marks the chunk done
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


def _unit_batches(u: int, unit: InputUnit, work: Path, options: PrepareOptions, spec: TokenizerSpec, done: int):
    """Yields (unit, chunk, documents, final_of_chunk, last_of_unit, malformed counts) for the unit's chunks
    after its first `done` (finished) ones; each document is a list of its pieces (one, unless it is long and
    the tokenizer allows cuts)."""
    cut_problem = piecewise_problem(spec)
    piece_chars = min(_PIECE_CHARS, options.max_document_chars)
    skip, chunk = done * options.chunk_docs, done
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


def tokenize_unit(spec: TokenizerSpec, options: PrepareOptions, item: tuple[int, InputUnit, str]) -> list[dict]:
    """An engine task: (unit index, unit, work folder) -> the metas of the unit's chunks, tokenized and saved
    there (the unit's finished chunks are kept, not redone)."""
    u, unit, work = item
    work = Path(work)
    done = finished_chunks(work, u)
    if done and done[-1]["last"]:
        return done
    _init_worker(spec, options.append_eos, options.prepend_bos)
    parts_tokens, parts_lengths = [], []
    for batch in _unit_batches(u, unit, work, options, spec, len(done)):
        _, chunk, flat, lengths, final, last, counts = _tokenize(batch)
        parts_tokens.append(flat)
        parts_lengths.append(lengths)
        if final:
            _write_chunk(work, u, chunk, np.concatenate(parts_tokens).astype(spec.dtype, copy=False),
                         np.concatenate(parts_lengths), counts, last)
            parts_tokens, parts_lengths = [], []
    return finished_chunks(work, u)


def tokenize_units(domains: list[tuple[str, list[InputUnit], Path]], spec: TokenizerSpec, options: PrepareOptions,
                   engine) -> dict[str, list[dict]]:
    """Phase 1 of every domain in `domains` ((name, its units, its work folder)) as one engine map, a task per
    unit; returns {domain: the metas of its chunks, in unit order}."""
    items = [(u, unit, str(work)) for _, units, work in domains for u, unit in enumerate(units)]
    results = iter(engine.map(functools.partial(tokenize_unit, spec, options), items, desc="prepare: tokenize",
                              count=lambda metas: sum(m["documents"] for m in metas)))
    return {name: [m for _ in units for m in next(results)] for name, units, _ in domains}


class ChunkStore:
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
