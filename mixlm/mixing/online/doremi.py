"""`doremi`: Group-DRO domain reweighting against a reference model (Xie et al. 2023, "DoReMi: Optimizing Data
Mixtures Speeds Up Language Model Pretraining", arXiv 2305.10429, Algorithm 1).

At each update t, with the proxy's and the reference's per-token losses l_theta, l_ref on the examples of domain i:

    lambda_t[i] = sum_{x in domain i} sum_j max(l_theta,j(x) - l_ref,j(x), 0) / sum_{x in domain i} |x|
    alpha'_t    = alpha_{t-1} * exp(eta * lambda_t)                   (exponentiated gradient ascent)
    alpha_t     = (1 - c) * alpha'_t / sum(alpha'_t) + c * u           (smoothing towards uniform u)

with eta = 1 and c = 1e-3 (the paper's values), alpha_0 = u. The proxy is trained on the objective
sum_i alpha_t[i] * (its loss on domain i), sampling stays at the configured (in the paper, uniform) mixture:
alpha is applied as objective weights. The run's output is the average of alpha over the steps (mixlm writes
mixture_average.yaml), trained by a later static run. The paper updates every step inside the step; here an
update after step t sets the weights of steps t+1.. (mixing.every=1: one step late), and a longer cadence uses
the excess summed over its steps. The recipe, as commands: docs/online-mixing.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.online.base import Decision, DomainSignal, OnlineStrategy, normalised, vector


@dataclasses.dataclass(frozen=True)
class DoReMi(OnlineStrategy):
    kind = "doremi"
    applies_as = "objective"
    needs_reference = True

    step_size: float = 1.0  # eta
    smoothing: float = 1e-3  # c
    reference: str = ""  # the reference run's folder (its newest checkpoint) or one checkpoint step folder

    def __post_init__(self):
        if not self.step_size > 0:
            raise ConfigError(f"mixing.options.step_size={self.step_size}: must be > 0 (DoReMi's eta, 1.0 in the paper)")
        if not 0 <= self.smoothing <= 1:
            raise ConfigError(f"mixing.options.smoothing={self.smoothing}: must be in [0, 1] (1e-3 in the paper)")
        if not self.reference:
            raise ConfigError("mixing.kind=doremi needs mixing.options.reference: the output folder of a reference "
                              "run (e.g. `mixlm train CONFIG data.mixture=uniform.yaml train.output_dir=runs/ref`)")

    def start(self, domains: Sequence[str], weights: np.ndarray, natural: np.ndarray) -> tuple[dict, Decision]:
        alpha = np.full(len(domains), 1.0 / len(domains))
        return {"alpha": alpha.tolist()}, Decision(alpha)

    def update(self, state: dict, signal: DomainSignal) -> tuple[dict, Decision]:
        if signal.excess is None:
            raise ValueError("doremi needs the per-domain excess loss over a reference (DomainSignal.excess)")
        excess = np.where(signal.tokens > 0, signal.excess / np.maximum(signal.tokens, 1.0), 0.0)
        alpha = vector(state["alpha"])
        uniform = np.full(len(alpha), 1.0 / len(alpha))
        # In log space: exp(eta * lambda) of a long window's excess must not overflow before normalising.
        logits = np.log(alpha) + self.step_size * excess
        alpha = (1 - self.smoothing) * normalised(np.exp(logits - logits.max())) + self.smoothing * uniform
        return {"alpha": alpha.tolist()}, Decision(alpha)
