"""`static`: the configured mixture (and its stages) for the whole run; no update ever. The baseline every
online strategy is measured against, and what a run without `mixing.kind` does."""

from __future__ import annotations

import dataclasses

from mixlm.mixing.online.base import OnlineStrategy


@dataclasses.dataclass(frozen=True)
class Static(OnlineStrategy):
    kind = "static"
    min_domains = 1

    def due(self, state: dict, step: int) -> bool:
        return False
