"""`mixlm tokenizer train`: a byte-level BPE trained with `tokenizers`, saved as a HF tokenizer folder.

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained`. `<|endoftext|>` (id 0) is bos, eos and unk; `<|pad|>` (id 1)
pads. Byte-level: every string is encodable, no unknown tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mixlm.data.sources import read_documents, resolve_source

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


def train_tokenizer(
    domains: Mapping[str, Sequence[str] | str],
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    max_docs_per_domain: int = 0,
) -> Path:
    """Trains on the documents of the given domains (name -> source specs, as for `prepare`), taking at
    most `max_docs_per_domain` documents of each (0: all), domains interleaved in the given order."""

    def domain_texts(name, specs):
        specs = [specs] if isinstance(specs, str) else specs
        units = [u for spec in specs for u in resolve_source(name, spec, text_field)]
        texts = itertools.chain.from_iterable(read_documents(u)[0] for u in units)
        return itertools.islice(texts, max_docs_per_domain) if max_docs_per_domain else texts

    streams = [domain_texts(n, s) for n, s in domains.items()]
    interleaved = (t for group in itertools.zip_longest(*streams) for t in group if t is not None)
    return train_tokenizer_from_texts(
        interleaved, out_dir, vocab_size=vocab_size, min_frequency=min_frequency
    )
