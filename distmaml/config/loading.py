"""Loading a configuration: defaults, then a YAML file, then `key.sub=value` overrides, validated.

    config = load_config("configs/sine_maml.yaml", ["inner.steps=5", "run.dir=runs/k5"])

Every problem (an unknown key, a wrong type, an impossible value) raises ConfigError with one line
that names the file (or "command line"), the key and the value. `source_of(config, key)` says
where a value came from, so that a check made later (by a method or a problem, once torch is
loaded) names it the same way. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from distmaml.config.checks import check_values
from distmaml.config.migration import MOVED, RENAMED, migrated, renamed
from distmaml.config.schema import PROBLEM_SECTIONS, Config
from distmaml.errors import ConfigError, SettingError
from distmaml.imports import absolute_specs
from distmaml.meta import METHODS, RULES, method_settings, rule_settings

log = logging.getLogger("distmaml.config")

# The config keys each built-in hypergradient method and inner rule reads, from the components that
# own them (distmaml.meta): a key of these set for a run whose method or rule does not read it is
# said to be unused. inner.lr and inner.steps every run reads.
METHOD_SETTINGS = {name: tuple(key for key in method_settings(name).values() if key) for name in METHODS}
RULE_SETTINGS = {name: tuple(key for key in rule_settings(name).values() if key not in ("inner.lr", "inner.steps"))
                 for name in RULES}
# The sections that belong to one method (implicit.*, neumann.*, finite_difference.*).
METHOD_SECTIONS = {key.split(".", 1)[0] for keys in METHOD_SETTINGS.values() for key in keys} - {"inner"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                every_method: bool = False) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides; validated. A setting given for a
    problem or method the run does not use is said to be unused, in one warning line each;
    `every_method`: the caller runs every hypergradient method (gradcheck), so none of their settings is."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        given: dict[str, str] = {}  # today's key -> the name the file used
        for key, value in _flatten(_read_sections(path)):
            new = renamed(key, str(path))
            if new in given:  # the old and the new name of one setting, in one file
                old = key if given[new] == new else given[new]
                raise ConfigError(f"{path}: {old} and {new} are one setting ({old} is its old name): give {new} once")
            given[new] = key
            raw[new] = value
            sources[new] = str(path)
    for item in overrides or []:
        key, value = parse_override(item)
        key = renamed(key, "command line")  # renamed here, so that the command line wins over the file
        raw[key] = value
        sources[key] = "command line"
    # A relative file path in an import spec (problem.name: own/mine.py:build) is read from the
    # directory the run is started in, once, here: config.yaml and the checkpoints then hold the
    # absolute path, and a resume or an evaluation started elsewhere imports the file that trained.
    # A config restored from a checkpoint (from_dict) is left as saved.
    config = from_flat(absolute_specs(raw), sources)
    object.__setattr__(config, "_file", path)
    # Only what the user set: a default, or a saved config's every key, is no choice to question. A
    # file's method settings are not either: one file often serves several methods (gradcheck runs
    # every method on configs/logistic_weight_decay.yaml; inner.mode is switched on the command
    # line); nor a file's problem settings once the command line chose another problem on purpose.
    for key, where in sources.items():
        if unused := unused_setting(config, key, every_method):
            chooser, why = unused
            if where == "command line" or (chooser == "problem.name" and sources.get(chooser) != "command line"):
                log.warning("%s: %s is set but %s", where, key, why)
    return config


def unused_setting(config: Config, key: str, every_method: bool = False) -> tuple[str, str] | None:
    """If the setting `key` does nothing in this run (another problem's or method's): the key whose
    choice makes it so (problem.name, inner.mode) and why, in words; else None."""
    section = key.split(".", 1)[0]
    problem_sections = {name for sections in PROBLEM_SECTIONS.values() for name in sections}
    if section in problem_sections and section not in PROBLEM_SECTIONS.get(config.problem.name, ()):
        return "problem.name", f"problem.name = {config.problem.name!r} does not read {section}.*"
    if any(key in keys for keys in RULE_SETTINGS.values()) and key not in RULE_SETTINGS.get(config.inner.rule, ()):
        return "inner.rule", f"inner.rule = {config.inner.rule!r} does not read it"
    if every_method or not any(key in keys for keys in METHOD_SETTINGS.values()):
        return None
    if key not in METHOD_SETTINGS.get(config.inner.mode, ()):
        return "inner.mode", f"inner.mode = {config.inner.mode!r} does not read it"
    return None


def config_file(config: Config) -> Path | None:
    """The YAML file `config` was loaded from, if any (the trainer never writes over it)."""
    return getattr(config, "_file", None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark)
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_sections(path: Path) -> dict[str, Any]:
    """The file's {section: {key: value}}, or a one-line ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is None:
        # Running every default (70,000 iterations into runs/sine_maml) is never what an empty file meant.
        raise ConfigError(f"{path}: the file holds no settings (empty, or only comments)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    sections = {spec.name for spec in dataclasses.fields(Config)}
    for name, value in list(loaded.items()):
        if name in sections and value is None:  # every key of the section commented out
            del loaded[name]
        elif name in sections and not isinstance(value, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping of keys, got {value!r}")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """'inner.steps=5' -> ('inner.steps', 5); values are read as YAML scalars or lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command line: {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def from_flat(raw: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    """Build a validated Config from {'section.key': value}; missing keys keep their defaults."""
    sources = dict(sources or {})
    raw = dict(raw)
    for old, new in RENAMED.items():
        if old in raw:
            where = sources.pop(old, "config")
            if new in raw:
                raise ConfigError(f"{where}: {old} and {new} are one setting ({old} is its old name): give {new} once")
            raw[renamed(old, where)] = raw.pop(old)
            sources[new] = where
    config = Config()
    known = {f"{section.name}.{spec.name}": (section.name, spec) for section in dataclasses.fields(Config)
             for spec in dataclasses.fields(_section_type(section.name))}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        where = sources.get(key, "config")
        parent = key.rsplit(".", 1)[0]
        if key not in known and parent in known and _field_type(*parent.split(".")) is dict:
            # task.args.degree: one entry of a free-form section, passed to user code as is
            nested.setdefault(parent, {})[key.rsplit(".", 1)[1]] = value
            continue
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'{_unknown_hint(key, known)}")
        section, spec = known[key]
        value = _coerce(value, _field_type(section, spec.name), key, where)
        choices = spec.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: {key} = {value!r}: must be one of {', '.join(choices)}")
        setattr(getattr(config, section), spec.name, value)
    for key, entries in nested.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, {**getattr(getattr(config, section), name), **entries})
    check_values(config, lambda key: sources.get(key, "default"))
    object.__setattr__(config, "_sources", dict(sources))
    return config


def _unknown_hint(key: str, known) -> str:
    """Where an unknown key went, or the closest known key; in a component's own section (a problem's,
    a method's: a few keys) every key it has."""
    if key in MOVED:
        return f" (moved to {MOVED[key]})"
    hint = difflib.get_close_matches(key, known, n=1)
    closest = f"did you mean '{hint[0]}'?" if hint else ""
    section = key.split(".", 1)[0]
    own = {name for sections in PROBLEM_SECTIONS.values() for name in sections} | METHOD_SECTIONS
    if section in own:
        keys = ", ".join(name.split(".", 1)[1] for name in known if name.startswith(section + "."))
        closest = f"{closest} {section}'s keys: {keys}".strip()
    return f" ({closest})" if closest else ""


def source_of(config: Config, key: str) -> str:
    """Where the value of `key` came from: a file, "command line", "config" or "default"."""
    return getattr(config, "_sources", {}).get(key, "default")


def sourced(config: Config, err: SettingError, cause: str = "inner.mode") -> ConfigError:
    """A setting's error from a component (a method, a problem), prefixed with where its value came
    from -- or, for a value left at its default, where the setting that makes it wrong (`cause`) came from."""
    where = source_of(config, err.key)
    if where != "default":
        return ConfigError(f"{where}: {err}")
    # Nobody set the value at fault: say so, rather than let the source of `cause` seem to set it.
    return ConfigError(f"{source_of(config, cause)}, with {err.key} at its default: {err}")


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested data, for config.yaml, checkpoints and wandb."""
    return dataclasses.asdict(config)


def from_dict(tree: dict[str, Any], source: str, changes: dict[str, tuple[Any, str]] | None = None) -> Config:
    """Build a validated Config from nested data (a checkpoint's config); errors name `source`, or
    for a key in `changes` ({"eval.shots": (5, "--shots")}) the value and source given there.
    A config saved by an earlier version is migrated to today's keys first."""
    raw = migrated(dict(_flatten(tree)))
    sources = {key: source for key in raw}
    for key, (value, where) in (changes or {}).items():
        raw[key], sources[key] = value, where
    return from_flat(raw, sources)


def flatten(config: Config) -> dict[str, Any]:
    """{'section.key': value} for every field (a dict-valued field, like task.args, as one value)."""
    return {f"{section}.{name}": value for section, fields in to_dict(config).items() for name, value in fields.items()}


def describe() -> str:
    """Every key with its default and its description, one per line (for `--help-config`)."""
    lines = []
    for section in dataclasses.fields(Config):
        for spec in dataclasses.fields(_section_type(section.name)):
            default = getattr(getattr(Config(), section.name), spec.name)
            choices = spec.metadata.get("choices")
            allowed = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"{section.name}.{spec.name} = {default!r}{allowed}  # {spec.metadata['doc']}")
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, name + ".")
        elif not isinstance(value, dict) or prefix:  # an empty section is no setting; an empty args dict is one
            yield name, value


def _section_type(name: str) -> type:
    from distmaml.config import schema

    return typing.get_type_hints(Config, vars(schema))[name]


def _field_type(section: str, name: str) -> Any:
    from distmaml.config import schema

    return typing.get_type_hints(_section_type(section), vars(schema))[name]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, kind: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `kind`; ints widen to float, nothing else converts."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(value, option, key, where)
            except ConfigError as err:
                if str(err).endswith("must be a finite number"):  # the right type, an impossible value
                    raise
                continue
        names = " or ".join(_type_name(option) for option in typing.get_args(kind))
        raise ConfigError(f"{where}: {key} = {value!r}: expected {names}")
    if kind is type(None):
        if value is None:
            return None
    elif origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, list):
            return [_coerce(item, item_kind, key, where) for item in value]
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads 3e-4 (no dot) as a string; take it as the number the user meant.
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = float(value)
        if number is not None:
            # No setting means anything as NaN or an infinity (a NaN tolerance once trained nothing
            # and reported success); checked here once for every float field, present and future.
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {key} = {value!r}: must be a finite number")
            return number
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{where}: {key} = {value!r}: expected {_type_name(kind)}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return "null" if kind is type(None) else kind.__name__
