"""Packing one domain's documents into training rows of seq_len + 1 tokens, as random-access MapDatasets.

* `ConcatWindows` (default): the split's documents (EOS-terminated, stored shuffled) are concatenated and
  cut into windows of seq_len + 1 tokens at stride seq_len, so every token is a target exactly once per
  epoch. Window j of epoch e is window perm_e(j): each epoch visits the windows in a fresh order.
* `FirstFitRows`: documents never share attention. Each document is cut into pieces of at most
  seq_len + 1 tokens (overlapping by one token, so no target is lost), and the pieces of a block of
  `block_docs` consecutive documents are packed first-fit into rows; each epoch visits the blocks in a
  fresh order. Rows carry segment ids (1, 2, ... per piece; 0 = padding) and positions within the piece.

Element k of either dataset depends only on (data, seq_len, seed, k). First-fit row counts per block
are only known after packing the block, so `FirstFitRows` keeps a forward cursor over block starts
computed from document lengths alone (never the tokens); `anchor(k)` / `set_anchor` make that cursor a
few integers for the checkpoint.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict

import grain
import numpy as np

from mixlm.data.prepared import PreparedSplit

INFINITE = sys.maxsize


def _epoch_seed(seed: int, domain: str, epoch: int, kind: str) -> int:
    digest = hashlib.sha256(f"{kind}/{seed}/{domain}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit avalanche mix (splitmix64 finaliser) on uint64 arrays; wraps modulo 2**64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(indices: np.ndarray, size: int, seed: int, rounds: int = 4) -> np.ndarray:
    """Position of each index in a seeded pseudo-random permutation of [0, size): random access, O(1) memory.

    A balanced Feistel network on the smallest even number of bits covering `size` is a bijection on
    [0, 2**bits); cycle-walking (re-applying it until the value falls below `size`) restricts it to
    [0, size). Vectorised over `indices` (int64 array)."""
    x = np.asarray(indices, np.uint64)
    if size <= 1:
        return x.astype(np.int64)
    half = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix64(np.arange(1, rounds + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed))

    def feistel(v):
        left, right = v >> np.uint64(half), v & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(x)
    todo = np.flatnonzero(out >= size)
    while len(todo):
        out[todo] = feistel(out[todo])
        todo = todo[out[todo] >= size]
    return out.astype(np.int64)


class ConcatWindows(grain.MapDataset):
    """Element k: int32 [seq_len + 1] tokens of window k (epochs repeat when `repeat`; -1 = padding)."""

    def __init__(
        self,
        split: PreparedSplit,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        pad_tail: bool = False,
    ):
        super().__init__()
        self.split, self.seq_len, self.seed, self.shuffle, self.repeat = split, seq_len, seed, shuffle, repeat
        self.pad_tail = pad_tail  # keep the last partial window, padded with -1 (for held-out evaluation)
        targets = max(0, split.num_tokens - 1)
        self.units_per_epoch = -(-targets // seq_len) if pad_tail else targets // seq_len  # windows per epoch

    def __len__(self) -> int:
        return INFINITE if self.repeat and self.units_per_epoch else self.units_per_epoch

    def __str__(self) -> str:
        return f"ConcatWindows({self.split.domain}/{self.split.split}, seq_len={self.seq_len})"

    def unit_of(self, k: int) -> int:
        """The window sequence index of element k (epoch = unit // units_per_epoch)."""
        return k

    def _windows(self, ks) -> np.ndarray:
        epoch, j = np.divmod(np.asarray(ks, np.int64), self.units_per_epoch)
        if self.shuffle:
            for e in np.unique(epoch):
                sel = epoch == e
                j[sel] = permute(
                    j[sel], self.units_per_epoch, _epoch_seed(self.seed, self.split.domain, int(e), "windows")
                )
        return j

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        return self._getitems([k])[0]

    def _getitems(self, ks) -> list[np.ndarray]:
        if not self.units_per_epoch:
            raise ValueError(
                f"{self.split.domain}/{self.split.split}: {self.split.num_tokens} tokens, fewer than "
                f"seq_len + 1 = {self.seq_len + 1}; prepare more data or lower data.seq_len"
            )
        L = self.seq_len
        starts = self._windows(ks) * L
        offsets = self.split.offsets
        first = np.searchsorted(offsets, starts, side="right") - 1
        last = np.minimum(
            np.searchsorted(offsets, starts + L, side="right") - 1, self.split.num_documents - 1
        )
        needed = sorted({d for a, b in zip(first, last) for d in range(int(a), int(b) + 1)})
        docs = dict(zip(needed, self.split.read(needed)))
        out = []
        for start, a, b in zip(starts, first, last):
            chunk = np.concatenate([docs[d] for d in range(int(a), int(b) + 1)])
            lo = int(start - offsets[a])
            window = chunk[lo : lo + L + 1].astype(np.int32)
            if len(window) < L + 1:
                window = np.concatenate([window, np.full(L + 1 - len(window), -1, np.int32)])
            out.append(window)
        return out


def first_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin index of each item (first bin, in opening order, with room), for items ≤ capacity."""
    room = np.empty(len(lengths), np.int64)
    bins = np.empty(len(lengths), np.int64)
    used = 0
    for i, n in enumerate(lengths.tolist()):
        fits = np.flatnonzero(room[:used] >= n)
        b = int(fits[0]) if len(fits) else used
        if b == used:
            room[used] = capacity
            used += 1
        room[b] -= n
        bins[i] = b
    return bins


class _BlockLayout:
    """Rows of one packed block: pieces (doc, start, length) sorted by (row, placement order)."""

    def __init__(self, doc_ids, starts, lengths, rows, num_rows):
        self.doc_ids, self.starts, self.lengths, self.rows = doc_ids, starts, lengths, rows
        self.num_rows = num_rows
        self.row_bounds = np.searchsorted(rows, np.arange(num_rows + 1))  # pieces of row r: [b[r], b[r+1])
        targets = np.bincount(rows, weights=lengths - 1, minlength=num_rows).astype(np.int64)
        self.targets_before = np.concatenate([[0], np.cumsum(targets)])  # loss tokens before row r


class FirstFitRows(grain.MapDataset):
    """Element k: {'tokens','segment_ids','positions': int32 [seq_len + 1]} of packed row k."""

    def __init__(
        self,
        split: PreparedSplit,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        block_docs: int = 512,
    ):
        super().__init__()
        self.split, self.seq_len, self.seed, self.shuffle, self.repeat = split, seq_len, seed, shuffle, repeat
        self.block_docs = block_docs
        self.units_per_epoch = -(-split.num_documents // block_docs)  # blocks per epoch
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, _BlockLayout] = OrderedDict()
        self.set_anchor((0, 0, 0))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"FirstFitRows({self.split.domain}/{self.split.split}, seq_len={self.seq_len})"

    def __len__(self) -> int:
        if not self.units_per_epoch:
            return 0
        if self.repeat:
            return INFINITE
        with self._lock:
            while self._extend():
                pass
            return self._row_starts[-1]

    # ---- the cursor: block sequence index q -> first row, loss tokens before it -------------------------
    def set_anchor(self, anchor) -> None:
        """Restarts the cursor at block sequence index q whose first row is r and which has t loss tokens
        before it (from `anchor(k)` of an identical dataset)."""
        q, r, t = (int(x) for x in anchor)
        with self._lock:
            self._q0, self._row_starts, self._tokens_before = q, [r], [t]
            self._cache.clear()

    def anchor(self, k: int) -> tuple[int, int, int]:
        q = self.unit_of(k)
        with self._lock:
            return q, self._row_starts[q - self._q0], self._tokens_before[q - self._q0]

    def _extend(self) -> bool:
        """Packs the next block after the cursor's end (lock held); False when a finite split is done."""
        q = self._q0 + len(self._row_starts) - 1
        if not self.units_per_epoch or (not self.repeat and q >= self.units_per_epoch):
            return False
        layout = self._layout(q)
        self._row_starts.append(self._row_starts[-1] + layout.num_rows)
        self._tokens_before.append(self._tokens_before[-1] + int(layout.targets_before[-1]))
        return True

    def _locate(self, k: int) -> tuple[int, int]:
        """(block sequence index, row within block) of element k (lock held)."""
        if k < self._row_starts[0]:
            raise IndexError(
                f"{self}: element {k} is before the cursor anchor (row {self._row_starts[0]}); "
                "rows are read forward from the last restored state"
            )
        while self._row_starts[-1] <= k:
            if not self._extend():
                raise IndexError(f"{self}: element {k} is past the end ({self._row_starts[-1]} rows)")
        i = int(np.searchsorted(self._row_starts, k, side="right")) - 1
        return self._q0 + i, k - self._row_starts[i]

    def unit_of(self, k: int) -> int:
        """The block sequence index of element k (epoch = unit // units_per_epoch)."""
        with self._lock:
            return self._locate(k)[0]

    def targets_before(self, k: int) -> int:
        """Loss-mask tokens in elements [0, k) (counted from the anchor)."""
        with self._lock:
            q, r = self._locate(k)
            return self._tokens_before[q - self._q0] + int(self._layout(q).targets_before[r])

    def _layout(self, q: int) -> _BlockLayout:
        layout = self._cache.get(q)
        if layout is not None:
            self._cache.move_to_end(q)
            return layout
        epoch, pos = divmod(q, self.units_per_epoch)
        block = pos
        if self.shuffle:
            seed = _epoch_seed(self.seed, self.split.domain, epoch, "blocks")
            block = int(permute(np.array([pos]), self.units_per_epoch, seed)[0])
        first = block * self.block_docs
        stop = min(first + self.block_docs, self.split.num_documents)
        doc_lengths = self.split.lengths(first, stop)
        L = self.seq_len
        # Pieces start every L tokens and span up to L + 1 (one token overlap: each token is a target once).
        per_doc = np.maximum((doc_lengths - 2) // L + 1, 0)
        doc_ids = np.repeat(np.arange(first, stop), per_doc)
        piece_starts = (np.arange(len(doc_ids)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)) * L
        piece_lengths = np.minimum(np.repeat(doc_lengths, per_doc) - piece_starts, L + 1)
        rows = first_fit(piece_lengths, L + 1)
        order = np.argsort(rows, kind="stable")
        layout = _BlockLayout(
            doc_ids[order],
            piece_starts[order],
            piece_lengths[order],
            rows[order],
            int(rows.max()) + 1 if len(rows) else 0,
        )
        self._cache[q] = layout
        if len(self._cache) > 64:
            self._cache.popitem(last=False)
        return layout

    # ---- reading rows -------------------------------------------------------------------------------
    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        return self._getitems([k])[0]

    def _getitems(self, ks) -> list[dict[str, np.ndarray]]:
        pieces = []  # per element: list of (doc, start, length)
        with self._lock:
            for k in ks:
                q, r = self._locate(int(k))
                lay = self._layout(q)
                lo, hi = lay.row_bounds[r], lay.row_bounds[r + 1]
                pieces.append(
                    list(
                        zip(
                            lay.doc_ids[lo:hi].tolist(),
                            lay.starts[lo:hi].tolist(),
                            lay.lengths[lo:hi].tolist(),
                        )
                    )
                )
        needed = sorted({d for row in pieces for d, _, _ in row})
        docs = dict(zip(needed, self.split.read(needed)))
        out = []
        width = self.seq_len + 1
        for row in pieces:
            tokens = np.zeros(width, np.int32)
            segment_ids = np.zeros(width, np.int32)
            positions = np.zeros(width, np.int32)
            at = 0
            for seg, (d, start, n) in enumerate(row, start=1):
                tokens[at : at + n] = docs[d][start : start + n]
                segment_ids[at : at + n] = seg
                positions[at : at + n] = np.arange(n)
                at += n
            out.append({"tokens": tokens, "segment_ids": segment_ids, "positions": positions})
        return out
