"""A prepared domain on disk: manifest, ArrayRecord shards of token documents, token-offset index.

Layout written by `mixlm prepare` (mixlm/data/prepare.py), one folder per domain:

    <prepared_dir>/<domain>/manifest.json
    <prepared_dir>/<domain>/train-00000-of-00004.array_record   one record = one document (raw tokens)
    <prepared_dir>/<domain>/train.index.npy                      int64 [documents + 1] token offsets
    <prepared_dir>/<domain>/validation-00000-of-00001.array_record, validation.index.npy

Documents are stored in shuffled order; the index gives random access to any token range of the
concatenated split without reading the shards.

`<prepared_dir>` may be on an object store (gs://, s3://): ArrayRecord reads local files only, so a remote
domain's shards and index are read through the local cache (storage.cached_copy, under
storage.cache_root()/objects/: $MIXLM_CACHE_DIR, else ~/.cache/mixlm): each file is downloaded once, a shard
verified against the manifest's sha256 as it arrives, and a cached shard whose verified copy is unchanged is used
without asking the store again.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixlm import storage
from mixlm.data.inputs import file_digest
from mixlm.errors import ConfigError, ShardError

MANIFEST = "manifest.json"
FORMAT = "mixlm-prepared/1"
READER_OPTIONS = (
    "readahead_buffer_size:0,max_parallelism:1"  # random access; parallelism comes from our threads
)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@dataclass
class ShardInfo:
    file: str
    documents: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    documents: int = 0
    tokens: int = 0
    index: str = ""
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class DomainManifest:
    """What `mixlm prepare` wrote for one domain (manifest.json)."""

    domain: str
    dtype: str  # numpy dtype of the stored tokens (uint16 / uint32)
    tokenizer: dict  # name, fingerprint, vocab_size, eos_id, bos_id
    seed: int
    splits: dict[str, SplitInfo]
    sources: list[dict]  # path, bytes, sha256, documents, malformed {...}
    malformed: dict[str, int]
    options: dict
    format: str = FORMAT

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    def to_json(self) -> str:
        d = {
            "format": self.format,
            "domain": self.domain,
            "dtype": self.dtype,
            "documents": {k: v.documents for k, v in self.splits.items()},
            "tokens": {k: v.tokens for k, v in self.splits.items()},
            "tokenizer": self.tokenizer,
            "seed": self.seed,
            "splits": {
                k: {
                    "documents": v.documents,
                    "tokens": v.tokens,
                    "index": v.index,
                    "shards": [vars(s) for s in v.shards],
                }
                for k, v in self.splits.items()
            },
            "sources": self.sources,
            "malformed": self.malformed,
            "options": self.options,
        }
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @classmethod
    def load(cls, path) -> DomainManifest:
        """The manifest.json at `path` (local or object store); ShardError when missing or unreadable."""
        path = storage.location(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{path}: manifest not found; run `mixlm prepare` for this domain") from None
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: manifest is not valid JSON ({e}); re-run `mixlm prepare`") from None
        if d.get("format") != FORMAT:
            raise ShardError(
                f"{path}: format {d.get('format')!r}, expected {FORMAT!r}; re-run `mixlm prepare`"
            )
        splits = {
            k: SplitInfo(v["documents"], v["tokens"], v["index"], [ShardInfo(**s) for s in v["shards"]])
            for k, v in d["splits"].items()
        }
        return cls(
            d["domain"],
            d["dtype"],
            d["tokenizer"],
            d["seed"],
            splits,
            d["sources"],
            d["malformed"],
            d["options"],
            d["format"],
        )


def list_domains(prepared_dir) -> list[str]:
    """Sub-folders of `prepared_dir` (local or object store) that hold a manifest, sorted."""
    root = storage.location(prepared_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def domain_dir(prepared_dir, domain: str):
    """The folder of one prepared domain (an epath: local or object store); ConfigError when it has no manifest."""
    path = storage.location(prepared_dir) / domain
    if not (path / MANIFEST).is_file():
        known = list_domains(prepared_dir)
        raise ConfigError(
            f"domain {domain!r}: no prepared data at {path} (missing {MANIFEST}); prepared domains in "
            f"{prepared_dir}: {', '.join(known) or 'none'}. Run `mixlm prepare --domain {domain}=SOURCE ...`"
        )
    return path


class PreparedSplit:
    """One split of one domain: `read(doc_ids)` gives token arrays; `offsets` (int64 [documents + 1], memory-
    mapped) the token offsets of the split's concatenation."""

    def __init__(self, path: Path, manifest: DomainManifest, split: str, verify: bool = True,
                 checksums: bool = False):
        info = manifest.splits.get(split)
        if info is None:
            raise ShardError(f"{path / MANIFEST}: no {split!r} split")
        self.domain, self.split = manifest.domain, split
        self.dtype = np.dtype(manifest.dtype)
        self.paths = [str(path / s.file) for s in info.shards]
        if verify:
            for shard in info.shards:
                check_shard(path / shard.file, shard, checksum=checksums)
        self.index_path = index_path = path / info.index
        try:
            self.offsets = np.load(index_path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ShardError(
                f"{index_path}: cannot read the token index ({e}); re-run `mixlm prepare`"
            ) from None
        if len(self.offsets) != info.documents + 1 or (
            info.documents and int(self.offsets[-1]) != info.tokens
        ):
            raise ShardError(
                f"{index_path}: index does not match the manifest "
                f"({len(self.offsets) - 1} documents, expected {info.documents}); re-run `mixlm prepare`"
            )
        self.num_documents, self.num_tokens = info.documents, info.tokens
        self._shard_starts = np.cumsum([0] + [s.documents for s in info.shards])[:-1]
        self._readers = [None] * len(self.paths)
        self._lock = threading.Lock()

    def __getstate__(self):  # grain workers reopen the memory map and the readers instead of copying them
        state = dict(self.__dict__)
        state.update(offsets=None, _readers=[None] * len(self.paths), _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.offsets = np.load(self.index_path, mmap_mode="r")
        self._lock = threading.Lock()

    def _reader(self, shard: int):
        from array_record.python.array_record_module import ArrayRecordReader

        if self._readers[shard] is None:
            with self._lock:
                if self._readers[shard] is None:
                    self._readers[shard] = ArrayRecordReader(self.paths[shard], READER_OPTIONS)
        return self._readers[shard]

    def read(self, doc_ids) -> list[np.ndarray]:
        """Token arrays of the given documents (one batched read per shard)."""
        ids = np.asarray(list(doc_ids), np.int64)
        out: list = [None] * len(ids)
        shard_of = np.searchsorted(self._shard_starts, ids, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            try:
                records = self._reader(int(shard)).read((ids[where] - self._shard_starts[shard]).tolist())
            except Exception as e:  # name the file, whatever the reader raised
                raise ShardError(
                    f"{self.paths[shard]}: shard of domain {self.domain!r} is corrupt ({_one_line(e)}); re-run "
                    f"`mixlm prepare` for domain {self.domain!r}: it checks every shard's sha256 and rewrites "
                    "the domain, then resume the run"
                ) from e
            for i, record in zip(where, records):
                out[i] = np.frombuffer(record, dtype=self.dtype)
        return out

    def lengths(self, start: int, stop: int) -> np.ndarray:
        return np.diff(np.asarray(self.offsets[start : stop + 1], np.int64))


def check_shard(path: Path, shard: ShardInfo, checksum: bool = False) -> None:
    """Raises ShardError naming `path` if it is missing, truncated or has the wrong record count; with
    `checksum`, also if its sha256 differs from the manifest's (a same-size corruption: reads every byte)."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        raise ShardError(f"{path}: shard is missing; re-run `mixlm prepare` to rewrite it")
    size = path.stat().st_size
    if size != shard.bytes:
        raise ShardError(
            f"{path}: shard is truncated or corrupt ({size} bytes, manifest says {shard.bytes}); "
            "delete it and re-run `mixlm prepare` to rewrite it"
        )
    try:
        reader = ArrayRecordReader(str(path))
        records = reader.num_records()
        reader.close()
    except Exception as e:
        raise ShardError(f"{path}: not a readable ArrayRecord file ({_one_line(e)}); re-run `mixlm prepare`") from e
    if records != shard.documents:
        raise ShardError(
            f"{path}: {records} records, manifest says {shard.documents}; the shard is truncated "
            "or corrupt: delete it and re-run `mixlm prepare`"
        )
    if checksum and file_digest(path)[1] != shard.sha256:
        raise ShardError(f"{path}: sha256 differs from the manifest's; the shard is corrupt")


class PreparedDomain:
    """A domain's manifest and its splits, opened lazily (a remote domain through the local cache)."""

    def __init__(self, prepared_dir, domain: str, verify: bool = True, checksums: bool = False):
        self.path = domain_dir(prepared_dir, domain)
        self.name = domain
        self.manifest = DomainManifest.load(self.path / MANIFEST)
        local = local_copy(self.path, self.manifest) if storage.is_remote(self.path) else Path(str(self.path))
        self.train = PreparedSplit(local, self.manifest, "train", verify, checksums)
        self.validation = PreparedSplit(local, self.manifest, "validation", verify, checksums)


def local_copy(domain_url, manifest: DomainManifest) -> Path:
    """The local cached copy of a remote domain folder's shards and indexes (storage.cached_copy: downloaded
    once; each shard checked against the manifest's sha256). Raises ShardError naming a shard whose bytes are
    not the manifest's."""
    for split in manifest.splits.values():
        for shard in split.shards:
            url = storage.join(domain_url, shard.file)
            try:
                storage.cached_copy(url, sha256=shard.sha256)
            except storage.ContentMismatchError as e:
                raise ShardError(f"{e}: the shard of domain {manifest.domain!r} is not the one its manifest "
                                 "describes; re-run `mixlm prepare` for it") from None
            except FileNotFoundError:
                raise ShardError(f"{url}: shard is missing; re-run `mixlm prepare` to rewrite it") from None
        if split.index:
            try:
                storage.cached_copy(storage.join(domain_url, split.index))
            except FileNotFoundError:
                raise ShardError(f"{storage.join(domain_url, split.index)}: the token index is missing; re-run "
                                 "`mixlm prepare`") from None
    return storage.cache_path(domain_url)
