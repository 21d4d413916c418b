"""An in-memory token source for smoke tests and throughput runs: no files, fully deterministic.

Each sequence is drawn from a fixed random bigram table, so a model has something learnable.
It honours the same interface as the prepared-mixture source (`next_batch`, `get_state`,
`set_state`, `tokens_seen`): its rows are keyed by the global row index, so
the global batch i depends only on (seed, i) and resume is exact, also on another number of hosts.
"""

from __future__ import annotations

import numpy as np


class SyntheticSource:
    """Host-local batches of `batch_size` sequences of `seq_len` tokens (+1 for the shifted target)."""

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, domain: str = "synthetic"):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.domain = domain
        self.step = 0
        table_rng = np.random.default_rng(seed)
        # Each token has 4 likely successors: a low-entropy bigram language to learn.
        self._successors = table_rng.integers(0, vocab_size, size=(vocab_size, 4))

    def _sequences(self, step: int, rows: int, row_offset: int) -> np.ndarray:
        out = np.empty((rows, self.seq_len + 1), dtype=np.int32)
        for r in range(rows):
            rng = np.random.default_rng([self.seed, step, row_offset + r])
            choice = rng.integers(0, 4, size=self.seq_len)
            tok = int(rng.integers(0, self.vocab_size))
            out[r, 0] = tok
            for t in range(self.seq_len):
                tok = int(self._successors[tok, choice[t]])
                out[r, t + 1] = tok
        return out

    @property
    def domain_names(self) -> tuple[str, ...]:
        return (self.domain,)

    def natural_weights(self) -> dict[str, float]:
        return {self.domain: 1.0}

    def next_batch(self) -> dict[str, np.ndarray]:
        """{'inputs','targets': int32 [b, L], 'loss_mask': float32 [b, L], 'domain_ids': int32 [b] (all 0, the
        one domain)}; b = this host's rows."""
        seq = self._sequences(self.step, self.batch_size, self.process_index * self.batch_size)
        self.step += 1
        return {
            "inputs": seq[:, :-1],
            "targets": seq[:, 1:],
            "loss_mask": np.ones((self.batch_size, self.seq_len), np.float32),
            "domain_ids": np.zeros(self.batch_size, np.int32),
        }

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def tokens_seen(self) -> dict[str, int]:
        return {self.domain: self.step * self.batch_size * self.process_count * self.seq_len}

    def current_weights(self) -> dict[str, float]:
        return {self.domain: 1.0}

    def weights_at(self, step_index: int) -> dict[str, float]:
        return {self.domain: 1.0}

    def set_weights(self, weights: dict[str, float]) -> None:
        from mixlm.errors import ConfigError

        raise ConfigError("data.source='synthetic' has one domain: a mixture update needs data.source='prepared'")

    def close(self) -> None:
        """Nothing to release (the prepared source stops its prefetch threads here)."""

    def eval_batches(self, num_batches: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """Held-out batches (steps far beyond any training step), keyed by domain."""
        held_out = 10**9
        batches = []
        for i in range(num_batches):
            seq = self._sequences(held_out + i, self.batch_size, self.process_index * self.batch_size)
            batches.append({"inputs": seq[:, :-1], "targets": seq[:, 1:],
                            "loss_mask": np.ones((self.batch_size, self.seq_len), np.float32)})
        return {self.domain: batches}
