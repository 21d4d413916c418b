"""Online data mixing: mixture weights that change while training, as strategies given to the train loop.

    from mixlm.mixing.online import DoReMi, OnlineMixingHook
    train(cfg, hooks=default_hooks(cfg, OnlineMixingHook(DoReMi(reference="runs/ref"))))
    mixlm train CONFIG mixing.kind=doremi 'mixing.options={reference: runs/ref}'     # the same from a config

Strategies (one module each, each citing its paper's update rule): `static` (the configured mixture), `doremi`
(Group DRO against a reference model), `ado` (per-domain scaling laws fitted online), `odm` (an EXP3 bandit with
the loss as reward), `aioli` (linear mixing laws estimated from short probes). The interface is
mixlm.mixing.online.base; the loop side (statistics in, weights out at step boundaries, identically on every
process, saved in the checkpoint with the weight history) is mixlm.mixing.online.hook.
"""

from __future__ import annotations

from mixlm.mixing.online.ado import ADO
from mixlm.mixing.online.aioli import Aioli
from mixlm.mixing.online.base import APPLY_MODES, Decision, DomainSignal, OnlineStrategy, build_strategy
from mixlm.mixing.online.doremi import DoReMi
from mixlm.mixing.online.odm import ODM
from mixlm.mixing.online.static import Static

STRATEGIES: dict[str, type[OnlineStrategy]] = {cls.kind: cls for cls in (Static, DoReMi, ADO, ODM, Aioli)}


def strategy_from_config(mixing) -> OnlineStrategy:
    """The strategy value a config's `mixing` section describes (kind, every, warmup_steps, options); raises a
    one-line ConfigError naming the key for an unknown kind or option or a value out of range."""
    from mixlm.errors import ConfigError

    cls = STRATEGIES.get(mixing.kind)
    if cls is None:
        raise ConfigError(f"mixing.kind={mixing.kind!r} is not known; use one of {', '.join(STRATEGIES)}")
    return build_strategy(cls, mixing.options, every=mixing.every, warmup_steps=mixing.warmup_steps)


def __getattr__(name: str):
    # The hook pulls in the train loop's modules (jax): imported only by whoever trains with it.
    if name == "OnlineMixingHook":
        from mixlm.mixing.online.hook import OnlineMixingHook

        return OnlineMixingHook
    raise AttributeError(name)


__all__ = ["ADO", "APPLY_MODES", "ODM", "STRATEGIES", "Aioli", "Decision", "DoReMi", "DomainSignal",
           "OnlineMixingHook", "OnlineStrategy", "Static", "build_strategy", "strategy_from_config"]
