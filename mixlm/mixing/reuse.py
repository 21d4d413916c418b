"""Mixture reuse: fit over runs from sweeps whose domain sets differ from today's domain list.

    table, reused = reuse_runs([read_csv("old/mixtures.csv"), read_csv("new/mixtures.csv")], domains)
    print(reused.note())          # "reused 60 of 64 runs; dropped 4 that train on removed domains: ..."

Rows of several tables are pooled (ids must not repeat); a weight column a table lacks is weight 0 there
(that sweep did not train on the domain), a `metric/...` column it lacks is NaN. Against the current
domain list: a run that gives weight > 0 to a domain that is no longer in the list is dropped (its loss
was bought with data the new runs cannot have); every other run is kept, its weights over the current
domains unchanged (they still sum to 1). A domain no kept run trains on is reported: the fit cannot tell
its effect until runs that include it are added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixlm.errors import ConfigError
from mixlm.mixing.tables import METRIC_PREFIX, Table

ZERO_WEIGHT = 1e-12  # a weight at or below this is taken as 'not trained on'


@dataclass(frozen=True)
class ReusedRuns:
    """kept / dropped: run ids; removed: weight columns no longer in the domain list; added: listed domains
    no table had; untrained: listed domains no kept run trains on."""

    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    removed: tuple[str, ...]
    added: tuple[str, ...]
    untrained: tuple[str, ...]

    def note(self) -> str:
        parts = [f"reused {len(self.kept)} of {len(self.kept) + len(self.dropped)} runs"]
        if self.dropped:
            shown = ", ".join(str(i) for i in self.dropped[:10]) + (" ..." if len(self.dropped) > 10 else "")
            parts.append(f"dropped {len(self.dropped)} that train on removed domains {list(self.removed)}: runs {shown}")
        elif self.removed:
            parts.append(f"removed domains {list(self.removed)} had weight 0 in every run")
        if self.added:
            parts.append(f"new domains {list(self.added)}")
        if self.untrained:
            parts.append(
                f"no reused run trains on {list(self.untrained)}: the fit cannot tell their effect; sample and "
                "run mixtures that include them"
            )
        return "; ".join(parts)


def pool_tables(tables: Sequence[Table], *, missing_weight: float = 0.0) -> Table:
    """The rows of every table in one: columns in first-seen order; a weight column a table lacks is
    `missing_weight` there, a metric column NaN. Raises when a run id appears in two tables."""
    if not tables:
        raise ConfigError("no tables to pool")
    if len(tables) == 1:
        return tables[0]
    columns: list[str] = []
    for table in tables:
        columns += [c for c in table.columns if c not in columns]
    seen: dict[int, int] = {}
    for t, table in enumerate(tables):
        for i in table.index_N.tolist():
            if i in seen:
                raise ConfigError(
                    f"run id {i} is in table {seen[i] + 1} and table {t + 1}: renumber one sweep's index so "
                    "every run has its own id"
                )
            seen[i] = t
    blocks = []
    for table in tables:
        block_NxC = np.empty((len(table), len(columns)))
        for c, name in enumerate(columns):
            if name in table.columns:
                block_NxC[:, c] = table.values_NxC[:, table.columns.index(name)]
            else:
                block_NxC[:, c] = np.nan if name.startswith(METRIC_PREFIX) else missing_weight
        blocks.append(block_NxC)
    return Table(np.concatenate([t.index_N for t in tables]), tuple(columns), np.concatenate(blocks))


def reuse_runs(mixtures: Table | Sequence[Table], domains: Sequence[str] | None = None) -> tuple[Table, ReusedRuns]:
    """(table, report): the runs usable for a fit over `domains` (default: every weight column), as a
    mixtures table with exactly those weight columns, in that order (see the module docstring)."""
    table = pool_tables([mixtures] if isinstance(mixtures, Table) else list(mixtures))
    have = table.weight_columns()
    domains = tuple(have if domains is None else domains)
    if not domains or len(set(domains)) != len(domains):
        raise ConfigError(f"domains {list(domains)}: give each current training domain once")
    removed = tuple(d for d in have if d not in domains)
    added = tuple(d for d in domains if d not in have)
    removed_NxR = table.select(removed) if removed else np.zeros((len(table), 0))
    drop_N = (removed_NxR > ZERO_WEIGHT).any(axis=1)
    kept_index = table.index_N[~drop_N]
    weights_NxD = np.zeros((len(kept_index), len(domains)))
    for d, name in enumerate(domains):
        if name in have:
            weights_NxD[:, d] = table.values_NxC[~drop_N, table.columns.index(name)]
    untrained = tuple(
        d for j, d in enumerate(domains) if len(kept_index) and not (weights_NxD[:, j] > ZERO_WEIGHT).any()
    )
    report = ReusedRuns(
        tuple(kept_index.tolist()), tuple(table.index_N[drop_N].tolist()), removed, added, untrained
    )
    if not len(kept_index):
        raise ConfigError(f"no run is left for domains {list(domains)}: {report.note()}")
    return Table(kept_index, domains, weights_NxD), report
