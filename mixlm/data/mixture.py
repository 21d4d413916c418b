"""Mixture weights (data, not code) and the deterministic row → (domain, element) schedule.

A mixture is `{domain: weight}` or `{weights: {domain: weight}, stages: [{step: N, weights: {...}}]}`.
Weights are validated (unknown domain, negative, NaN or all-zero weights are errors naming the key)
and normalised; weights that do not sum to 1 say so in one line (a MixtureWeightsWarning). Domains left
out of a stage get weight 0.

`MixtureSchedule` assigns every row of every global batch to a domain without any state: row g (global
row index = step * global_batch_size + row) maps to (domain, element index within that domain) by
arithmetic. Each stage repeats a pattern of `BLOCK_ROWS` rows in which domain d holds floor(w_d * BLOCK_ROWS)
slots spread evenly through the block, and the slots the remainders add up to go through a second pattern of
the same size (_StagePattern), so every weight is exact to 1 / BLOCK_ROWS² (~1.5e-11): a domain at 1e-5 gets
its 1e-5 of the rows over enough steps. A positive weight below that resolution is refused (MIN_WEIGHT), never
silently zero. Any window of W consecutive rows holds W * weight ± 2 rows of each domain. Being a pure function
of g, the schedule is the same on every host and for any number of hosts, and resuming needs only the step.
Stages are materialised lazily, from their first row: an online update that appends a stage every few steps
sorts only the slots those steps read.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixlm.config import INT32_MAX
from mixlm.errors import ConfigError

BLOCK_ROWS = 1 << 18  # rows in one repeat of a stage's pattern: weights are exact to 1 / 262144
MIN_WEIGHT = 1.0 / BLOCK_ROWS**2  # the smallest positive (normalised) weight the schedule represents
SUM_TOLERANCE = 1e-6  # weights written to 10 significant digits sum to 1 within ~1e-9: not worth a word


class MixtureWeightsWarning(UserWarning):
    """Mixture weights that do not sum to 1 and were normalised (shown as one line)."""


@dataclass(frozen=True)
class MixtureStage:
    start_step: int
    weights: dict[str, float]  # every domain of the mixture, normalised to sum 1


@dataclass(frozen=True)
class Mixture:
    domains: tuple[str, ...]  # sorted: the domain index used everywhere below
    stages: tuple[MixtureStage, ...]  # stages[0].start_step == 0, strictly increasing

    def weights_at(self, step: int) -> dict[str, float]:
        return self.stages[self.stage_index(step)].weights

    def stage_index(self, step: int) -> int:
        return max(i for i, s in enumerate(self.stages) if s.start_step <= step)

    def fingerprint(self) -> str:
        blob = json.dumps([(s.start_step, s.weights) for s in self.stages], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def table(self) -> str:
        """The normalised weights, one row per domain and one column per stage."""
        heads = ["domain"] + [f"step {s.start_step}" for s in self.stages]
        rows = [[d] + [f"{s.weights[d]:.4f}" for s in self.stages] for d in self.domains]
        widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        return "\n".join([fmt.format(*heads)] + [fmt.format(*r) for r in rows])


def _closest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known domains: {', '.join(options)}"


def _check_weights(raw, where: str, known: Sequence[str] | None) -> dict[str, float]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: expected a non-empty mapping of domain: weight, got {raw!r}")
    out = {}
    for key, value in raw.items():
        key = str(key)
        if known is not None and key not in known:
            raise ConfigError(f"{where}.{key}: unknown domain {key!r}{_closest(key, known)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}: weight must be a number, got {value!r}")
        if math.isnan(value) or math.isinf(value):
            raise ConfigError(f"{where}.{key}: weight is {value}; use a finite number >= 0")
        if value < 0:
            raise ConfigError(f"{where}.{key}: weight {value} is negative; weights must be >= 0")
        out[key] = float(value)
    if sum(out.values()) <= 0:
        raise ConfigError(f"{where}: all weights are zero ({', '.join(out)}); give at least one a weight > 0")
    return out


def parse_mixture(
    raw: Mapping, known_domains: Sequence[str] | None = None, where: str = "data.mixture"
) -> Mixture:
    """Validates and normalises a mixture mapping (see module docstring).

    `known_domains`: when given, every key must be one of them (e.g. the prepared domains).
    Raises ConfigError naming the offending key.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{where}: expected a mapping of domain: weight (or weights: + stages:), got {raw!r}"
        )
    staged = "weights" in raw or "stages" in raw
    if staged:
        extra = set(raw) - {"weights", "stages"}
        if extra:
            raise ConfigError(
                f"{where}: a staged mixture has only `weights` and `stages`; unexpected {sorted(extra)}"
            )
        stage_list = []
        if raw.get("weights") is not None:
            stage_list.append((0, _check_weights(raw["weights"], f"{where}.weights", known_domains)))
        stages_raw = raw.get("stages") or []
        if not isinstance(stages_raw, list):
            raise ConfigError(f"{where}.stages: expected a list of {{step: N, weights: {{...}}}}")
        for i, st in enumerate(stages_raw):
            w = f"{where}.stages[{i}]"
            if not isinstance(st, Mapping) or "step" not in st or "weights" not in st:
                raise ConfigError(f"{w}: expected {{step: N, weights: {{domain: weight}}}}, got {repr(st)[:80]}")
            step = st["step"]
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= INT32_MAX:
                raise ConfigError(f"{w}.step: expected an integer in [0, {INT32_MAX}] (train.steps' range), "
                                  f"got {repr(step)[:40]}")
            if stage_list and step <= stage_list[-1][0]:
                raise ConfigError(
                    f"{w}.step: {step} must be greater than the previous stage's {stage_list[-1][0]}"
                )
            stage_list.append((step, _check_weights(st["weights"], f"{w}.weights", known_domains)))
        if not stage_list:
            raise ConfigError(f"{where}: no weights and no stages")
        if stage_list[0][0] != 0:
            raise ConfigError(
                f"{where}: without top-level `weights`, the first stage must start at step 0 "
                f"(it starts at {stage_list[0][0]})"
            )
    else:
        stage_list = [(0, _check_weights(raw, where, known_domains))]
    domains = tuple(sorted({d for _, w in stage_list for d in w}))
    stages = []
    for step, w in stage_list:
        total = sum(w.values())
        at = where if not staged else f"{where} (stage from step {step})"
        if abs(total - 1.0) > SUM_TOLERANCE:
            warnings.warn_explicit(f"{at}: weights sum to {total:.6g}, not 1; normalised (each divided by "
                                   f"{total:.6g})", MixtureWeightsWarning, filename="mixlm data", lineno=0,
                                   module=__name__)
        stages.append(MixtureStage(step, _normalised(w, domains, at)))
    return Mixture(domains, tuple(stages))


def _normalised(weights: Mapping[str, float], domains: Sequence[str], where: str) -> dict[str, float]:
    """weights / their sum over `domains` (missing ones 0); a positive share below MIN_WEIGHT is refused."""
    total = sum(weights.values())
    out = {d: weights.get(d, 0.0) / total for d in domains}
    for d, w in out.items():
        if 0 < w < MIN_WEIGHT:
            raise ConfigError(f"{where}.{d}: weight {w:.3g} (normalised) is below {MIN_WEIGHT:.3g} = 1/2^36, the "
                              "smallest share the row schedule represents; set it to 0 or raise it")
    return out


def with_stage(mixture: Mixture, step: int, raw_weights: Mapping, where: str = "mixture update") -> Mixture:
    """`mixture` with `raw_weights` in force from `step` on (online mixing): a new stage at `step`, or new
    weights for the stage that already starts there. Later stages of the mixture still start where they
    did. Weights must name domains of the mixture (missing ones get 0) and are normalised."""
    w = _check_weights(raw_weights, where, mixture.domains)
    new = MixtureStage(int(step), _normalised(w, mixture.domains, where))
    stages = [s for s in mixture.stages if s.start_step != new.start_step] + [new]
    return Mixture(mixture.domains, tuple(sorted(stages, key=lambda s: s.start_step)))


def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _largest_remainder(weights: np.ndarray, block: int) -> np.ndarray:
    """Integer slots per domain summing to `block`, ≈ weights * block; every positive weight gets ≥ 1 (the
    last level of a pattern, where one slot is 1 / block² of the rows: see _StagePattern)."""
    raw = weights * block
    counts = np.floor(raw).astype(np.int64)
    counts[(weights > 0) & (counts == 0)] = 1
    short = block - int(counts.sum())
    if short > 0:  # largest remainders first (ties by domain index)
        order = np.lexsort((np.arange(len(raw)), -(raw - np.floor(raw)) * (weights > 0)))
        counts[order[:short]] += 1
    while short < 0:  # only when many tiny weights were rounded up: take from the largest
        counts[int(np.argmax(counts))] -= 1
        short += 1
    return counts


class _Level:
    """One block of `block` slots: label l holds counts[l] slots, its j-th at time (j + phase_l) / counts[l],
    the block's order being (time, label). Materialised lazily from the start: a stage read for a few steps
    (online mixing appends one per update) sorts a few slots, not the whole block."""

    def __init__(self, counts: np.ndarray, phases: np.ndarray, block: int):
        self.counts, self.phases, self.block = counts, phases, block
        self.size = 0
        self.labels = np.zeros(0, np.int32)  # [size] label of each materialised slot
        self.ranks = np.zeros(0, np.int64)  # [size] j: the slot is its label's j-th
        self._positions: list[np.ndarray] = []  # per label: its slots' positions, increasing

    def ensure(self, needed: int) -> None:
        """Materialises the first `needed` slots (at least; the whole block at most)."""
        if needed <= self.size:
            return
        size = min(self.block, max(needed, 2 * self.size, 1024))
        live = np.flatnonzero(self.counts)
        n = self.counts[live]
        # Every slot with time <= t is taken (one spare per label covers rounding), and at least `size` have
        # time <= t, so the first `size` of the taken slots in (time, label) order are the block's first.
        t = (size + len(self.counts) + 1) / self.block
        take = n if t >= 1 else np.clip(np.floor(t * n - self.phases[live]).astype(np.int64) + 2, 0, n)
        times = np.concatenate([(np.arange(k) + self.phases[d]) / c for d, k, c in zip(live, take, n)])
        labels = np.concatenate([np.full(k, d, np.int32) for d, k in zip(live, take)])
        ranks = np.concatenate([np.arange(k, dtype=np.int64) for k in take])
        order = np.lexsort((labels, times))[:size]
        self.labels, self.ranks, self.size = labels[order], ranks[order], size
        by_label = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[by_label], np.arange(len(self.counts) + 1))
        self._positions = [by_label[bounds[i]:bounds[i + 1]] for i in range(len(self.counts))]

    def before(self, label: int, positions: np.ndarray) -> np.ndarray:
        """Slots of `label` before each position (positions < size)."""
        return np.searchsorted(self._positions[label], positions)

    def count_before(self, n: int) -> np.ndarray:
        """Slots of every label among the first n of the repeated block ([labels])."""
        block, pos = divmod(int(n), self.block)
        self.ensure(pos)
        return block * self.counts + np.bincount(self.labels[:pos], minlength=len(self.counts))


class _Locked:
    """Holds a lock that pickling (grain's worker processes) leaves out and unpickling renews."""

    def __init__(self):
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _StagePattern(_Locked):
    """A stage's rows → (domain, rows of that domain before it in the stage), exact to 1 / block².

    Level 1 gives domain d floor(w_d * block) slots of each block and the slots left over (one per unit of the
    summed remainders) to an EXTRA label; the k-th EXTRA row of the stage takes the domain of the k-th slot of
    level 2, a block of the same size whose slots follow the remainders (largest-remainder rounding). So a
    domain at weight 1e-5 gets 2 level-1 slots per 262144 rows and its remaining 0.62 slot through level 2:
    its share over many rows is its weight to ~1e-11 — never 0 and never 3 / 262144 (+14%) per block."""

    def __init__(self, weights: np.ndarray, block: int, seed: int, stage: int):
        super().__init__()  # grain's read threads call assign at once: materialising is one thread at a time
        num = len(weights)
        scaled = weights * block
        counts = np.floor(scaled).astype(np.int64)
        while counts.sum() > block:  # float rounding of weights summing to 1 + 1e-16: never more slots than rows
            counts[int(np.argmax(counts))] -= 1
        self.extra = block - int(counts.sum())  # slots per block that go through level 2
        phases = np.random.default_rng(_stable_seed("mixture", seed, stage)).random(num + 1)
        self.top = _Level(np.append(counts, self.extra), phases, block)
        self.num, self.block = num, block
        self.child = None
        remainders = np.maximum(scaled - counts, 0.0)
        if self.extra > 0:
            child_counts = _largest_remainder(remainders / remainders.sum(), block)
            child_phases = np.random.default_rng(_stable_seed("mixture/extra", seed, stage)).random(num)
            self.child = _Level(child_counts, child_phases, block)
        share = counts.astype(np.float64)
        if self.child is not None:
            share += self.extra * self.child.counts / block
        self.effective = share / block  # each domain's exact long-run share of the stage's rows

    def count_before(self, n: int) -> np.ndarray:
        """Rows of each domain among the stage's first n ([domains])."""
        with self._lock:
            return self._count_before(n)

    def _count_before(self, n: int) -> np.ndarray:
        top = self.top.count_before(n)
        out = top[: self.num].copy()
        if self.child is not None:
            out += self.child.count_before(int(top[self.num]))
        return out

    def _child_before(self, domains: np.ndarray, extras: np.ndarray) -> np.ndarray:
        """Level-2 slots of domains[i] among the first extras[i] level-2 slots."""
        block, pos = np.divmod(extras, self.block)
        self.child.ensure(int(pos.max()) + 1 if len(pos) else 0)
        out = np.empty_like(extras)
        for d in np.unique(domains):
            sel = domains == d
            out[sel] = block[sel] * self.child.counts[d] + self.child.before(int(d), pos[sel])
        return out

    def assign(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage row indices (int64 [m]) -> (domain [m], rows of that domain before each in the stage [m])."""
        with self._lock:
            return self._assign(n)

    def _assign(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block, pos = np.divmod(n, self.block)
        self.top.ensure(int(pos.max()) + 1 if len(pos) else 0)
        label = self.top.labels[pos].astype(np.int64)
        rank = self.top.ranks[pos]
        extra = label == self.num
        domain, before = label.copy(), np.empty_like(n)
        base = ~extra
        before[base] = block[base] * self.top.counts[label[base]] + rank[base]
        if self.child is None:
            return domain, before
        if base.any():  # plus the domain's level-2 rows among the EXTRA rows before this one
            extras_before = block[base] * self.extra + self.top.before(self.num, pos[base])
            before[base] += self._child_before(label[base], extras_before)
        if extra.any():  # the k-th EXTRA row: level 2's domain, after that domain's level-1 rows before it
            k = block[extra] * self.extra + rank[extra]
            child_block, child_pos = np.divmod(k, self.block)
            self.child.ensure(int(child_pos.max()) + 1)
            d = self.child.labels[child_pos].astype(np.int64)
            domain[extra] = d
            level2 = child_block * self.child.counts[d] + self.child.ranks[child_pos]
            level1 = block[extra] * self.top.counts[d]
            for one in np.unique(d):
                sel = d == one
                level1[sel] += self.top.before(int(one), pos[extra][sel])
            before[extra] = level1 + level2
        return domain, before


PATTERNS_KEPT = 4  # materialised stage patterns a schedule keeps (older ones are rebuilt if read again)


class MixtureSchedule(_Locked):
    """Stateless assignment of global rows to (domain index, element index within the domain)."""

    def __init__(self, mixture: Mixture, global_batch_size: int, seed: int = 0, block_rows: int = BLOCK_ROWS,
                 reuse: MixtureSchedule | None = None):
        """`reuse`: an earlier schedule of the same run (same batch, seed, block) whose leading stages this one
        shares; their element counts are taken from it instead of recounted (an online update appends a stage
        without re-reading the ones before)."""
        super().__init__()  # guards the cache of stage patterns (grain's read threads)
        self.mixture, self.global_batch_size, self.block_rows = mixture, global_batch_size, block_rows
        self.seed = seed
        self.stage_starts = np.array([s.start_step for s in mixture.stages], np.int64)
        self._weights = [np.array([s.weights[d] for d in mixture.domains], np.float64) for s in mixture.stages]
        self._patterns: OrderedDict[int, _StagePattern] = OrderedDict()
        shared = 0
        if reuse is not None and (reuse.global_batch_size, reuse.seed, reuse.block_rows,
                                  reuse.mixture.domains) == (global_batch_size, seed, block_rows, mixture.domains):
            for a, b in zip(reuse.mixture.stages, mixture.stages):
                if a != b:
                    break
                shared += 1
        self.before = list(reuse.before[:shared]) if shared else []
        if shared:
            with reuse._lock:
                self._patterns.update((i, p) for i, p in reuse._patterns.items() if i < shared)
        for i in range(len(self.before), len(mixture.stages)):
            if i == 0:
                self.before.append(np.zeros(len(mixture.domains), np.int64))
            else:
                rows = int(mixture.stages[i].start_step - mixture.stages[i - 1].start_step) * global_batch_size
                self.before.append(self.before[i - 1] + self.pattern(i - 1).count_before(rows))

    def pattern(self, stage: int) -> _StagePattern:
        with self._lock:
            found = self._patterns.get(stage)
            if found is None:
                found = _StagePattern(self._weights[stage], self.block_rows, self.seed, stage)
                self._patterns[stage] = found
                while len(self._patterns) > PATTERNS_KEPT:
                    self._patterns.popitem(last=False)
            self._patterns.move_to_end(stage)
            return found

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices (int64 [n]) -> (domain index int64 [n], element index int64 [n])."""
        rows = np.asarray(rows, np.int64)
        steps = rows // self.global_batch_size
        stage_of = np.searchsorted(self.stage_starts, steps, side="right") - 1
        domain = np.empty_like(rows)
        element = np.empty_like(rows)
        for s in np.unique(stage_of):
            sel = stage_of == s
            local = rows[sel] - self.stage_starts[s] * self.global_batch_size
            d, before = self.pattern(int(s)).assign(local)
            domain[sel] = d
            element[sel] = self.before[s][d] + before
        return domain, element

    def elements_before(self, step: int) -> np.ndarray:
        """Elements of each domain used by all rows of steps < `step` (int64 [num_domains])."""
        s = int(np.searchsorted(self.stage_starts, step, side="right") - 1)
        rows = int(step - self.stage_starts[s]) * self.global_batch_size
        return self.before[s] + self.pattern(s).count_before(rows)

    def effective_weights(self, stage: int) -> np.ndarray:
        """Each domain's long-run share of the stage's rows (its weight to ~1 / block_rows²)."""
        return self.pattern(stage).effective
