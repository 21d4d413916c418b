"""The prior of a mixture search: each domain's share of the available tokens, and the repetition bound.

Both the sampler (proxy mixtures) and the optimizer (simulated mixtures) draw around this prior and
reject any mixture that would repeat a domain more than `max_usage` times in a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixlm.config import read_yaml_file
from mixlm.data.prepared import DomainManifest
from mixlm.errors import ConfigError, ShardError

# Values of a prior YAML summing to 1 within this are shares, not token counts.
_SHARE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DomainPrior:
    """domains: names, in a fixed order used by every array here; shares_D: token share of each
    domain (sums to 1); tokens_D: available (train-split) tokens per domain, or None when the prior
    was given as shares only."""

    domains: tuple[str, ...]
    shares_D: np.ndarray
    tokens_D: np.ndarray | None = None

    def tempered(self, temperature: float) -> np.ndarray:
        """Dirichlet base measure ∝ share**temperature (RegMix's convention: 1 keeps the token shares,
        0 is uniform, 0.5 is RegMix's default), as a [D] array summing to 1."""
        if temperature < 0:
            raise ConfigError(f"temperature={temperature} must be >= 0 (1 = token shares, 0 = uniform)")
        base_D = self.shares_D**temperature
        return base_D / base_D.sum()

    def usage_bounds(self, max_usage: float, token_budget: float | None = None) -> np.ndarray:
        """Largest weight per domain, [D]; raises when they sum below 1 (no mixture fits). A run of `token_budget` tokens may read a domain at most
        `max_usage` times over, so w_d <= max_usage * tokens_d / token_budget (capped at 1). Without a
        budget the run is taken to be as long as all the data together (RegMix's form:
        w_d <= max_usage * share_d)."""
        if max_usage <= 0:
            raise ConfigError(f"max_usage={max_usage} must be > 0 (epochs a domain may be repeated)")
        if token_budget is None:
            return _feasible(np.minimum(max_usage * self.shares_D, 1.0))
        if self.tokens_D is None:
            raise ConfigError(
                "the prior gives token shares, not token counts, so a token budget cannot be turned into "
                "a bound; give prepared-domain manifests or a YAML of token counts, or drop the budget "
                "to bound by max_usage x share (RegMix's form)"
            )
        if token_budget <= 0:
            raise ConfigError(f"token_budget={token_budget} must be > 0")
        return _feasible(np.minimum(max_usage * self.tokens_D / token_budget, 1.0))

    def subset(self, domains: tuple[str, ...] | list[str]) -> DomainPrior:
        """The prior over some of its domains, in the given order, shares renormalised over them (a
        search over the training domains of a prepared folder that also holds eval-only ones)."""
        domains = tuple(domains)
        missing = [d for d in domains if d not in self.domains]
        if missing or not domains or len(set(domains)) != len(domains):
            raise ConfigError(
                f"domains {list(domains)}: {'not in the prior: ' + str(missing) if missing else 'empty or repeated'}; "
                f"the prior has {list(self.domains)}"
            )
        order = [self.domains.index(d) for d in domains]
        shares_D = self.shares_D[order]
        tokens_D = None if self.tokens_D is None else self.tokens_D[order]
        return DomainPrior(domains, shares_D / shares_D.sum(), tokens_D)

    def reorder(self, domains: tuple[str, ...] | list[str]) -> DomainPrior:
        """The same prior with its domains in the given order; raises if the sets differ."""
        domains = tuple(domains)
        if set(domains) != set(self.domains):
            missing = sorted(set(domains) - set(self.domains))
            extra = sorted(set(self.domains) - set(domains))
            raise ConfigError(
                f"the prior's domains do not match: missing from the prior {missing}, not in the model "
                f"{extra}; use the prior the proxy mixtures were sampled from"
            )
        order = [self.domains.index(d) for d in domains]
        tokens_D = None if self.tokens_D is None else self.tokens_D[order]
        return DomainPrior(domains, self.shares_D[order], tokens_D)


def _feasible(bound_D: np.ndarray) -> np.ndarray:
    if bound_D.sum() < 1.0:
        raise ConfigError(
            f"no mixture fits the repetition bound: the largest allowed weights sum to {bound_D.sum():.3f} "
            "< 1; raise max_usage or lower the token budget"
        )
    return bound_D


def prior_from_mapping(values: Mapping[str, float]) -> DomainPrior:
    """{domain: token count} or {domain: share}. Values summing to 1 (within 1e-3) are read as
    shares (no token counts); anything else as token counts."""
    if not values:
        raise ConfigError("the prior is empty: give at least one domain with its tokens or share")
    domains = tuple(values)
    raw_D = np.asarray([float(values[d]) for d in domains], dtype=np.float64)
    if np.any(~np.isfinite(raw_D)) or np.any(raw_D < 0) or raw_D.sum() <= 0:
        raise ConfigError(f"prior values must be non-negative numbers with a positive sum, got {values}")
    if np.any(raw_D == 0):
        zero = [d for d, v in zip(domains, raw_D) if v == 0]
        raise ConfigError(f"prior domains {zero} have no tokens; remove them from the prior")
    shares_D = raw_D / raw_D.sum()
    is_share = abs(raw_D.sum() - 1.0) < _SHARE_TOLERANCE
    return DomainPrior(domains, shares_D, None if is_share else raw_D)


def load_prior(source: str | Path, domains: Sequence[str] | None = None) -> DomainPrior:
    """A prior from a prepared-data directory (`<dir>/<domain>/manifest.json`, field `tokens`: the
    train split's count, or a mapping with a `train` entry) or from a YAML file `{domain: tokens or
    share}` (a RegMix mixture YAML with a top-level `train:` mapping also works). `domains`: keep only
    these (e.g. leave out an eval-only target domain), shares renormalised over them."""
    prior = _load_prior(source)
    return prior if domains is None else prior.subset(domains)


def _load_prior(source: str | Path) -> DomainPrior:
    path = Path(source)
    if path.is_dir():
        manifests = sorted(path.glob("*/manifest.json"))
        if not manifests:
            raise ConfigError(f"{path}: no <domain>/manifest.json under it; run `mixlm prepare` first")
        return prior_from_mapping({m.parent.name: _manifest_tokens(m) for m in manifests})
    if not path.is_file():
        raise ConfigError(f"prior {path}: no such file or directory (a prepared-data dir or a YAML)")
    data = read_yaml_file(path)
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping {{domain: tokens or share}}, got {type(data).__name__}")
    values = {}
    for domain, value in data.items():
        # YAML reads 4e9 (no dot) as a string; token counts are often written that way.
        try:
            values[str(domain)] = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            values[str(domain)] = None
        if values[str(domain)] is None or isinstance(value, bool):
            raise ConfigError(f"{path}: {domain}: {value!r} is not a number of tokens or a share")
    return prior_from_mapping(values)


def _manifest_tokens(path: Path) -> float:
    """The train split's token count of a prepared domain's manifest.json."""
    try:
        return float(DomainManifest.load(path).splits["train"].tokens)
    except (ShardError, KeyError) as e:
        raise ConfigError(f"{path}: not a readable prepared-domain manifest ({e}); run `mixlm prepare` again") from None
