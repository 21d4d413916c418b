"""Reading configs: YAML files that compose (`base:`, section files, mixture files), `section.key=value`
overrides, and writing the resolved config back out.

* `base: [a.yaml, b.yaml]` at the top of any file: those files are loaded first (paths relative to
  the file) and this file's keys are merged over them (a "recipe" is such a base file).
* A section given as a string is the path of a YAML file holding that section, e.g.
  `model: ../models/llama-tiny.yaml`.
* `data.mixture` given as a string is the path of a mixture YAML (`domain: weight`, or
  `{weights: ..., stages: [...]}`); it is read into the config so the saved config is self-contained.

Loading reads files and nothing else: no jax, no directories created (STYLE.md: no side effects). Every YAML
this project reads from a user goes through `load_yaml` (a bound on alias expansion).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mixlm import storage
from mixlm.config.schema import SECTION_TYPES, ExperimentConfig, ModelConfig, closest_keys, short_repr
from mixlm.config.validate import validate
from mixlm.errors import ConfigError

# A config holds a few hundred values, but YAML aliases (`*name`) repeat what their anchor holds, so a 1 KB file
# of nested aliases can stand for billions of values (an alias bomb). Past this many values, counted with every
# alias expanded, a document is refused while it is parsed, before anything copies or writes it.
YAML_VALUE_LIMIT = 100_000
CONFIG_FILE_BYTES_LIMIT = 10 << 20  # a config file is a few KB; this stops a read of /dev/zero or a stray dump


class _YamlRefused(yaml.YAMLError):
    """A document refused by _CountingLoader; the message says why."""


class _CountingLoader(yaml.SafeLoader):
    """yaml.SafeLoader that gives every node its size with aliases expanded (`expanded`, merge keys included)
    as it is composed, and refuses a document past YAML_VALUE_LIMIT or an alias inside its own anchor."""

    def compose_node(self, parent, index):
        alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        node = super().compose_node(parent, index)
        if alias is not None:  # the anchored node, counted when it was composed, unless the alias sits inside it
            if not hasattr(node, "expanded"):
                raise _YamlRefused(f"the alias *{alias.anchor} at line {alias.start_mark.line + 1} sits inside the "
                                   "value it refers to (a recursive value); write the value out instead")
            return node
        if isinstance(node, yaml.SequenceNode):
            node.expanded = 1 + sum(child.expanded for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            node.expanded = 1 + sum(k.expanded + v.expanded for k, v in node.value)
        else:
            node.expanded = 1
        if node.expanded > YAML_VALUE_LIMIT:
            raise _YamlRefused(f"more than {YAML_VALUE_LIMIT:,} values once its aliases (*name) are expanded (the "
                               f"value at line {node.start_mark.line + 1} alone holds {node.expanded:,}); a config "
                               "needs a few hundred: write the values out or use fewer aliases")
        return node


def load_yaml(text: str, where: str) -> Any:
    """One YAML document -> plain Python values (yaml.SafeLoader's), with a bound on its size: `where` (a file
    or an override) starts the one-line ConfigError for invalid YAML, an alias bomb (more than
    YAML_VALUE_LIMIT values once aliases are expanded), a recursive alias, or nesting too deep to parse."""
    try:
        return yaml.load(text, Loader=_CountingLoader)
    except _YamlRefused as e:
        raise ConfigError(f"{where}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: refused: values nested too deeply to parse; a config nests a few levels") from None


def read_yaml_file(path) -> Any:
    """The YAML document of a file (a local path or a gs:// / s3:// URL), bounded as load_yaml bounds it."""
    try:
        with storage.location(path).open("rb") as f:
            data = f.read(CONFIG_FILE_BYTES_LIMIT + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the path of a YAML file") from None
    except OSError as e:  # a symlink loop, no permission: one line, not a traceback
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e}); give the path of a YAML file") from None
    if len(data) > CONFIG_FILE_BYTES_LIMIT:
        raise ConfigError(f"{path}: larger than {CONFIG_FILE_BYTES_LIMIT >> 20} MB, which no config is; "
                          "give the path of a YAML config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); give the path of a YAML config") from None
    return load_yaml(text, str(path)) or {}


def _resolve(path: Path, named_by: str = "") -> Path:
    """`path` made absolute with symlinks followed; a symlink loop is a one-line ConfigError naming the file
    that named the path (`named_by`, e.g. "`base:` in exp.yaml")."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: Python 3.11's "Symlink loop from ..."
        via = f" ({named_by})" if named_by else ""
        raise ConfigError(f"{path}{via}: cannot follow the path ({e}); point it at a YAML file") from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "mixture":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_tree(path: Path, stack: tuple = ()) -> tuple[dict, dict]:
    """Returns (raw nested dict, origin: 'section.key' -> file that set it)."""
    path = _resolve(path)
    if path in stack:
        raise ConfigError(f"{path}: circular `base:` include via {' -> '.join(map(str, stack))}")
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    merged: dict = {}
    origin: dict = {}
    bases = raw.pop("base", []) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: `base:` must be a file path or a list of them, got {short_repr(bases)}")
    for b in bases:
        sub, sub_origin = _load_tree(_resolve(path.parent / b, f"`base:` in {path}"), stack + (path,))
        merged = _deep_merge(merged, sub)
        origin.update(sub_origin)
    for section, value in raw.items():
        if section not in SECTION_TYPES:
            raise ConfigError(f"{path}: unknown section {section!r}.{closest_keys(section, SECTION_TYPES)}")
        section_file = path
        if isinstance(value, str):  # the section lives in its own file
            section_file = _resolve(path.parent / value, f"section {section!r} in {path}")
            value = read_yaml_file(section_file)
            if not isinstance(value, dict):
                raise ConfigError(f"{section_file}: expected a mapping for section {section!r}")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping or a file path")
        if section == "data" and isinstance(value.get("mixture"), str):
            mix_path = path.parent / value["mixture"]
            value = dict(value, mixture=read_yaml_file(mix_path))
            origin["data.mixture"] = str(mix_path)
        merged[section] = _deep_merge(merged.get(section, {}), value)
        for key in value:
            if key != "mixture" or "data.mixture" not in origin or section != "data":
                origin[f"{section}.{key}"] = str(section_file)
    return merged, origin


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks `value` against the dataclass field type `tp` (ints widen to floats)."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}.get(tp, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {short_repr(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {short_repr(value)} ({type(value).__name__})")


def _build_section(section: str, values: dict, origin: dict) -> Any:
    cls = SECTION_TYPES[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{origin.get(f'{section}.{key}', '<defaults>')}: {section}.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} in section {section!r}.{closest_keys(key, fields)}")
        kwargs[key] = _coerce(value, fields[key].type, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        files = sorted({v for k, v in origin.items() if k.startswith(section + ".")})
        raise ConfigError(f"{', '.join(files) or '<defaults>'}: {e}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """'optimizer.lr=1e-3' -> ('optimizer', 'lr', 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {short_repr(text, 200)}: expected section.key=value, e.g. optimizer.lr=1e-3")
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {short_repr(text, 200)}: expected exactly section.key on the left, e.g. train.steps=100")
    section, key = parts
    if section not in SECTION_TYPES:
        raise ConfigError(f"override {short_repr(text, 200)}: unknown section {section!r}.{closest_keys(section, SECTION_TYPES)}")
    value = load_yaml(raw_value, f"override {short_repr(text, 200)}: value") if raw_value.strip() else ""
    if isinstance(value, str) and _looks_float(value):  # YAML 1.1 reads "1e-3" as a string
        value = float(value)
    return section, key, value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _fix_yaml_floats(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "mixture":
            out[k] = _fix_yaml_floats(v)
        elif isinstance(v, str) and _looks_float(v) and not v.strip().isdigit():
            out[k] = float(v)
        else:
            out[k] = v
    return out


def load_config_and_origin(path: str | Path | None = None, overrides: Sequence[str] = ()
                           ) -> tuple[ExperimentConfig, dict[str, str]]:
    """load_config, and where each key was set ('section.key' -> the file or the override that set it)."""
    tree, origin = _load_tree(Path(path)) if path else ({}, {})
    tree = {s: _fix_yaml_floats(v) if isinstance(v, dict) else v for s, v in tree.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        tree.setdefault(section, {})
        if key == "mixture" and section == "data" and isinstance(value, str):
            value = read_yaml_file(value)  # a path or URL: never Path(), which turns gs:// into gs:/
        tree[section] = dict(tree[section], **{key: value})
        origin[f"{section}.{key}"] = f"override {short_repr(text, 200)}"
    sections = {name: _build_section(name, tree.get(name, {}), origin) for name in SECTION_TYPES}
    cfg = ExperimentConfig(**sections)
    validate(cfg, origin)
    return cfg, origin


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Loads an experiment YAML (or defaults when `path` is None) and applies `section.key=value` overrides.
    What depends on other files (a `random:` mixture spec, the prepared data's vocabulary) is left as written:
    mixlm.run_config.load_run_config resolves it, as every entry point does."""
    return load_config_and_origin(path, overrides)[0]


def config_from_dict(tree: dict) -> ExperimentConfig:
    """Rebuilds a config from `ExperimentConfig.to_dict()` output (e.g. a saved config.yaml)."""
    origin: dict = {}
    for s in tree:
        if s not in SECTION_TYPES:
            raise ConfigError(f"<dict>: unknown section {s!r}.{closest_keys(s, SECTION_TYPES)}")
    return ExperimentConfig(**{n: _build_section(n, tree.get(n, {}), origin) for n in SECTION_TYPES})


def _is_experiment(raw: dict) -> bool:
    return "base" in raw or any(key in SECTION_TYPES for key in raw)


def is_experiment_file(path: str | Path) -> bool:
    """True for an experiment YAML (a `base:` or a section key), False for a model YAML (model fields only)."""
    raw = read_yaml_file(Path(path))
    return isinstance(raw, dict) and _is_experiment(raw)


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """A model YAML on its own (configs/models/*.yaml: the fields of the `model` section) with `model.key=value`
    overrides, or the model of an experiment YAML (then any override applies, as in load_config)."""
    path = Path(path)
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of model fields")
    if _is_experiment(raw):
        return load_config(path, overrides).model
    origin = {f"model.{k}": str(path) for k in raw}
    raw = _fix_yaml_floats(raw)
    for text in overrides:
        section, key, value = parse_override(text)
        if section != "model":
            raise ConfigError(f"override {short_repr(text, 200)}: {path} is a model YAML, which takes model.* overrides only")
        raw[key] = value
        origin[f"model.{key}"] = f"override {short_repr(text, 200)}"
    return _build_section("model", raw, origin)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Writes the resolved config (every field, mixture inlined) as YAML, atomically (local or object store)."""
    storage.write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_diff(a: ExperimentConfig, b: ExperimentConfig, ignore: tuple = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for the resume-mismatch refusal)."""
    da, db = a.to_dict(), b.to_dict()
    diffs = []
    for s in SECTION_TYPES:
        for k in sorted(set(da[s]) | set(db[s])):
            key = f"{s}.{k}"
            if key not in ignore and da[s].get(k) != db[s].get(k):
                diffs.append(key)
    return diffs
