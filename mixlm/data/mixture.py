"""Mixture weights (data, not code) and the deterministic row → (domain, element) schedule.

A mixture is `{domain: weight}` or `{weights: {domain: weight}, stages: [{step: N, weights: {...}}]}`.
Weights are validated (unknown domain, negative, NaN or all-zero weights are errors naming the key)
and normalised; weights that do not sum to 1 say so in one line (a MixtureWeightsWarning). Domains left
out of a stage get weight 0.

`MixtureSchedule` assigns every row of every global batch to a domain without any state: row g (global
row index = step * global_batch_size + row) maps to (domain, element index within that domain) by
arithmetic. Each stage repeats a fixed pattern of `BLOCK_ROWS` rows in which domain d holds `n_d` slots
(n_d / BLOCK_ROWS ≈ weight, exact to 1 / BLOCK_ROWS), spread evenly through the block, so any window of
W consecutive rows holds W * weight ± 1 rows of each domain. Being a pure function of g, the schedule
is the same on every host and for any number of hosts, and resuming needs only the step.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixlm.config import INT32_MAX
from mixlm.errors import ConfigError

BLOCK_ROWS = 1 << 18  # rows in one repeat of a stage's pattern: weights are exact to 1 / 262144
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
        if abs(total - 1.0) > SUM_TOLERANCE:
            at = where if not staged else f"{where} (stage from step {step})"
            warnings.warn_explicit(f"{at}: weights sum to {total:.6g}, not 1; normalised (each divided by "
                                   f"{total:.6g})", MixtureWeightsWarning, filename="mixlm data", lineno=0,
                                   module=__name__)
        stages.append(MixtureStage(step, {d: w.get(d, 0.0) / total for d in domains}))
    return Mixture(domains, tuple(stages))


def with_stage(mixture: Mixture, step: int, raw_weights: Mapping, where: str = "mixture update") -> Mixture:
    """`mixture` with `raw_weights` in force from `step` on (online mixing): a new stage at `step`, or new
    weights for the stage that already starts there. Later stages of the mixture still start where they
    did. Weights must name domains of the mixture (missing ones get 0) and are normalised."""
    w = _check_weights(raw_weights, where, mixture.domains)
    total = sum(w.values())
    new = MixtureStage(int(step), {d: w.get(d, 0.0) / total for d in mixture.domains})
    stages = [s for s in mixture.stages if s.start_step != new.start_step] + [new]
    return Mixture(mixture.domains, tuple(sorted(stages, key=lambda s: s.start_step)))


def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _slot_counts(weights: np.ndarray, block: int) -> np.ndarray:
    """Integer slots per domain summing to `block`, ≈ weights * block; every positive weight gets ≥ 1."""
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


class MixtureSchedule:
    """Stateless assignment of global rows to (domain index, element index within the domain)."""

    def __init__(self, mixture: Mixture, global_batch_size: int, seed: int = 0, block_rows: int = BLOCK_ROWS):
        self.mixture, self.global_batch_size, self.block_rows = mixture, global_batch_size, block_rows
        num_domains = len(mixture.domains)
        self.stage_starts = np.array([s.start_step for s in mixture.stages], np.int64)
        self.counts, self.labels, self.ranks, self.before = [], [], [], []
        before = np.zeros(num_domains, np.int64)
        for i, stage in enumerate(mixture.stages):
            w = np.array([stage.weights[d] for d in mixture.domains])
            counts = _slot_counts(w, block_rows)
            # Domain d's j-th slot sits at (j + phase_d) / n_d of the block: evenly spaced, phases decorrelated.
            phase = np.random.default_rng(_stable_seed("mixture", seed, i)).random(num_domains)
            times = np.concatenate([(np.arange(n) + phase[d]) / n for d, n in enumerate(counts) if n])
            labels = np.concatenate([np.full(n, d, np.int16) for d, n in enumerate(counts) if n])
            ranks = np.concatenate([np.arange(n, dtype=np.int32) for n in counts if n])
            order = np.lexsort((labels, times))
            if i:
                rows = int(stage.start_step - mixture.stages[i - 1].start_step) * global_batch_size
                before = before + self._count_in_stage(i - 1, rows)
            self.counts.append(counts)
            self.labels.append(labels[order])
            self.ranks.append(ranks[order])
            self.before.append(before.copy())

    def _count_in_stage(self, stage: int, rows: int) -> np.ndarray:
        full, part = divmod(rows, self.block_rows)
        partial = np.bincount(self.labels[stage][:part], minlength=len(self.mixture.domains))
        return full * self.counts[stage] + partial

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
            block, pos = np.divmod(local, self.block_rows)
            d = self.labels[s][pos].astype(np.int64)
            domain[sel] = d
            element[sel] = self.before[s][d] + block * self.counts[s][d] + self.ranks[s][pos]
        return domain, element

    def elements_before(self, step: int) -> np.ndarray:
        """Elements of each domain used by all rows of steps < `step` (int64 [num_domains])."""
        s = int(np.searchsorted(self.stage_starts, step, side="right") - 1)
        rows = int(step - self.stage_starts[s]) * self.global_batch_size
        return self.before[s] + self._count_in_stage(s, rows)

    def effective_weights(self, stage: int) -> np.ndarray:
        return self.counts[stage] / self.block_rows
