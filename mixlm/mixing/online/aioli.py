"""`aioli`: mixing-law parameters estimated online from short probes (Chen et al. 2024, "Aioli: A Unified
Optimization Framework for Language Model Data Mixing", arXiv 2411.05735, Algorithms 1 and 2; HazyResearch/aioli).

Aioli assumes the linear dynamic mixing law L_{t+1}(p) = L_t - A_t p. Each round of `every` steps starts with
LearnParams: `sweeps` passes over the K domains in a shuffled order, each probe training `probe_steps` steps on a
smoothed one-hot mixture (factor f = 0.625 on domain j, the rest shared evenly) and measuring every domain's
validation loss, so that, averaged over the sweeps,

    G[:, j] = mean over probes of j of (loss before - loss after)       = A_t W^T,  W[j] = the probe mixture of j
    A_t[i]  = solve(W, G[i])
    A_t     = (A_t - min(A_t, 0)) / sum(A_t - min(A_t, 0))              (normalised, entries >= 0)
    p_t     = p_{t-1} * exp(eta * sum_i A_t[i, :]); p_t /= sum(p_t)      (exponentiated gradient, eta = 0.2)

and the rest of the round trains on p_t. Probes are training steps of the run (they count towards train.steps,
as in the paper) and their mixtures are kept out of the run's averaged mixture. p_0 is the configured mixture
(the paper's unrestricted setting starts from uniform: configure the uniform mixture for that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.online.base import Decision, DomainSignal, OnlineStrategy, normalised, vector


@dataclasses.dataclass(frozen=True)
class Aioli(OnlineStrategy):
    kind = "aioli"
    measures_validation = True
    default_every = 0  # 0: twice the steps LearnParams takes

    step_size: float = 0.2  # eta
    sweeps: int = 4  # lp_rounds
    probe_steps: int = 4  # lp_steps
    one_hot_factor: float = 0.625
    seed: int = 0  # the probe order

    def __post_init__(self):
        if not self.step_size > 0:
            raise ConfigError(f"mixing.options.step_size={self.step_size}: must be > 0 (Aioli's eta)")
        if self.sweeps < 1 or self.probe_steps < 1:
            raise ConfigError(f"mixing.options.sweeps={self.sweeps}, probe_steps={self.probe_steps}: both must be >= 1")
        if not 0 < self.one_hot_factor <= 1:
            raise ConfigError(f"mixing.options.one_hot_factor={self.one_hot_factor}: must be in (0, 1]")

    def probe_length(self, num_domains: int) -> int:
        """Steps LearnParams takes each round."""
        return self.sweeps * num_domains * self.probe_steps

    def round_length(self, num_domains: int) -> int:
        rounds = self.every or 2 * self.probe_length(num_domains)
        if rounds <= self.probe_length(num_domains):
            raise ConfigError(f"mixing.every={rounds}: an Aioli round must be longer than its probes (sweeps "
                              f"{self.sweeps} x {num_domains} domains x probe_steps {self.probe_steps} = "
                              f"{self.probe_length(num_domains)} steps); raise mixing.every or lower sweeps/probe_steps")
        return rounds

    def probe_mixture(self, j: int, num_domains: int) -> np.ndarray:
        w = np.full(num_domains, (1 - self.one_hot_factor) / (num_domains - 1))
        w[j] = self.one_hot_factor
        return w

    def start(self, domains: Sequence[str], weights: np.ndarray, natural: np.ndarray) -> tuple[dict, None]:
        self.round_length(len(domains))  # refuse a round too short for its probes before training
        if abs(self.one_hot_factor - 1 / len(domains)) < 1e-9:
            raise ConfigError(f"mixing.options.one_hot_factor={self.one_hot_factor} = 1/{len(domains)} domains: "
                              "every probe would be the uniform mixture and A cannot be solved; use e.g. 0.625")
        return {"phase": "train", "next": self.warmup_steps, "round": 0, "weights": list(map(float, weights)),
                "order": [], "probe": 0, "before": None, "gains": None}, None

    def due(self, state: dict, step: int) -> bool:
        return step == state["next"]

    def needs_validation(self, state: dict, step: int) -> bool:
        return self.due(state, step)

    def update(self, state: dict, signal: DomainSignal) -> tuple[dict, Decision]:
        if signal.val_loss is None:
            raise ValueError("aioli needs the validation loss at each probe (DomainSignal.val_loss)")
        k = len(signal.domains)
        loss = vector(signal.val_loss)
        if state["phase"] == "train":  # a round begins: LearnParams
            rng = np.random.default_rng([self.seed, int(state["round"])])
            order = np.concatenate([rng.permutation(k) for _ in range(self.sweeps)]).tolist()
            state = {**state, "phase": "probe", "order": order, "probe": 0, "before": loss.tolist(),
                     "gains": np.zeros((k, k)).tolist(), "start": signal.step, "next": signal.step + self.probe_steps}
            return state, Decision(self.probe_mixture(order[0], k), probe=True)
        j = state["order"][state["probe"]]
        gains = vector(state["gains"])
        gains[:, j] += vector(state["before"]) - loss
        probe = state["probe"] + 1
        if probe < len(state["order"]):
            state = {**state, "probe": probe, "before": loss.tolist(), "gains": gains.tolist(),
                     "next": signal.step + self.probe_steps}
            return state, Decision(self.probe_mixture(state["order"][probe], k), probe=True)
        weights = self.weights_from_gains(vector(state["weights"]), gains / self.sweeps)
        state = {**state, "phase": "train", "round": state["round"] + 1, "weights": weights.tolist(), "gains": None,
                 "before": None, "next": state["start"] + self.round_length(k)}
        return state, Decision(weights)

    def weights_from_gains(self, weights: np.ndarray, gains_KxK: np.ndarray) -> np.ndarray:
        """Algorithm 2's solve of A from the probes' mean loss decreases, its normalisation, and the EG step."""
        k = len(weights)
        mixtures_KxK = np.stack([self.probe_mixture(j, k) for j in range(k)])
        a_KxK = np.stack([np.linalg.solve(mixtures_KxK, row) for row in gains_KxK])
        a_KxK = a_KxK - min(a_KxK.min(), 0.0)
        total = a_KxK.sum()
        a_KxK = a_KxK / total if total > 0 else np.full((k, k), 1.0 / (k * k))
        logits = np.log(weights) + self.step_size * a_KxK.sum(axis=0)
        return normalised(np.exp(logits - logits.max()))
