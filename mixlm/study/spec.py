"""A study YAML: what `mixlm study run STUDY.yaml` does, read and checked before anything runs.

    spec = load_study("configs/studies/demo.yaml", ["validation.seeds=[0,1,2]"])

Every key has a type and a default (the dataclasses below are the schema); an unknown key, a value of the wrong
type or a rule broken across keys is one ConfigError naming the file and the dotted key (`mixlm study` exits 2).
Paths of files that describe the study (experiment configs, baseline mixtures) are relative to the study file,
as `base:` and section paths are in experiment configs; data and output folders are relative to the working
directory, as `data.prepared_dir` and `train.output_dir` are. Overrides are `dotted.key=value` (YAML values),
applied to the file's tree before it is checked.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlm.config import closest_keys, load_yaml, read_yaml_file
from mixlm.errors import ConfigError

NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")  # scale, baseline and knob-variant names: folder-safe
FIXED_BASELINES = ("natural", "uniform")


@dataclass(frozen=True)
class DemoData:
    """The demo corpus (mixlm.data.demo_corpus), made by the study's data stage: a study that needs no files."""

    docs_per_domain: int = 1500
    vocab_size: int = 1024
    seed: int = 0
    targets: list[str] = field(default_factory=lambda: ["office"])  # eval-only domains it also prepares


@dataclass(frozen=True)
class DataSpec:
    prepared_dir: str = ""  # a `mixlm prepare` folder (relative to the working directory)
    demo: DemoData | None = None  # instead of prepared_dir: the demo corpus
    domains: list[str] = field(default_factory=list)  # the domains mixed (default: every prepared one not in target)
    target: list[str] = field(default_factory=list)  # the search minimises the mean of these domains' val loss


@dataclass(frozen=True)
class PriorSpec:
    """The sampler's prior (`mix sample` flags) and the repetition bound every mixture obeys."""

    temperature: float = 0.5
    min_strength: float = 0.1
    max_strength: float = 5.0
    num_strengths: int = 15
    max_epochs: float = 15.0
    token_budget: Any = "target"  # 'target' (the validation run's tokens), 'data' (RegMix: all the data), tokens
    minimum: float = 2e-4


@dataclass(frozen=True)
class ScaleSpec:
    """One proxy size or budget: an experiment config (+ overrides) the sweeps train."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    mixtures: int = 0  # how many of round 0's mixtures this scale trains (0: all)
    swarm: int = 0  # `mixlm sweep --swarm K` (0: --parallel)
    parallel: int = 0  # `mixlm sweep --parallel N` when swarm is 0 (0: one after another in this process)
    devices: int = 0  # what one sweep process holds, for the cost (0: cost.proxy_devices)


@dataclass(frozen=True)
class FitSpec:
    regressors: list[str] = field(default_factory=list)  # `mix fit --regressors` (empty: its default panel)
    folds: int = 5
    repeats: int = 0  # 0: mix fit's default
    seed: int = 0


@dataclass(frozen=True)
class ProposeSpec:
    """`mix optimize`'s flags (the constraints); the repetition bound comes from `prior`."""

    samples: int = 100_000
    top_k: int = 128
    seed: int = 0
    max_kl: float | None = None
    max_l1: float | None = None
    min_weight: Any = 0.0  # one weight, or {domain: weight}
    max_weight: Any = 1.0
    zero_below: float = 1e-4


@dataclass(frozen=True)
class SearchSpec:
    mixtures: int
    scales: list[ScaleSpec]
    seed: int = 0
    scale: str = ""  # the scale the fit and the refinement rounds use (default: the first)
    fit: FitSpec = field(default_factory=FitSpec)
    propose: ProposeSpec = field(default_factory=ProposeSpec)


@dataclass(frozen=True)
class RefineSpec:
    """Refinement rounds: sample around the current proposal, train at the search scale, refit, propose again."""

    rounds: int = 0
    mixtures: int = 8  # per round, the previous proposal included
    min_strength: float = 20.0  # Dirichlet concentrations around the proposal (larger: closer to it)
    max_strength: float = 200.0
    num_strengths: int = 5
    stop_below: float = 0.02  # stop when the proposal moved less than this (L1 of the weights) in a round


@dataclass(frozen=True)
class BaselineSpec:
    """A mixture the proposal is validated against: natural (token shares), uniform, a mixture YAML, or an online
    strategy (`mixing.kind`, issue 27) started from the natural mixture."""

    name: str
    mixture: str = ""
    online: str = ""
    overrides: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.online:
            return "online"
        return "mixture" if self.mixture else self.name


@dataclass(frozen=True)
class ValidationSpec:
    config: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    baselines: list[BaselineSpec] = field(default_factory=lambda: [BaselineSpec("natural"), BaselineSpec("uniform")])


@dataclass(frozen=True)
class ExportSpec:
    enabled: bool = True
    verify: bool = True
    dtype: str = "float32"
    candidates: list[str] = field(default_factory=list)  # which validated models (default: all), first seed


@dataclass(frozen=True)
class EvalSpec:
    enabled: bool = True
    domains: bool = True  # `mixlm eval --domains` on the study's prepared domains (the mixed ones and the target)
    suites: list[str] = field(default_factory=list)  # `mixlm eval --suite` (offline-capable ones on a laptop)
    mc_tasks: list[str] = field(default_factory=list)  # `mixlm eval --mc-task NAME=FILE.jsonl[:SHOTS]`
    limit: float = 0  # examples per task (0: all)
    batch_size: str = "8"
    device: str = "cpu"


@dataclass(frozen=True)
class CostSpec:
    """What `--dry-run` prices the training stages on (`mixlm plan --device-kind K --devices N --mfu F`)."""

    device_kind: str = "h100"
    devices: int = 8  # for a validation run
    proxy_devices: int = 1  # for one proxy sweep process (a swarm shares them)
    mfu: float = 0.4
    compile_for: str = ""  # a `mixlm plan --compile-for` target, `{devices}` the stage's count: h100-{devices}


def compile_target(template: str, devices: int) -> str:
    """The `mixlm plan --compile-for` target of a stage on `devices` devices: cost.compile_for with `{devices}`
    filled in (`h100-{devices}`; a TPU slice such as `v5p-32` names its own)."""
    return template.replace("{devices}", str(devices))


@dataclass(frozen=True)
class EngineSpec:
    """Where selection and preparation run (`--engine`, `--workers`, `--ray-address` of select / prepare)."""

    kind: str = "local"
    workers: int = 1
    ray_address: str = ""


@dataclass(frozen=True)
class KnobSpec:
    """A selection knob of one domain: its documents scored by `weights` (`select pick --weights`); each
    `keep` fraction becomes a domain variant `<domain>_top<percent>` the search mixes beside the whole domain."""

    keep: list[float]
    weights: dict = field(default_factory=dict)
    signals: str = ""  # a `mixlm select signals` folder of the domain's documents
    documents: list[str] = field(default_factory=list)  # or: the documents, scored by the study


@dataclass(frozen=True)
class SelectionSpec:
    domains: dict[str, KnobSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportSpec:
    bootstrap: int = 2000  # resamples behind every confidence interval
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class StudySpec:
    name: str
    out: str
    search: SearchSpec
    data: DataSpec = field(default_factory=DataSpec)
    prior: PriorSpec = field(default_factory=PriorSpec)
    refine: RefineSpec = field(default_factory=RefineSpec)
    validation: ValidationSpec | None = None
    export: ExportSpec = field(default_factory=ExportSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    cost: CostSpec = field(default_factory=CostSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    selection: SelectionSpec | None = None
    report: ReportSpec = field(default_factory=ReportSpec)
    source: str = ""  # the study file (set by load_study, not read from it)

    @property
    def folder(self) -> Path:
        return Path(self.source).parent

    def relative(self, path: str) -> str:
        """A path the study file names, as an absolute path (relative to the file's folder)."""
        return path if os.path.isabs(path) or "://" in path else str((self.folder / path).resolve())

    @property
    def search_scale(self) -> ScaleSpec:
        name = self.search.scale or self.search.scales[0].name
        return next(s for s in self.search.scales if s.name == name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- reading ------------------------------------------------------------------------------------------------


def _looks_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _coerce(kind, value, where: str):
    """`value` as the annotated `kind` (a dataclass, list[X], dict, Optional, a scalar), else ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if args:
            return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str) and _looks_float(value):  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"spec field type {kind!r} has no reader")  # a schema bug, not a user error


def _build(cls, raw, where: str):
    if raw is None:
        raw = {}
    if cls is BaselineSpec and isinstance(raw, str):  # `baselines: [natural, uniform]`
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key.{closest_keys(str(key), names)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{f.name}: missing; every study sets it")
    return cls(**values)


def apply_overrides(tree: dict, overrides: list[str], where: str) -> dict:
    """`dotted.key=value` overrides (values read as YAML) applied to a copy of the study's tree."""
    import copy

    tree = copy.deepcopy(tree)
    for text in overrides:
        dotted, sep, raw_value = text.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. validation.seeds=[0,1,2]")
        value = load_yaml(raw_value, f"override {text!r}: value") if raw_value.strip() else ""
        node = tree
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping in {where}")
            node = node[part]
        node[parts[-1]] = value
    return tree


def load_study(path: str | Path, overrides: list[str] | tuple = ()) -> StudySpec:
    """The study at `path` with `overrides` applied, checked (see the module docstring)."""
    path = Path(path)
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (name, out, search, ...) at the top level")
    raw = apply_overrides(raw, list(overrides), str(path))
    spec = _build(StudySpec, raw, str(path))
    spec = dataclasses.replace(spec, source=str(path.resolve()))
    check(spec, str(path))
    return spec


def check_study_folder(out: str, what: str) -> None:
    """A ConfigError unless `out` is a local folder: `mix sample|fit|optimize` write local files (a bucket study
    folder waits for them to write through mixlm.storage)."""
    from mixlm import storage

    storage.check_location(out, what)
    if storage.is_remote(out):
        raise ConfigError(f"{what}={out!r}: a study folder must be local for now (mix sample, fit and optimize write "
                          "local files); give a local folder, e.g. runs/my-study")


def _name(value: str, where: str) -> None:
    if not NAME.match(value):
        raise ConfigError(f"{where}={value!r}: use lowercase letters, digits and _ (it names folders)")


def check(spec: StudySpec, where: str) -> None:
    """The rules across keys (one ConfigError each); the experiment configs named are loaded to check them."""
    from mixlm.mixing.regressors import REGRESSORS

    _name(spec.name, f"{where}: name")
    if not spec.out:
        raise ConfigError(f"{where}: out is empty; give the study's folder, e.g. runs/my-study")
    check_study_folder(spec.out, f"{where}: out")
    data = spec.data
    if bool(data.prepared_dir) == (data.demo is not None):
        raise ConfigError(f"{where}: data: give exactly one of prepared_dir (a `mixlm prepare` folder) or demo")
    if not data.target:
        raise ConfigError(f"{where}: data.target is empty; name the domain(s) whose validation loss the search "
                          "minimises (an eval-only domain, e.g. [office], or some of the mixed ones)")
    if data.demo is not None:
        from mixlm.data.demo_corpus import GENERATORS, TARGET_GENERATORS

        bad = [d for d in data.demo.targets if d not in TARGET_GENERATORS]
        if bad:
            raise ConfigError(f"{where}: data.demo.targets {bad}: the demo corpus has targets {list(TARGET_GENERATORS)}")
        known = [*GENERATORS, *data.demo.targets]
        bad = [d for d in [*data.domains, *data.target] if d not in known]
        if bad:
            raise ConfigError(f"{where}: data: {bad} are not demo-corpus domains; it has {known}")
    p = spec.prior
    if isinstance(p.token_budget, str) and p.token_budget not in ("target", "data"):
        raise ConfigError(f"{where}: prior.token_budget={p.token_budget!r}: use target, data or a token count")
    if not isinstance(p.token_budget, str) and (isinstance(p.token_budget, bool) or not isinstance(
            p.token_budget, (int, float)) or p.token_budget <= 0):
        raise ConfigError(f"{where}: prior.token_budget={p.token_budget!r}: use target, data or a positive token count")
    if p.token_budget == "target" and spec.validation is None:
        raise ConfigError(f"{where}: prior.token_budget is 'target' but the study has no validation run to take it "
                          "from; give a token count or 'data'")
    s = spec.search
    if not s.scales:
        raise ConfigError(f"{where}: search.scales is empty; give at least one proxy config")
    names = [scale.name for scale in s.scales]
    for i, scale in enumerate(s.scales):
        _name(scale.name, f"{where}: search.scales[{i}].name")
        if scale.mixtures < 0 or scale.mixtures > s.mixtures or min(scale.swarm, scale.parallel, scale.devices) < 0:
            raise ConfigError(f"{where}: search.scales[{i}]: mixtures in 0..{s.mixtures}; swarm, parallel, devices >= 0")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: search.scales: names {names} repeat; give each scale its own")
    if s.scale and s.scale not in names:
        raise ConfigError(f"{where}: search.scale={s.scale!r} is not a scale; scales: {names}")
    if spec.search_scale.mixtures not in (0, s.mixtures):
        raise ConfigError(f"{where}: the search scale {spec.search_scale.name!r} trains every mixture; drop its "
                          "mixtures limit")
    if s.fit.folds < 2 or s.mixtures < 2 * s.fit.folds:
        raise ConfigError(f"{where}: search.mixtures={s.mixtures} cannot be split into search.fit.folds="
                          f"{s.fit.folds} folds of at least 2 runs; sample more mixtures or use fewer folds")
    unknown = [r for r in s.fit.regressors if r.split(":")[0] not in REGRESSORS]
    if unknown:
        raise ConfigError(f"{where}: search.fit.regressors {unknown}: known are {', '.join(REGRESSORS)}")
    if s.propose.samples < s.propose.top_k or s.propose.top_k < 1:
        raise ConfigError(f"{where}: search.propose: need 1 <= top_k <= samples")
    r = spec.refine
    if r.rounds < 0 or (r.rounds and r.mixtures < 2) or not 0 < r.min_strength <= r.max_strength or r.stop_below < 0:
        raise ConfigError(f"{where}: refine: rounds >= 0, mixtures >= 2, 0 < min_strength <= max_strength, "
                          "stop_below >= 0")
    _check_configs(spec, where)
    if spec.validation is not None:
        v = spec.validation
        if not v.seeds or len(set(v.seeds)) != len(v.seeds):
            raise ConfigError(f"{where}: validation.seeds {v.seeds}: give one or more distinct seeds")
        seen = ["proposed"]
        for i, b in enumerate(v.baselines):
            _name(b.name, f"{where}: validation.baselines[{i}].name")
            if b.name in seen:
                raise ConfigError(f"{where}: validation.baselines[{i}]: the name {b.name!r} is taken")
            seen.append(b.name)
            if b.mixture and b.online:
                raise ConfigError(f"{where}: validation.baselines[{i}]: give a mixture or an online kind, not both")
            if not (b.mixture or b.online) and b.name not in FIXED_BASELINES:
                raise ConfigError(f"{where}: validation.baselines[{i}] ({b.name}): not natural or uniform, so give "
                                  "mixture: FILE.yaml or online: KIND (mixing.kind)")
            if b.mixture and not Path(spec.relative(b.mixture)).is_file():
                raise ConfigError(f"{where}: validation.baselines[{i}].mixture={b.mixture!r}: no such file")
            if b.online:
                _check_online(spec, b, f"{where}: validation.baselines[{i}]")
        bad = [c for c in spec.export.candidates if c not in seen]
        if bad:
            raise ConfigError(f"{where}: export.candidates {bad}: the validated models are {seen}")
    elif spec.export.enabled and spec.export.candidates:
        raise ConfigError(f"{where}: export.candidates needs a validation section (exports are its runs)")
    if spec.engine.kind not in ("local", "ray"):
        raise ConfigError(f"{where}: engine.kind={spec.engine.kind!r}: use local or ray")
    if spec.selection is not None:
        for d, knob in spec.selection.domains.items():
            at = f"{where}: selection.domains.{d}"
            _name(d, at)
            if not knob.keep or any(not 0 < k < 1 for k in knob.keep) or len(set(knob.keep)) != len(knob.keep):
                raise ConfigError(f"{at}.keep {knob.keep}: fractions in (0, 1), each once (1 is the whole domain, "
                                  "always in the search)")
            if not knob.weights:
                raise ConfigError(f"{at}.weights: empty; give the rater weighting, e.g. {{mean_word_length: 1}}")
            if bool(knob.signals) and bool(knob.documents):
                raise ConfigError(f"{at}: give signals (a folder) or documents, not both")
            if not (knob.signals or knob.documents) and data.demo is None:
                raise ConfigError(f"{at}: give signals (a `mixlm select signals` folder) or documents")
        if data.prepared_dir and "://" in data.prepared_dir:
            raise ConfigError(f"{where}: selection knobs link the prepared domains into the study folder, which an "
                              "object store cannot; copy data.prepared_dir to a local disk")
    if not 0 < spec.report.confidence < 1 or spec.report.bootstrap < 100:
        raise ConfigError(f"{where}: report: confidence in (0, 1), bootstrap >= 100")
    if spec.cost.mfu <= 0 or spec.cost.mfu > 1 or spec.cost.devices < 1 or spec.cost.proxy_devices < 1:
        raise ConfigError(f"{where}: cost: 0 < mfu <= 1, devices and proxy_devices >= 1")
    if spec.cost.compile_for:
        _check_compile_for(spec, where)


def _check_compile_for(spec: StudySpec, where: str) -> None:
    """cost.compile_for names a `--compile-for` target for every device count a training stage holds."""
    from mixlm.compiled.targets import resolve_target

    counts = {s.devices or spec.cost.proxy_devices for s in spec.search.scales} | {spec.cost.devices}
    for devices in sorted(counts):
        try:
            resolve_target(compile_target(spec.cost.compile_for, devices))
        except ConfigError as e:
            raise ConfigError(f"{where}: cost.compile_for={spec.cost.compile_for!r} on {devices} device(s): {e}") from None


def _check_configs(spec: StudySpec, where: str) -> None:
    """Each experiment config the study names loads with its overrides (keys and values checked; nothing resolved)."""
    from mixlm.config import load_config

    named = [(f"search.scales[{i}]", s.config, s.overrides) for i, s in enumerate(spec.search.scales)]
    if spec.validation is not None:
        named.append(("validation", spec.validation.config, spec.validation.overrides))
    for at, config, overrides in named:
        try:
            load_config(spec.relative(config), list(overrides))
        except ConfigError as e:
            raise ConfigError(f"{where}: {at}: {e}") from None


def _check_online(spec: StudySpec, baseline: BaselineSpec, at: str) -> None:
    """An online baseline needs `mixing.kind` (online mixing, issue 27) in this mixlm's configs."""
    from mixlm.config import SECTION_TYPES, load_config

    if "mixing" not in SECTION_TYPES:
        raise ConfigError(f"{at} (online: {baseline.online}): this mixlm has no online mixing (the config section "
                          "`mixing`, issue 27) yet; remove the baseline or update mixlm")
    try:
        load_config(spec.relative(spec.validation.config),
                    [*spec.validation.overrides, f"mixing.kind={baseline.online}", *baseline.overrides])
    except ConfigError as e:
        raise ConfigError(f"{at} (online: {baseline.online}): {e}") from None
