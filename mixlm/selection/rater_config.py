"""Rater configs: a YAML list of raters (signal columns with a direction and where each comes from), mapped
to the `mixlm select` commands that compute them and to what `pick` / `metarater` take.

    cfg = load_rater_config("configs/selection/metarater-25.yaml")
    cfg.rule_columns()            # `select signals` (rule-based signals) computes these
    cfg.input_columns()           # `select signals --rating-columns a,b` keeps these fields of the input
    cfg.dsir_targets()            # `select dsir --target NAME=PATH` per target → dsir_<NAME>
    cfg.model_raters({"fineweb_edu": "models/fineweb-edu", ...})   # `select rate --config` settings
    cfg.pick_weights()            # equal weights + directions for `select pick --weights`
    cfg.rater_specs()             # ["col:high", "col:low", ...] for `select metarater --raters`

A config file:

    models:                       # model folders, given as --model NAME=DIR (or `path:` here)
      qurater: {columns: [writing_style, ...], activation: none, hub: princeton-nlp/QuRater-1.3B}
    raters:                       # the raters, each with a column and a direction
      - {name: dsir_books, source: dsir, target: books, column: dsir_books, higher_is_better: true}
      - {name: qurater_writing_style, source: model, model: qurater, column: qurater_writing_style, ...}
    extra: [...]                  # optional raters beyond the set (same form), used with include_extra=True

`source` is one of rules | input | dsir | model | perplexity. Loading has no side effects; a rater whose
model folder is not given fails in `model_raters` with one line naming the rater and the flag to set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mixlm.selection import SelectionError, load_yaml_file
from mixlm.selection.model_scoring import COLUMNS, output_columns, rater_folder_problem

SOURCES = ("rules", "input", "dsir", "model", "perplexity")


@dataclass(frozen=True)
class Rater:
    name: str  # the rater's name in the paper / dataset (e.g. rps_doc_frac_no_alph_words)
    source: str  # one of SOURCES
    column: str  # the mixlm signal column holding it
    higher_is_better: bool
    model: str | None = None  # source model: the models entry
    target: str | None = None  # source dsir: the target set's name
    note: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    columns: tuple[str, ...] = ()  # output names in order (prefixed NAME_); () = the model's own labels
    activation: str = "auto"
    path: str | None = None
    hub: str | None = None  # where the published model lives (documentation; nothing is downloaded)
    note: str = ""

    def produced_columns(self) -> list[str] | None:
        """The columns `select rate` writes for this model, when the config fixes them."""

        return output_columns(self.name, self.columns, self.columns) if self.columns else None


@dataclass
class RaterConfig:
    path: Path
    raters: list[Rater]
    extra: list[Rater] = field(default_factory=list)
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def selected(self, include_extra: bool = False) -> list[Rater]:
        return self.raters + (self.extra if include_extra else [])

    def _of(self, source: str, include_extra: bool) -> list[Rater]:
        return [r for r in self.selected(include_extra) if r.source == source]

    def rule_columns(self, include_extra: bool = False) -> list[str]:
        return [r.column for r in self._of("rules", include_extra)]

    def input_columns(self, include_extra: bool = False) -> list[str]:
        return [r.column for r in self._of("input", include_extra)]

    def dsir_targets(self, include_extra: bool = False) -> list[str]:
        return list(dict.fromkeys(r.target for r in self._of("dsir", include_extra)))

    def needs_perplexity(self, include_extra: bool = False) -> bool:
        return bool(self._of("perplexity", include_extra))

    def model_names(self, include_extra: bool = False) -> list[str]:
        return list(dict.fromkeys(r.model for r in self._of("model", include_extra)))

    def model_raters(self, model_dirs: Mapping[str, str], include_extra: bool = False
                     ) -> tuple[tuple[str, str, tuple[str, ...], str], ...]:
        """`TableSettings.model_raters` for every model the (selected) raters need; the folder of model NAME
        is model_dirs[NAME], else the config's models.NAME.path. Raises naming the first rater without one."""

        out = []
        for name in self.model_names(include_extra):
            spec = self.models[name]
            folder = model_dirs.get(name) or spec.path
            if not folder or rater_folder_problem(folder):
                rater = next(r.name for r in self._of("model", include_extra) if r.model == name)
                where = f" (a local copy of {spec.hub})" if spec.hub else ""
                found = f": {rater_folder_problem(folder)}" if folder else " is not given"
                raise SelectionError(f"rater {rater} ({self.path.name}) needs the model folder {name!r}, which"
                                     f"{found}; pass --model {name}=DIR{where} or set models.{name}.path")
            out.append((name, str(Path(folder).resolve()), spec.columns, spec.activation))
        return tuple(out)

    def pick_weights(self, include_extra: bool = False) -> dict[str, dict]:
        """Equal weights with each rater's direction: a `select pick --weights` mapping."""
        raters = self.selected(include_extra)
        return {r.column: {"weight": 1.0 / len(raters), "higher_is_better": r.higher_is_better} for r in raters}

    def rater_specs(self, include_extra: bool = False) -> list[str]:
        """['col:high', 'col:low', ...]: `select metarater --raters` (and `metarater.parse_raters`)."""
        return [f"{r.column}:{'high' if r.higher_is_better else 'low'}" for r in self.selected(include_extra)]


def _rater(entry, where: str, models: Mapping[str, ModelSpec]) -> Rater:
    from mixlm.selection.signals import SIGNAL_NAMES

    if not isinstance(entry, dict) or not {"name", "source", "column", "higher_is_better"} <= set(entry):
        raise SelectionError(f"{where}: a rater needs name, source, column and higher_is_better; got {entry!r}")
    unknown = set(entry) - {"name", "source", "column", "higher_is_better", "model", "target", "note"}
    if unknown:
        raise SelectionError(f"{where} ({entry['name']}): unknown keys {sorted(unknown)}")
    rater = Rater(**entry)
    if rater.source not in SOURCES:
        raise SelectionError(f"{where} ({rater.name}): source {rater.source!r}; use one of {SOURCES}")
    if not isinstance(rater.higher_is_better, bool):
        raise SelectionError(f"{where} ({rater.name}): higher_is_better must be true or false")
    if rater.source == "rules" and rater.column not in SIGNAL_NAMES:
        raise SelectionError(f"{where} ({rater.name}): {rater.column!r} is not a rule signal (`mixlm select list`)")
    if rater.source == "dsir" and (not rater.target or rater.column != f"dsir_{rater.target}"):
        raise SelectionError(f"{where} ({rater.name}): a dsir rater needs a target NAME and column dsir_NAME")
    if rater.source == "model":
        if rater.model not in models:
            raise SelectionError(f"{where} ({rater.name}): model {rater.model!r} is not under models:")
        produced = models[rater.model].produced_columns()
        if produced is not None and rater.column not in produced:
            raise SelectionError(f"{where} ({rater.name}): model {rater.model} writes {produced}, not {rater.column!r}")
    if rater.source == "perplexity" and rater.column not in COLUMNS:
        raise SelectionError(f"{where} ({rater.name}): perplexity columns are {COLUMNS}")
    return rater


def load_rater_config(path: str | Path) -> RaterConfig:
    """Reads and checks a rater config (see the module docstring); raises SelectionError naming the entry."""
    path = Path(path)
    doc = load_yaml_file(path, "rater config")
    if not isinstance(doc, dict) or not isinstance(doc.get("raters"), list):
        raise SelectionError(f"rater config {path}: expected a mapping with a `raters:` list")
    models = {}
    for name, spec in (doc.get("models") or {}).items():
        spec = dict(spec or {})
        spec["columns"] = tuple(spec.get("columns") or ())
        try:
            models[name] = ModelSpec(name=name, **spec)
        except TypeError as e:
            raise SelectionError(f"rater config {path}: models.{name}: {e}") from None
    raters = [_rater(e, f"{path}: raters[{i}]", models) for i, e in enumerate(doc["raters"])]
    extra = [_rater(e, f"{path}: extra[{i}]", models) for i, e in enumerate(doc.get("extra") or [])]
    columns = [r.column for r in raters + extra]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise SelectionError(f"rater config {path}: columns {duplicates} are listed twice")
    return RaterConfig(path, raters, extra, models)
