"""Mixture and result tables in RegMix's CSV layout, and mixture YAMLs.

RegMix's layout (sail-sg/regmix data/*.csv): an integer `index` column that joins the files, then one
column per domain weight (the mixtures file) or per validation loss (the results file, columns named
`metric/<domain>_val_loss`). A sweep table holding both kinds in one file is fine: weight columns are
the ones that are not `metric/...` columns.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mixlm import storage
from mixlm.config import read_yaml_file
from mixlm.errors import ConfigError

INDEX = "index"
METRIC_PREFIX = "metric/"


def loss_column(domain: str) -> str:
    """The results-table column of a domain's validation loss (RegMix's name)."""
    return f"{METRIC_PREFIX}{domain}_val_loss"


def domain_loss_columns(domains: Sequence[str], columns: Sequence[str]) -> dict[str, str]:
    """{domain: its loss column} for the domains that have one among `columns`. RegMix names a
    domain `train_X` and its loss `metric/X_val_loss`; both that and `metric/<domain>_val_loss` match."""
    found = {}
    for domain in domains:
        for name in (domain, domain.removeprefix("train_")):
            if loss_column(name) in columns:
                found[domain] = loss_column(name)
                break
    return found


@dataclass(frozen=True)
class Table:
    """index_N: int run ids; columns: names of the C value columns; values_NxC: float64."""

    index_N: np.ndarray
    columns: tuple[str, ...]
    values_NxC: np.ndarray

    def __len__(self) -> int:
        return len(self.index_N)

    def select(self, names: Sequence[str], *, source: str = "table") -> np.ndarray:
        """The named columns as [N, len(names)]; an unknown name raises with the closest matches."""
        positions = []
        for name in names:
            if name not in self.columns:
                close = difflib.get_close_matches(name, self.columns, n=3, cutoff=0.3)
                raise ConfigError(f"{source}: no column {name!r}; close: {close or list(self.columns)[:8]}")
            positions.append(self.columns.index(name))
        return self.values_NxC[:, positions]

    def weight_columns(self) -> tuple[str, ...]:
        """Columns that hold mixture weights: every column except `metric/...` ones."""
        return tuple(c for c in self.columns if not c.startswith(METRIC_PREFIX))

    def rows(self, index_M: np.ndarray) -> Table:
        """The rows with these ids, in this order; ids missing from the table raise."""
        where = {int(i): r for r, i in enumerate(self.index_N)}
        missing = [int(i) for i in index_M if int(i) not in where]
        if missing:
            raise ConfigError(f"index values {missing[:10]} are not in the table")
        picks = [where[int(i)] for i in index_M]
        return Table(self.index_N[picks], self.columns, self.values_NxC[picks])


def read_csv(path: str | Path) -> Table:
    """Reads a table with an `index` column and numeric value columns (empty cells become NaN); `path` may be
    local or on an object store."""
    path = storage.location(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such CSV file")
    reader = csv.reader(io.StringIO(path.read_text(), newline=""))
    header = next(reader, None)
    if not header or INDEX not in header:
        raise ConfigError(
            f"{path}: the first row must be a header with an {INDEX!r} column (RegMix layout)"
        )
    body = [row for row in reader if row]
    at = header.index(INDEX)
    columns = tuple(h for i, h in enumerate(header) if i != at)
    index_N = np.empty(len(body), dtype=np.int64)
    values_NxC = np.empty((len(body), len(columns)), dtype=np.float64)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise ConfigError(f"{path}: row {r + 2} has {len(row)} cells, the header has {len(header)}")
        try:
            index_N[r] = int(float(row[at]))
            values_NxC[r] = [float(v) if v.strip() else math.nan for i, v in enumerate(row) if i != at]
        except ValueError as e:
            raise ConfigError(f"{path}: row {r + 2} is not numeric ({e})") from None
    if len(set(index_N.tolist())) != len(index_N):
        raise ConfigError(f"{path}: the {INDEX!r} column has repeated values; each run needs its own id")
    return Table(index_N, columns, values_NxC)


def csv_text(table: Table) -> str:
    """`index` then the value columns, as CSV text; floats in repr form, so a read gives them back exactly."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([INDEX, *table.columns])
    for i, row in zip(table.index_N, table.values_NxC):
        writer.writerow([int(i), *(repr(float(v)) for v in row)])
    return out.getvalue()


def write_csv(path: str | Path, table: Table) -> None:
    """Writes the table (csv_text) whole: a reader sees the old file or the new one (storage.write_atomic)."""
    storage.write_atomic(path, csv_text(table))


def mixtures_table(
    mixtures: Sequence[Mapping[str, float]], domains: Sequence[str], first_index: int = 1
) -> Table:
    """Mixture dicts as a table with one column per domain (absent domains weigh 0); ids count up
    from `first_index` (RegMix numbers runs from 1)."""
    domains = tuple(domains)
    for m in mixtures:
        unknown = set(m) - set(domains)
        if unknown:
            raise ConfigError(f"mixture has domains {sorted(unknown)} that are not in {list(domains)}")
    values_NxD = np.array([[float(m.get(d, 0.0)) for d in domains] for m in mixtures], dtype=np.float64)
    index_N = np.arange(first_index, first_index + len(mixtures), dtype=np.int64)
    return Table(index_N, domains, values_NxD.reshape(len(mixtures), len(domains)))


NEGLIGIBLE_WEIGHT = 1e-6  # a share below this is a numerical leftover (1.456e-37 from an average), not data


def clean_weights(weights: Mapping[str, float], threshold: float = NEGLIGIBLE_WEIGHT) -> dict[str, float]:
    """`weights` normalised, with every share below `threshold` set to 0 and the rest renormalised to sum
    to 1; the domains and their order are kept. Unchanged (as floats) when nothing is that small."""
    total = sum(float(w) for w in weights.values())
    if total <= 0:
        return {d: float(w) for d, w in weights.items()}
    shares = {d: float(w) / total for d, w in weights.items()}
    if not any(0 < w < threshold for w in shares.values()):
        return {d: float(w) for d, w in weights.items()}
    kept = {d: (w if w >= threshold else 0.0) for d, w in shares.items()}
    norm = sum(kept.values())
    return {d: w / norm for d, w in kept.items()}


def write_mixture_yaml(path: str | Path, weights: Mapping[str, float], comment: str = "") -> None:
    """Writes `{domain: weight}` (the form `mixlm train` takes as data.mixture), leaving out domains of
    weight 0 (and below NEGLIGIBLE_WEIGHT of the total, see `clean_weights`) so a run never opens data it
    will not read."""
    kept = {d: float(f"{w:.10g}") for d, w in clean_weights(weights).items() if w > 0}
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    storage.write_atomic(path, head + yaml.safe_dump(kept, sort_keys=False))  # a run folder may be on a bucket


def read_mixture_yaml(path: str | Path) -> dict[str, float]:
    """`{domain: weight}` from our mixture YAML, a `{weights: {...}}` one, or RegMix's `{train: {...}}`."""
    path = Path(path)
    data = read_yaml_file(path)
    if isinstance(data, dict):
        for key in ("weights", "train"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ConfigError(f"{path}: expected a mapping {{domain: weight}}")
    return {str(d): float(w) for d, w in data.items()}
