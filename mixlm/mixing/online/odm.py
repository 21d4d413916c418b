"""`odm`: Online Data Mixing as an EXP3 bandit over domains (Albalak et al. 2023, "Efficient Online Data Mixing
For Language Model Pre-Training", arXiv 2312.02406, Algorithm 1), the training loss as the reward.

With K domains, the moving-average reward estimate R_i (alpha = 0.9) and round t:

    R_i        <- alpha * R_i + (1 - alpha) * r_i / pi_i         (importance-weighted reward of the arm played)
    eps_t       = min(1 / K, sqrt(ln K / (K * t)))
    pi_i        = (1 - K * eps_t) * exp(eps_{t-1} * R_i) / sum_j exp(eps_{t-1} * R_j) + eps_t

where r_i is the loss of domain i's examples (times `reward_scale`) and eps_0 = 1/K. The paper samples one domain
per batch; here every batch mixes domains, so each update is one round in which every domain with tokens was
played with probability pi_i (its sampling weight). A domain whose loss stays high gets more weight: a domain of
pure noise (loss at its entropy forever) is favoured, which the loss-as-reward rule cannot tell from a domain
that is merely hard (tests/test_online_mixing.py shows it; the benchmark reports what it costs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.online.base import Decision, DomainSignal, OnlineStrategy, vector


@dataclasses.dataclass(frozen=True)
class ODM(OnlineStrategy):
    kind = "odm"

    smoothing: float = 0.9  # alpha of the moving-average reward estimate
    reward_scale: float = 1.0  # r_i = reward_scale * (domain i's mean training loss over the window)

    def __post_init__(self):
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"mixing.options.smoothing={self.smoothing}: must be in [0, 1) (0.9 in the paper)")
        if not self.reward_scale > 0:
            raise ConfigError(f"mixing.options.reward_scale={self.reward_scale}: must be > 0")

    def start(self, domains: Sequence[str], weights: np.ndarray, natural: np.ndarray) -> tuple[dict, None]:
        k = len(domains)
        return {"rewards": [0.0] * k, "pi": list(map(float, weights)), "eps": 1.0 / k, "t": 0}, None

    def update(self, state: dict, signal: DomainSignal) -> tuple[dict, Decision]:
        rewards, pi = vector(state["rewards"]), vector(state["pi"])
        k = len(pi)
        played = (signal.tokens > 0) & (pi > 0)
        reward = self.reward_scale * np.where(played, signal.mean_loss(), 0.0)
        rewards = np.where(played, self.smoothing * rewards + (1 - self.smoothing) * reward / np.where(played, pi, 1),
                           rewards)
        t = int(state["t"]) + 1
        eps_prev, eps = float(state["eps"]), min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
        scaled = eps_prev * rewards
        soft = np.exp(scaled - scaled.max())
        pi = (1 - k * eps) * soft / soft.sum() + eps
        return {"rewards": rewards.tolist(), "pi": pi.tolist(), "eps": eps, "t": t}, Decision(pi)
