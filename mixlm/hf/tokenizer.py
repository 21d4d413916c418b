"""The tokenizer of an exported or imported folder: its files copied verbatim (a model folder's config.json
etc. are not tokenizer files), or a Hub tokenizer saved, and checked against the model's vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

from mixlm.errors import ExportError

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
