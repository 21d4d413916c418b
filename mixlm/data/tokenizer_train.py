"""`mixlm tokenizer train`: a byte-level BPE trained with `tokenizers`, saved as a HF tokenizer folder.

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained`. `<|endoftext|>` (id 0) is bos, eos and unk; `<|pad|>` (id 1)
pads. Byte-level: every string is encodable, no unknown tokens.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mixlm.data.inputs import InputUnit, read_documents, resolve_input
from mixlm.data.prepare import count_documents, counted

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


def train_tokenizer(
    domains: Mapping[str, Sequence[str] | str],
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    max_docs_per_domain: int = 0,
    progress: bool = False,
) -> Path:
    """Trains on the documents of the given domains (name -> source specs, as for `prepare`), taking at
    most `max_docs_per_domain` documents of each (0: all), domains interleaved in the given order.
    progress=True: a tqdm bar over the documents read (with an ETA when their number is cheap to know)
    on stderr, then a one-line summary there (documents, domains, vocabulary, seconds)."""
    start = time.perf_counter()
    units_per_domain = [
        [u for spec in ([s] if isinstance(s, str) else s) for u in resolve_input(n, spec, text_field)]
        for n, s in domains.items()
    ]

    skipped: list[tuple[InputUnit, dict[str, int]]] = []  # each unit's malformed counts, filled while reading

    def unit_texts(unit):
        texts, counts = read_documents(unit)
        skipped.append((unit, counts))
        yield from texts

    def domain_texts(units):
        texts = itertools.chain.from_iterable(unit_texts(u) for u in units)
        return itertools.islice(texts, max_docs_per_domain) if max_docs_per_domain else texts

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
