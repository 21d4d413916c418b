"""What every online mixing strategy is: a frozen dataclass of its parameters (a value the loop is given) with
pure functions over a JSON-able state, so a strategy is tested by hand, saved in a checkpoint and replayed.

    state, decision = strategy.start(domains, weights, natural)     # at step 0, before any training
    if strategy.due(state, step):                                   # after optimizer step `step`
        state, decision = strategy.update(state, signal)            # a DomainSignal of the steps since the last

A Decision's `weights` are the strategy's mixture from the next step on: the sampling weights, or (applied as
objective weights, DoReMi's way) the per-domain weights of the loss while sampling keeps the configured mixture
(mixlm.mixing.online.hook turns them into per-row loss multipliers). Domains are indexed in `domains` order
(the source's domain_names, sorted); every vector here is float64 [D].
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from mixlm.errors import ConfigError

APPLY_MODES = ("sampling", "objective")


@dataclasses.dataclass(frozen=True)
class DomainSignal:
    """What a strategy sees at an update, per domain in `domains` order (float64 [D] vectors).

    nll, tokens: the summed training loss and loss tokens of the `steps` optimizer steps since the previous
    update (the train step's per-domain sums, reduced over every process, so the same everywhere); excess: the
    summed max(loss - reference loss, 0) per token over those steps (only with a reference model, DoReMi);
    tokens_seen: loss tokens each domain has given since the run began; weights: the sampling weights of those
    steps; val_loss: each domain's validation loss at this step (only for a strategy that asks for it)."""

    step: int
    domains: tuple[str, ...]
    nll: np.ndarray
    tokens: np.ndarray
    steps: int
    tokens_seen: np.ndarray
    weights: np.ndarray
    excess: np.ndarray | None = None
    val_loss: np.ndarray | None = None

    def mean_loss(self) -> np.ndarray:
        """Training loss per token of each domain over the window; NaN where a domain gave no tokens."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tokens > 0, self.nll / np.maximum(self.tokens, 1e-300), np.nan)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The strategy's mixture from the next step on ([D], sums to 1). `probe`: a measurement mixture (Aioli's
    LearnParams), applied but kept out of the run's averaged mixture."""

    weights: np.ndarray
    probe: bool = False


@dataclasses.dataclass(frozen=True)
class OnlineStrategy:
    """Fields shared by every strategy: `every` (steps between updates), `warmup_steps` (no update before)."""

    kind: ClassVar[str] = ""
    applies_as: ClassVar[str] = "sampling"  # how its mixture is used unless mixing.apply says otherwise
    needs_reference: ClassVar[bool] = False  # wants a reference model's per-token losses in each batch
    measures_validation: ClassVar[bool] = False  # needs_validation may say yes (the loop then evaluates)
    default_every: ClassVar[int] = 1
    min_domains: ClassVar[int] = 2

    every: int = 0  # 0: default_every
    warmup_steps: int = 0

    @property
    def interval(self) -> int:
        return self.every or self.default_every

    def start(self, domains: Sequence[str], weights: np.ndarray, natural: np.ndarray) -> tuple[dict, Decision | None]:
        """(state, decision at step 0 or None to keep the configured mixture) for a run over `domains` whose
        configured sampling weights are `weights` and whose train tokens are shared as `natural`."""
        return {}, None

    def due(self, state: dict, step: int) -> bool:
        """Whether `update` runs after optimizer step `step` (step 0: before the first)."""
        return step >= max(self.warmup_steps, 1) and step % self.interval == 0

    def needs_validation(self, state: dict, step: int) -> bool:
        """Whether this update's signal must carry the validation loss (the loop then evaluates)."""
        return False

    def update(self, state: dict, signal: DomainSignal) -> tuple[dict, Decision | None]:
        """(new state, new mixture or None to keep the current one)."""
        return state, None


def normalised(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return w / w.sum()


def vector(values: Any) -> np.ndarray:
    """A state's list back to float64 [D]."""
    return np.asarray(values, np.float64)


def strategy_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build_strategy(cls: type, options: dict, *, where: str = "mixing.options", **common) -> OnlineStrategy:
    """cls(**common, **options) with every option checked: an unknown key names the closest, a value of the
    wrong type or out of range is one line naming the key."""
    fields = strategy_fields(cls)
    own = [k for k in fields if k not in ("every", "warmup_steps")]
    kwargs = dict(common)
    for key, value in (options or {}).items():
        if key not in own:
            close = difflib.get_close_matches(str(key), own, n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else f"its options: {', '.join(own) or 'none'}"
            raise ConfigError(f"{where}.{key}: {cls.kind} has no option {key!r}; {hint}")
        default = fields[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = type(default)(value) if ok and (isinstance(default, float) or float(value).is_integer()) else value
            ok = ok and isinstance(value, type(default))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {type(default).__name__} (default {default!r}), got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)
