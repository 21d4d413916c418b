"""Random-mixture specs: `data.mixture` as a reproducible list of RegMix-sampled mixtures, one picked by
`data.mixture_index` when the config is resolved (mixlm.run_config).

A spec is a mixture mapping with a single `random:` key (usually in its own YAML, e.g.
configs/mixtures/random/pile-17-1b.yaml):

    random:
      prior: ../pile-17-token-prior.yaml  # {domain: tokens or share}: a path relative to this file, or inline
      count: 64                         # the list holds this many mixtures; data.mixture_index picks 1..count
      seed: 42
      # optional, RegMix's defaults (mixlm.mixing.sample.sample_mixtures): temperature, min_strength,
      # max_strength, num_strengths, max_usage, token_budget, minimum, oversample; domains: a subset

Mixture k of the spec is exactly `mixture_000k.yaml` of `mixlm mix sample --prior PRIOR -n COUNT --seed SEED`
with the same settings (same sampler, same rounding, zero weights left out), and does not depend on which
k is asked for. Loading stays free of side effects: the draw is numpy arithmetic on the prior.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixlm.config import load_yaml
from mixlm.errors import ConfigError
from mixlm.mixing.prior import load_prior, prior_from_mapping
from mixlm.mixing.sample import sample_mixtures

SPEC_KEY = "random"
# Keys of a spec besides prior/count/seed: sample_mixtures' keyword arguments, with their types.
SAMPLER_KEYS: dict[str, type] = {
    "temperature": float, "min_strength": float, "max_strength": float, "num_strengths": int,
    "max_usage": float, "token_budget": float, "minimum": float, "oversample": int,
}


def is_random_spec(mixture: Any) -> bool:
    """True for a `{random: {...}}` mapping (a spec), False for an ordinary mixture."""
    return isinstance(mixture, Mapping) and set(mixture) == {SPEC_KEY}


def resolve_random_mixture(data: Mapping, origin: Mapping[str, str]) -> dict:
    """The `data` section with a `random:` spec in data.mixture replaced by mixture data.mixture_index of it
    (`{domain: weight}`); `data` unchanged when its mixture is an ordinary one. `origin` ('data.mixture' ->
    the file or override that set it) locates a relative prior path and names the culprit in errors.

    Raises a one-line ConfigError: a spec with data.mixture_index 0 (none chosen) or above its count, a
    malformed spec, or data.mixture_index given on the command line with an ordinary mixture."""
    data = dict(data)
    index = data.get("mixture_index", 0)
    where = origin.get("data.mixture", "data.mixture")
    if not is_random_spec(data.get("mixture")):
        set_by = str(origin.get("data.mixture_index", ""))
        if index and set_by.startswith("override"):  # a saved config.yaml keeps its index as a record
            raise ConfigError(
                f"{set_by}: data.mixture_index picks one mixture of a `random:` spec, but data.mixture ({where}) "
                "is an ordinary mixture; drop data.mixture_index or set data.mixture to a spec such as "
                "configs/mixtures/random/pile-17-1b.yaml"
            )
        if index and str(where).startswith("override"):  # a sweep replaced the spec the file's index was for
            data["mixture_index"] = 0
        return data
    spec = data["mixture"][SPEC_KEY]
    count = _spec_count(spec, where)
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= count:
        raise ConfigError(
            f"{where}: data.mixture is a list of {count} random mixtures; choose one with "
            f"data.mixture_index=1..{count} (got {index!r})"
        )
    data["mixture"] = dict(_cached_mixtures(spec, origin_dir(where), where)[index - 1])
    return data


def _cached_mixtures(spec: Mapping, base_dir: Path, where: str) -> tuple[dict[str, float], ...]:
    """`random_mixtures`, drawn once per spec, folder and prior file content in this process (a sweep or a test
    loads the same spec many times; a changed prior file is a new key)."""
    prior = spec.get("prior") if isinstance(spec, Mapping) else None
    prior_path = base_dir / Path(prior).expanduser() if isinstance(prior, str) and prior else None
    prior_text = prior_path.read_text() if prior_path is not None and prior_path.is_file() else ""
    key = (json.dumps(spec, sort_keys=True, default=str), str(base_dir), prior_text, where)
    if key not in _DRAWN:
        _DRAWN[key] = tuple(random_mixtures(spec, base_dir, where))
    return _DRAWN[key]


_DRAWN: dict[tuple, tuple[dict[str, float], ...]] = {}


def random_mixtures(spec: Mapping, base_dir: Path, where: str = "data.mixture") -> list[dict[str, float]]:
    """Every mixture of a spec (the mapping under `random:`), in index order 1..count, each `{domain:
    weight}` without its zero weights, rounded as `mixlm mix sample` writes them. `base_dir`: where a
    relative prior path is found."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: `random:` must be a mapping with prior, count and seed, got {spec!r}")
    unknown = set(spec) - {"prior", "count", "seed", "domains", *SAMPLER_KEYS}
    if unknown:
        raise ConfigError(
            f"{where}: random.{min(unknown)} is not a spec key; use prior, count, seed, domains or "
            f"{', '.join(SAMPLER_KEYS)}"
        )
    count = _spec_count(spec, where)
    seed = spec.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}: random.seed must be an integer >= 0 (RegMix used 42), got {seed!r}")
    prior_value = spec.get("prior")
    domains = spec.get("domains")
    if domains is not None and not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
        raise ConfigError(f"{where}: random.domains must be a list of domain names, got {domains!r}")
    if isinstance(prior_value, Mapping):
        prior = prior_from_mapping({str(k): _number(v, f"random.prior.{k}", where) for k, v in prior_value.items()})
        prior = prior if domains is None else prior.subset(domains)
    elif isinstance(prior_value, str) and prior_value:
        path = Path(prior_value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            prior = load_prior(path, domains)
        except ConfigError as e:
            raise ConfigError(f"{where}: random.prior: {e}") from None
    else:
        raise ConfigError(
            f"{where}: random.prior must be a prior YAML path (relative to the spec's file) or an inline "
            f"{{domain: tokens or share}} mapping, got {prior_value!r}"
        )
    settings = {}
    for key, kind in SAMPLER_KEYS.items():
        if spec.get(key) is not None:
            value = _number(spec[key], f"random.{key}", where)
            if kind is int and value != int(value):
                raise ConfigError(f"{where}: random.{key} must be an integer, got {spec[key]!r}")
            settings[key] = kind(value)
    try:
        mixtures = sample_mixtures(prior, count, seed, **settings)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return [{d: float(f"{w:.10g}") for d, w in m.items() if w > 0} for m in mixtures]


def origin_dir(where: str) -> Path:
    """The folder a spec's relative prior path is relative to: that of the file that set data.mixture
    (an experiment or mixture YAML), of the mixture file named by a `data.mixture=PATH` override, else
    the working directory (an inline spec given on the command line)."""
    if where.startswith("override "):  # `override 'data.mixture=PATH'` (mixlm.config.load_config_and_origin's origin)
        try:
            text = ast.literal_eval(where[len("override "):])
        except (ValueError, SyntaxError):
            return Path.cwd()
        value = text.split("=", 1)[1] if isinstance(text, str) and "=" in text else ""
        try:
            is_path = isinstance(load_yaml(value, where), str)
        except ConfigError:
            is_path = False
        return Path(value.strip()).parent if is_path else Path.cwd()
    path = Path(where)
    return path.parent if path.suffix in (".yaml", ".yml") else Path.cwd()


def _spec_count(spec: Any, where: str) -> int:
    count = spec.get("count") if isinstance(spec, Mapping) else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{where}: random.count must be an integer >= 1 (RegMix trained 64), got {count!r}")
    return count


def _number(value: Any, key: str, where: str) -> float:
    # YAML 1.1 reads 2e-4 (no dot) as a string: accept numbers written that way.
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
