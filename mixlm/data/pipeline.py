"""The prepared-mixture train source: per-domain random-access MapDatasets, mixed by a stateless schedule.

    PreparedDomain (ArrayRecord shards) -> ConcatWindows | FirstFitRows   one grain MapDataset per domain
    MixtureSchedule: global row g -> (domain, element)                    pure arithmetic, same on every host
    HostBatches[i] = this host's rows [p*b, (p+1)*b) of global batch i     a grain MapDataset over steps
    -> to_iter_dataset (threads) [-> mp_prefetch (data.num_workers processes)]

The global batch at step i depends only on (data, mixture, seq_len, seed, i): not on the number of hosts,
workers or threads. The iterator state is the step (plus, for first-fit packing, three integers per
domain locating the packing cursor), so resume is exact, also across a stage change.

Elastic resume: the state is global. `get_state()` is the same on every process and does not depend on
process_index / process_count (the checkpoint saves it once, from process 0); the first-fit cursors are those
of the global element counts, and mixture updates (`set_weights`) are kept as a (step, weights) history that
`set_state` replays. So a state saved by a run on P processes restores on any other process count Q that
divides the global batch (also 1), and processes 0..Q-1 then read the rows [q*b, (q+1)*b), b = G / Q, of the
very global batches the uninterrupted run would have read (tests/test_elastic_resume.py: 2 -> 1 and 2 -> 4
processes, first-fit packing, a mixture update before and a stage change after the checkpoint). What cannot
change on resume is what the batches depend on: a changed global batch, seq_len, packing, seed, mixture or
prepared data gives a fingerprint mismatch (warned; later batches follow the new settings).
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings

import grain
import numpy as np

from mixlm.config import ExperimentConfig
from mixlm.data.mixture import MixtureSchedule, parse_mixture, with_stage
from mixlm.data.packing import ConcatWindows, FirstFitRows
from mixlm.data.prepared import PreparedDomain, list_domains
from mixlm.errors import ConfigError, DataError

STATE_VERSION = 1


class DataExhaustedError(DataError):
    """A domain would be repeated beyond data.max_epochs."""


class RepetitionWarning(UserWarning):
    """A domain started a second (or later) epoch."""


def _warn_repetition(message: str) -> None:
    """A RepetitionWarning shown as one line: no source line under it (lineno 0 has none) and printed
    around any tqdm bar (the train loop's progress bar) instead of into it."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        warnings.warn_explicit(message, RepetitionWarning, filename="mixlm data", lineno=0, module=__name__)


def _rows_dataset(split, packing: str, seq_len: int, seed: int, *, train: bool):
    if packing == "concat":
        return ConcatWindows(split, seq_len, seed=seed, shuffle=train, repeat=train, pad_tail=not train)
    if packing == "first_fit":
        return FirstFitRows(split, seq_len, seed=seed, shuffle=train, repeat=train)
    raise ConfigError(f"data.packing={packing!r}: expected 'concat' or 'first_fit'")


def rows_to_batch(rows: list, packing: str, seq_len: int, domain_ids: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """Stacks packed rows of seq_len + 1 tokens into {'inputs','targets','loss_mask'[, 'segment_ids',
    'positions'][, 'domain_ids']} of shape [b, seq_len] ([b] for domain_ids, int32: each row's domain, when
    given). A row of None is padding (all zeros, loss_mask 0)."""
    batch = _stack_rows(rows, packing, seq_len)
    if domain_ids is not None:
        batch["domain_ids"] = np.ascontiguousarray(domain_ids, np.int32)
    return batch


def _stack_rows(rows: list, packing: str, seq_len: int) -> dict[str, np.ndarray]:
    if packing == "concat":
        width = seq_len + 1
        tokens = np.stack([r if r is not None else np.full(width, -1, np.int32) for r in rows])
        valid = tokens >= 0  # -1 marks padding (a held-out split's last partial window)
        tokens = np.where(valid, tokens, 0).astype(np.int32)
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "loss_mask": (valid[:, :-1] & valid[:, 1:]).astype(np.float32),
        }
        return {k: np.ascontiguousarray(v) for k, v in batch.items()}
    width = seq_len + 1
    empty = {k: np.zeros(width, np.int32) for k in ("tokens", "segment_ids", "positions")}
    rows = [r if r is not None else empty for r in rows]
    tokens = np.stack([r["tokens"] for r in rows])
    seg = np.stack([r["segment_ids"] for r in rows])
    pos = np.stack([r["positions"] for r in rows])
    # A target counts only inside its own segment: the last token of a piece does not predict the next piece.
    loss_mask = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": loss_mask.astype(np.float32),
        "segment_ids": seg[:, :-1],
        "positions": pos[:, :-1],
    }
    return {k: np.ascontiguousarray(v) for k, v in batch.items()}


class HostBatches(grain.MapDataset):
    """Element i: this host's rows of global batch i (see module docstring)."""

    def __init__(
        self,
        domain_rows: list,
        schedule: MixtureSchedule,
        packing: str,
        *,
        host_batch: int,
        process_index: int,
    ):
        super().__init__(domain_rows)
        self.domain_rows, self.schedule, self.packing = domain_rows, schedule, packing
        self.seq_len = domain_rows[0].seq_len
        self.host_batch, self.process_index = host_batch, process_index

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"HostBatches(b={self.host_batch}, process={self.process_index})"

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        first = step * self.schedule.global_batch_size + self.process_index * self.host_batch
        domain, element = self.schedule.assign(np.arange(first, first + self.host_batch))
        rows = [None] * self.host_batch
        for d in np.unique(domain):
            where = np.flatnonzero(domain == d)
            for i, row in zip(where, self.domain_rows[d]._getitems(element[where].tolist())):
                rows[i] = row
        # A row is packed from one domain's stream, so its domain is every one of its segments' domain too.
        return rows_to_batch(rows, self.packing, self.seq_len, domain_ids=domain)


class PreparedMixtureSource:
    """The trainer's data source over prepared domains; see `mixlm.data.make_train_source`."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        process_index: int = 0,
        process_count: int = 1,
        verbose: bool | None = None,
        read_threads: int = 2,
        prefetch: int = 4,
    ):
        data = cfg.data
        if not data.prepared_dir:
            raise ConfigError(
                "data.source='prepared' needs data.prepared_dir (the folder `mixlm prepare` wrote)"
            )
        if not data.mixture:
            raise ConfigError(
                "data.source='prepared' needs data.mixture ({domain: weight} or a mixture YAML path)"
            )
        if data.packing not in ("concat", "first_fit"):
            raise ConfigError(f"data.packing={data.packing!r}: expected 'concat' or 'first_fit'")
        known = list_domains(data.prepared_dir)
        self.mixture = self.configured_mixture = parse_mixture(data.mixture, known_domains=known or None)
        self.updates: list[tuple[int, dict[str, float]]] = []  # (step, weights) set during the run (set_weights)
        self.cfg, self.packing, self.seq_len = cfg, data.packing, data.seq_len
        self.global_batch = cfg.train.global_batch_size
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ConfigError(f"process_index={process_index} of process_count={process_count}: expected "
                              "0 <= process_index < process_count (jax.process_index(), jax.process_count())")
        if self.global_batch % process_count:
            fits = [n for n in range(1, self.global_batch + 1) if self.global_batch % n == 0]
            near = [max(n for n in fits if n < process_count)] + [n for n in fits if n > process_count][:1]
            raise ConfigError(
                f"train.global_batch_size={self.global_batch} does not split over {process_count} processes; "
                f"run on a process count that divides it (e.g. {' or '.join(map(str, near))}): the global "
                "batch is part of the data order, so a resumed run must keep it"
            )
        self.host_batch = self.global_batch // process_count
        self.process_index, self.process_count = process_index, process_count
        self.read_threads, self.prefetch = read_threads, prefetch
        self.domains = [PreparedDomain(data.prepared_dir, d) for d in self.mixture.domains]
        self.eval_only = self._eval_only_domains(data.prepared_dir, cfg.eval.domains, known)
        self._check_tokenizers(cfg)
        self.train_rows = [
            _rows_dataset(d.train, data.packing, data.seq_len, data.seed, train=True) for d in self.domains
        ]
        used = [any(s.weights[d] > 0 for s in self.mixture.stages) for d in self.mixture.domains]
        for dom, rows, is_used in zip(self.domains, self.train_rows, used):
            if is_used and not rows.units_per_epoch:
                raise ConfigError(
                    f"data.mixture.{dom.name}: the domain's train split has "
                    f"{dom.train.num_tokens} tokens, not enough for one row of data.seq_len + 1 = "
                    f"{data.seq_len + 1}; prepare more data, lower seq_len or set its weight to 0"
                )
        self.schedule: MixtureSchedule | None = None  # set by _use_mixture; each update reuses its stages' counts
        self._use_mixture(self.mixture)
        self._check_repetition_ahead(cfg.train.steps)
        self._warned = [False] * len(self.domains)
        self._step = 0
        self._iterator = None
        self._eval_cache: dict[int, dict] = {}
        if verbose if verbose is not None else process_index == 0:
            print(self.describe(), flush=True)

    # ---- checks ----------------------------------------------------------------------------------
    def _eval_only_domains(self, prepared_dir: str, names: list, known: list[str]) -> list[PreparedDomain]:
        """eval.domains not in the mixture: validated like mixture domains, evaluated, never trained on."""
        out = []
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"eval.domains[{i}]: expected a prepared domain name, got {name!r}")
            if known and name not in known:
                raise ConfigError(
                    f"eval.domains[{i}]: {name!r} is not a prepared domain in {prepared_dir}; "
                    f"prepared domains: {', '.join(known)}"
                )
            if name not in self.mixture.domains and name not in [d.name for d in out]:
                out.append(PreparedDomain(prepared_dir, name))
        return out

    def _check_tokenizers(self, cfg: ExperimentConfig) -> None:
        first = self.domains[0]
        for dom in [*self.domains[1:], *self.eval_only]:
            if dom.manifest.tokenizer["fingerprint"] != first.manifest.tokenizer["fingerprint"]:
                raise ConfigError(
                    f"domains {first.name!r} and {dom.name!r} were prepared with different tokenizers "
                    f"({first.manifest.tokenizer['name']} vs {dom.manifest.tokenizer['name']}); "
                    "re-run `mixlm prepare` with one tokenizer for all domains"
                )
        vocab = int(first.manifest.tokenizer["vocab_size"])
        if cfg.model.vocab_size < vocab:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} "
                f"tokens ({first.manifest.tokenizer['name']}); set model.vocab_size={vocab}"
            )

    def _allowed_units(self, d: int) -> int:
        units = self.train_rows[d].units_per_epoch
        return max(1, math.floor(self.cfg.data.max_epochs * units)) if self.cfg.data.max_epochs > 0 else -1

    def _check_repetition_ahead(self, steps: int) -> None:
        """Concat packing knows its windows per epoch: refuse a run that would pass data.max_epochs."""
        if self.cfg.data.max_epochs <= 0 or self.packing != "concat" or steps <= 0:
            return
        needed = self.schedule.elements_before(steps)
        over = [
            (dom.name, needed[d] / self.train_rows[d].units_per_epoch)
            for d, dom in enumerate(self.domains)
            if needed[d] > self._allowed_units(d)
        ]
        if over:
            listing = ", ".join(f"{name} ({epochs:.2f} epochs)" for name, epochs in over)
            raise ConfigError(
                f"data.max_epochs={self.cfg.data.max_epochs}: over train.steps={steps} these domains would be "
                f"repeated beyond the limit: {listing}. Lower their weights, raise data.max_epochs, or prepare "
                "more data"
            )

    def _check_repetition(self, step: int) -> None:
        before = self.schedule.elements_before(step)
        after = self.schedule.elements_before(step + 1)
        for d, dom in enumerate(self.domains):
            if after[d] <= before[d]:
                continue
            rows = self.train_rows[d]
            unit = rows.unit_of(int(after[d]) - 1)
            allowed = self._allowed_units(d)
            if allowed >= 0 and unit >= allowed:
                raise DataExhaustedError(
                    f"domain {dom.name!r}: step {step} would read past data.max_epochs={self.cfg.data.max_epochs} "
                    f"({rows.units_per_epoch} {'windows' if self.packing == 'concat' else 'blocks'} per epoch); "
                    "lower its weight, raise data.max_epochs or prepare more data"
                )
            if unit >= rows.units_per_epoch and not self._warned[d]:
                self._warned[d] = True
                if self.process_index == 0:
                    _warn_repetition(f"domain {dom.name!r} starts repeating (epoch {unit // rows.units_per_epoch + 1}) "
                                     f"at step {step}")

    def describe(self) -> str:
        """The mixture table: normalised weights per stage, tokens and epochs over train.steps."""
        steps = self.cfg.train.steps
        needed = self.schedule.elements_before(steps) if steps > 0 else np.zeros(len(self.domains), np.int64)
        lines = [
            f"data mixture ({self.packing} packing, seq_len {self.seq_len}, global batch {self.global_batch})"
        ]
        table = self.mixture.table().splitlines()
        lines.append(f"{table[0]}  {'train tokens':>13}  {'val tokens':>11}  {'epochs@' + str(steps):>12}")
        for d, dom in enumerate(self.domains):
            units = self.train_rows[d].units_per_epoch
            if self.packing == "concat":
                epochs = f"{needed[d] / units:.3f}" if units else "-"
            else:  # first-fit rows per epoch are known only after packing: estimate from tokens
                per_epoch = dom.train.num_tokens / self.seq_len
                epochs = f"~{needed[d] / per_epoch:.3f}" if per_epoch else "-"
            lines.append(
                f"{table[d + 1]}  {dom.train.num_tokens:>13,}  {dom.validation.num_tokens:>11,}  {epochs:>12}"
            )
        for dom in self.eval_only:
            lines.append(f"{dom.name} (eval only)  validation tokens {dom.validation.num_tokens:,}")
        return "\n".join(lines)

    # ---- the contract ----------------------------------------------------------------------------
    # ---- the mixture in force (online mixing changes it) ---------------------------------------
    @property
    def domain_names(self) -> tuple[str, ...]:
        """The domains of the mixture, in the order of the batches' `domain_ids` (sorted)."""
        return self.mixture.domains

    def natural_weights(self) -> dict[str, float]:
        """Each domain's share of the mixture's train tokens (the natural mixture, a prior for online mixing)."""
        tokens = {dom.name: dom.train.num_tokens for dom in self.domains}
        total = sum(tokens.values()) or 1
        return {name: n / total for name, n in tokens.items()}

    def _use_mixture(self, mixture) -> None:
        self.mixture = mixture
        self.schedule = MixtureSchedule(mixture, self.global_batch, seed=self.cfg.data.seed, reuse=self.schedule)
        self._batches = HostBatches(self.train_rows, self.schedule, self.packing, host_batch=self.host_batch,
                                    process_index=self.process_index)

    def current_weights(self) -> dict[str, float]:
        """The normalised weights of the next batch."""
        return dict(self.mixture.weights_at(self._step))

    def weights_at(self, step_index: int) -> dict[str, float]:
        """The normalised weights of batch `step_index` (0-based: the batch optimizer step step_index + 1 trains)."""
        return dict(self.mixture.weights_at(step_index))

    def set_weights(self, weights: dict[str, float]) -> None:
        """Online mixing: `weights` ({domain: weight >= 0}, normalised here) from the next batch on. The
        change is part of get_state(), so a run resumed from a later checkpoint replays it."""
        self.updates.append((self._step, dict(weights)))
        self._use_mixture(with_stage(self.mixture, self._step, weights, where=f"mixture update at step {self._step}"))
        self.close()  # prefetched batches followed the old weights

    def _make_iterator(self):
        ds = self._batches[self._step :].to_iter_dataset(
            grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch)
        )
        if self.cfg.data.num_workers > 0:
            from absl import flags

            if (
                not flags.FLAGS.is_parsed()
            ):  # grain reads its absl flags; outside an absl app use their defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.data.num_workers))
        return iter(ds)

    def next_batch(self) -> dict[str, np.ndarray]:
        """This host's rows of the next global batch: 'inputs', 'targets' int32 [b, L], 'loss_mask' float32
        [b, L], 'domain_ids' int32 [b] (index into domain_names); with first-fit packing also 'segment_ids'
        (0 = padding) and 'positions' int32 [b, L]."""
        self._check_repetition(self._step)
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self._step += 1
        return batch

    def fingerprint(self) -> str:
        """What the batch sequence depends on besides the step (to notice a changed pipeline on resume)."""
        parts = [
            self.mixture.fingerprint(),
            self.packing,
            self.seq_len,
            self.global_batch,
            self.cfg.data.seed,
        ]
        parts += [d.manifest.options.get("plan", "") for d in self.domains]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def get_state(self) -> dict:
        """JSON-serialisable: {'version', 'step', 'fingerprint'[, 'mixture_updates': [[step, weights], ...]]
        [, 'anchors': {domain: [block, row, tokens]}]}. Global: the same on every process and for any process
        count (see the module docstring), so process 0's copy resumes a run on any number of processes."""
        state = {"version": STATE_VERSION, "step": self._step, "fingerprint": self.fingerprint()}
        if self.updates:
            state["mixture_updates"] = [[step, w] for step, w in self.updates]
        if self.packing == "first_fit":
            nxt = self.schedule.elements_before(self._step)
            state["anchors"] = {
                dom.name: list(self.train_rows[d].anchor(int(nxt[d]))) for d, dom in enumerate(self.domains)
            }
        return state

    def set_state(self, state: dict) -> None:
        """Restores `get_state()` output (saved by a run on any number of processes): the next global batches
        are the ones that followed it, of which this process reads its rows."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        self.updates = [(int(step), dict(w)) for step, w in state.get("mixture_updates", [])]
        mixture = self.configured_mixture
        for step, w in self.updates:
            mixture = with_stage(mixture, step, w, where=f"mixture update at step {step} (from the checkpoint)")
        self._use_mixture(mixture)
        same = state.get("fingerprint") == self.fingerprint()
        if not same and self.process_index == 0:
            warnings.warn(
                "the data pipeline (mixture, prepared data, seq_len, packing, batch size or seed) differs from "
                "the checkpoint's: batches after the restored step follow the new settings",
                stacklevel=2,
            )
        self.close()
        self._step = int(state["step"])
        if self.packing == "first_fit":
            anchors = state.get("anchors", {}) if same else {}  # else re-pack from the start: slow but right
            for d, dom in enumerate(self.domains):
                self.train_rows[d].set_anchor(anchors.get(dom.name, (0, 0, 0)))
        self._warned = [False] * len(self.domains)

    def tokens_seen(self) -> dict[str, int]:
        """Loss tokens of each domain in all global batches returned so far (all hosts)."""
        used = self.schedule.elements_before(self._step)
        if self.packing == "concat":
            return {dom.name: int(used[d]) * self.seq_len for d, dom in enumerate(self.domains)}
        return {
            dom.name: self.train_rows[d].targets_before(int(used[d])) for d, dom in enumerate(self.domains)
        }

    def eval_batches(self, num_batches: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """Up to `num_batches` held-out batches per domain of the mixture (also weight-0 domains) and of
        eval.domains: this host's
        rows of global batches over the domain's validation split, in order; the last may be padded
        (loss_mask 0). Every host gets the same number of batches per domain."""
        if num_batches not in self._eval_cache:
            out = {}
            for dom in [*self.domains, *self.eval_only]:
                rows = _rows_dataset(
                    dom.validation, self.packing, self.seq_len, self.cfg.data.seed, train=False
                )
                available = (
                    min(len(rows), num_batches * self.global_batch) if dom.validation.num_tokens else 0
                )
                batches = []
                for j in range(-(-available // self.global_batch)):
                    first = j * self.global_batch + self.process_index * self.host_batch
                    wanted = [g for g in range(first, first + self.host_batch) if g < available]
                    got = rows._getitems(wanted) if wanted else []
                    batches.append(
                        rows_to_batch(got + [None] * (self.host_batch - len(got)), self.packing, self.seq_len)
                    )
                out[dom.name] = batches
            self._eval_cache[num_batches] = out
        return self._eval_cache[num_batches]

    def close(self) -> None:
        """Stops prefetch threads / worker processes (a later next_batch starts new ones)."""
        it, self._iterator = self._iterator, None
        if it is not None and hasattr(it, "close"):
            it.close()
