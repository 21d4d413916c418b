"""Tokenizers, in one place: any Hugging Face tokenizer loaded as what mixlm's readers need (`TokenizerSpec`),
its documents cut into pieces that tokenize exactly as the whole (`piecewise_problem`, `document_pieces`), a
byte-level BPE trained on a corpus (`mixlm tokenizer train`), and a tokenizer's files copied into a model folder.

    spec = load_tokenizer_spec("data/tok")           # a folder or a hub name; picklable for worker processes
    train_tokenizer({"web": "raw/web/"}, "data/tok", vocab_size=32000)

The trained tokenizer's folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained`. `<|endoftext|>` (id 0) is bos, eos and unk; `<|pad|>` (id 1)
pads. Byte-level: every string is encodable, no unknown tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixlm.data.inputs import InputUnit, count_documents, counted, read_documents, resolve_input
from mixlm.errors import ExportError, PrepareError


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


EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer_from_texts(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 8192, min_frequency: int = 2
) -> Path:
    """Trains a byte-level BPE of `vocab_size` tokens (specials included) on `texts`; returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _expected_documents(units_per_domain: list[list[InputUnit]], max_docs_per_domain: int) -> int | None:
    """Documents the training will read (an upper bound: blank / malformed lines count), or None."""
    total = 0
    for units in units_per_domain:
        counts = [count_documents(u) for u in units]
        known = None if None in counts else sum(counts)
        if max_docs_per_domain:
            total += max_docs_per_domain if known is None else min(known, max_docs_per_domain)
        elif known is None:
            return None
        else:
            total += known
    return total


def sample_unit(item: tuple[InputUnit, int]) -> tuple[list[str], dict[str, int]]:
    """An engine task: (input unit, most documents to take, 0: all) -> (its first documents' texts, its malformed
    record counts up to there)."""
    unit, limit = item
    texts, counts = read_documents(unit)
    return list(itertools.islice(texts, limit) if limit else texts), dict(counts)


def train_tokenizer(
    domains: Mapping[str, Sequence[str] | str],
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    max_docs_per_domain: int = 0,
    progress: bool = False,
    engine=None,
) -> Path:
    """Trains on the documents of the given domains (name -> source specs, as for `prepare`), taking at
    most `max_docs_per_domain` documents of each (0: all), domains interleaved in the given order.
    `engine` (mixlm.engine; default this process) reads the input files, a task each, a few ahead of the
    trainer; the BPE merges are computed here. progress=True: a tqdm bar over the documents read (with an
    ETA when their number is cheap to know) on stderr, then a one-line summary there (documents, domains,
    vocabulary, seconds)."""
    from mixlm.engine import engine_or_local

    with engine_or_local(engine, 1, False) as run_on:
        return _train_tokenizer(domains, out_dir, vocab_size, min_frequency, text_field, max_docs_per_domain,
                                progress, run_on)


def _train_tokenizer(domains: Mapping[str, Sequence[str] | str], out_dir: str | Path, vocab_size: int,
                     min_frequency: int, text_field: str, max_docs_per_domain: int, progress: bool, engine) -> Path:
    start = time.perf_counter()
    units_per_domain = [
        [u for spec in ([s] if isinstance(s, str) else s) for u in resolve_input(n, spec, text_field)]
        for n, s in domains.items()
    ]

    skipped: list[tuple[InputUnit, dict[str, int]]] = []  # each unit's malformed counts, as it is read

    def domain_texts(units):
        def read():
            sampled = engine.imap(sample_unit, [(u, max_docs_per_domain) for u in units])
            for unit, (texts, counts) in zip(units, sampled):
                skipped.append((unit, counts))
                yield from texts

        return itertools.islice(read(), max_docs_per_domain) if max_docs_per_domain else read()

    streams = [domain_texts(units) for units in units_per_domain]
    interleaved = (t for group in itertools.zip_longest(*streams) for t in group if t is not None)
    seen = {"documents": 0, "chars": 0}

    def tally(texts):
        for t in texts:
            seen["documents"] += 1
            seen["chars"] += len(t)
            yield t

    bar = None
    if progress:
        from tqdm import tqdm

        total = _expected_documents(units_per_domain, max_docs_per_domain)
        bar = tqdm(tally(interleaved), total=total, desc="tokenizer train: read", unit="doc", unit_scale=True,
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        texts = _closing_bar(bar, vocab_size)
    else:
        texts = tally(interleaved)
    out = train_tokenizer_from_texts(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
    for unit, counts in skipped:  # said even without progress: a skipped record is never silent
        if sum(counts.values()):
            kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n)
            print(f"tokenizer train: skipped {counted(sum(counts.values()), 'malformed record')} in {unit.label} "
                  f"({kinds})", file=sys.stderr)
    if progress:
        from transformers import PreTrainedTokenizerFast

        vocab = len(PreTrainedTokenizerFast.from_pretrained(str(out)))
        print(f"tokenizer train: {counted(seen['documents'], 'document')} ({seen['chars']:,} characters) from "
              f"{counted(len(domains), 'domain')}, vocab {vocab:,} (asked {vocab_size:,}), "
              f"{time.perf_counter() - start:.1f}s -> {out}", file=sys.stderr, flush=True)
    return out


def _closing_bar(bar, vocab_size: int):
    """Yields the bar's items; when they run out, closes the bar and says what the trainer does next."""
    yield from bar
    bar.close()
    print(f"tokenizer train: computing BPE merges up to {vocab_size:,} tokens", file=sys.stderr, flush=True)


# Files that make up a HF tokenizer (copied verbatim).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)


def copy_tokenizer_files(src_dir: Path, dest: Path) -> list[Path]:
    """Copies the TOKENIZER_FILES that `src_dir` has into `dest`; returns the files copied (may be none)."""
    files = [src_dir / n for n in TOKENIZER_FILES if (src_dir / n).is_file()]
    for f in files:
        shutil.copyfile(f, dest / f.name)
    return files


def copy_tokenizer(src: str, dest: Path, *, vocab_size: int) -> dict:
    """Copies a HF tokenizer folder's files (or saves a hub tokenizer) into `dest`, checks that it fits the
    model's vocabulary, and returns its {bos,eos,pad}_token_id."""
    import transformers

    src_path = Path(src)
    if src_path.is_dir():
        if not copy_tokenizer_files(src_path, dest):
            raise ExportError(f"tokenizer {src}: the folder has none of {', '.join(TOKENIZER_FILES[:3])}, ...")
    else:
        try:
            transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dest)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, ...: all need the same advice
            raise ExportError(f"tokenizer {src!r} is not a folder and could not be loaded from the Hub "
                              f"({type(e).__name__}: {str(e)[:200]}); pass --tokenizer FOLDER") from None
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    if len(tok) > vocab_size:
        raise ExportError(f"tokenizer {src} has {len(tok):,} tokens but the model's vocabulary is {vocab_size:,}: "
                          "token ids past the vocabulary would have no embedding; pass the tokenizer it was "
                          "trained with (--tokenizer)")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
