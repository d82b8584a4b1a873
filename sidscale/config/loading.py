"""Loading a run configuration: strict YAML, presets with ``extends:``, ``--set`` overrides, type
coercion, dump, and the argparse helpers.

A run is described by one ``Config`` tree (``sidscale.config.schema``). It is loaded from a preset in
``sidscale/configs`` (by name, e.g. ``toy``) or from a YAML file (by path); a YAML may be partial,
missing keys take the schema's defaults. A YAML may start from another one with ``extends: <preset
name or path>`` (a path is relative to the file that says it): the parent's tree is resolved first,
then the file's own keys are merged over it (mappings merge key by key, lists and scalars replace).
Repeatable ``--set key.sub=value`` overrides apply last, then everything is validated
(``sidscale.config.checks``) before any model is built, so a typo costs seconds, not a queued job.

Every user-facing problem raises ``ConfigError`` naming the key path, the bad value, what was
expected and, where it came from a file, the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from sidscale.config.checks import validate
from sidscale.config.schema import Config
from sidscale.core.io import atomic_write_text
from sidscale.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
REPO_ROOT = Path(__file__).resolve().parents[2]
# the key of a YAML file that names the file it starts from (never part of the schema)
EXTENDS_KEY = "extends"


# --------------------------------------------------------------------------------------------
# Errors and type coercion
# --------------------------------------------------------------------------------------------


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _unknown_key(key: str, prefix: str, known: Sequence[str], source: str | None) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else "."
    level = f"under '{prefix}'" if prefix else "at the top level"
    return ConfigError(f"{_where(source)}unknown key '{full}'{hint} Keys {level}: {', '.join(known)}")


def _type_error(path: str, value: Any, expected: str, source: str | None) -> ConfigError:
    return ConfigError(f"{_where(source)}{path} = {value!r}: expected {expected}, got {type(value).__name__}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is None:
        return tp.__name__ if isinstance(tp, type) else str(tp)
    return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # NOTE: annotations are strings (``from __future__ import annotations``); resolve them once.
    return get_type_hints(cls)


# str keys whose values include true / false (YAML 1.1 turns those into bools)
_BOOL_OR_STR_KEYS = ("teacher.partitioned",)


def _coerce(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Check ``value`` against the field type ``tp`` and convert where lossless; else ConfigError."""
    if isinstance(tp, types.UnionType) or get_origin(tp) is Union:
        # Only ``X | None`` is used: null means "the default that depends on other keys".
        others = [a for a in get_args(tp) if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"sidscale.config: unsupported union type {tp!r} at {path}")  # a schema bug
        return None if value is None else _coerce(value, others[0], path, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _type_error(path, value, f"a mapping of {tp.__name__} keys", source)
        return _build(tp, value, path, source)
    origin = get_origin(tp)
    if origin in (tuple, list):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, f"a list ({_type_name(tp)})", source)
        if origin is tuple and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(
                    f"{_where(source)}{path} = {list(value)!r}: expected {len(args)} items, got {len(value)}"
                )
            elem_types = list(args)
        else:
            elem_types = [args[0]] * len(value)
        pairs = enumerate(zip(value, elem_types, strict=True))
        items = [_coerce(v, t, f"{path}[{i}]", source) for i, (v, t) in pairs]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        # NOTE: no truthiness: "false" or 0 silently meaning False/True is how flags get lost.
        if not isinstance(value, bool):
            raise _type_error(path, value, "a bool (true/false)", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, value, "an int", source)
        return value
    if tp is float:
        if isinstance(value, str):
            # NOTE: PyYAML (YAML 1.1) reads "1e-6" (no dot) as a string; accept numeric text.
            try:
                value = float(value)
            except ValueError:
                raise _type_error(path, value, "a float", source) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, value, "a float", source)
        if not math.isfinite(value):
            raise ConfigError(f"{_where(source)}{path} = {value!r}: expected a finite float")
        return float(value)
    if tp is str and path in _BOOL_OR_STR_KEYS and isinstance(value, bool):
        return "true" if value else "false"  # YAML reads `partitioned: true` as a bool
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, value, "a string", source)
        return value
    raise TypeError(f"sidscale.config: unsupported field type {tp!r} at {path}")  # a schema bug, not user's


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str | None) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) mapping; missing keys take defaults."""
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(str(key), prefix, known, source)
        path = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], path, source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Dict / YAML conversion
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of the config, YAML-friendly (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Strict inverse of ``config_to_dict`` (partial dicts allowed); validates the result."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
    cfg = _build(Config, d, "", source)
    _validate_from(cfg, source)
    return cfg


def _validate_from(cfg: Config, source: str | None, overrides: Sequence[str] = ()) -> None:
    """``validate`` with the origin of the values appended to the message."""
    try:
        validate(cfg)
    except ConfigError as e:
        origin = f"from {source}" if source else ""
        if overrides:
            origin += (" with " if origin else "from ") + "--set " + " --set ".join(overrides)
        raise ConfigError(f"{e} ({origin})" if origin else str(e)) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}: duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# sidscale resolved config\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# Presets, overrides, loading
# --------------------------------------------------------------------------------------------


def list_presets() -> list[str]:
    """Names of the built-in presets (``sidscale/configs/*.yaml``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = list_presets()
        close = difflib.get_close_matches(name, presets, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ConfigError(f"unknown preset {name!r}{hint} Presets: {', '.join(presets) or '(none)'}")
    return path


def _resolve_source(name_or_path: str) -> Path:
    # NOTE: a bare name that is a preset wins over a same-named file in the cwd; anything that
    # looks like a path (separator or .yaml/.yml suffix) is a path.
    looks_like_path = _looks_like_path(name_or_path)
    if not looks_like_path and name_or_path in list_presets():
        return preset_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if looks_like_path:
        raise ConfigError(f"config file not found: {name_or_path}")
    return preset_path(name_or_path)  # raises with the list of presets


def _looks_like_path(name_or_path: str) -> bool:
    has_sep = os.sep in name_or_path or "/" in name_or_path
    return has_sep or name_or_path.endswith((".yaml", ".yml"))


def _extends_target(value: Any, path: Path) -> Path:
    """The file that ``extends: value`` in ``path`` names: a preset, or a YAML path relative to ``path``."""
    where = f"{path}: {EXTENDS_KEY} = {value!r}"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a preset name or a YAML path, got {type(value).__name__}")
    if _looks_like_path(value):
        target = path.parent / Path(value).expanduser()  # an absolute value stays absolute
        if not target.is_file():
            raise ConfigError(f"{where}: file not found: {target}")
        return target
    presets = list_presets()
    if value not in presets:
        close = difflib.get_close_matches(value, presets, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ConfigError(f"{where}: unknown preset{hint} Presets: {', '.join(presets) or '(none)'} "
                          "(a path needs a separator or a .yaml suffix)")
    return PRESET_DIR / f"{value}.yaml"


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key; lists, scalars and nulls replace."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_tree(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML tree of ``path`` with its ``extends:`` chain resolved, before any ``--set``: the parent's
    resolved tree with this file's own keys merged over it (no ``extends`` key left)."""
    data = _read_yaml(path)
    own = {key: value for key, value in data.items() if key != EXTENDS_KEY}
    # NOTE: each file's own keys and types are checked here, so an error names the file that has them
    # (after the merge, a value could come from any file of the chain).
    _build(Config, own, "", str(path))
    if EXTENDS_KEY not in data:
        return own
    chain = (*_chain, path.resolve())
    parent = _extends_target(data[EXTENDS_KEY], path)
    if parent.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, parent.resolve()))
        raise ConfigError(f"{path}: {EXTENDS_KEY} = {data[EXTENDS_KEY]!r}: a cycle of extends ({cycle})")
    return _merge(read_config_tree(parent, chain), own)


def _parse_override(text: str, field_type: Any) -> Any:
    raw = text.split("=", 1)[1]
    if field_type is str:
        # NOTE: str fields take the raw text, so "a{0..3}.tar" or "yes" stay strings; a fully
        # quoted value is unquoted so `--set teacher.path=""` gives the empty string.
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return yaml.safe_load(raw)
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: value is not valid YAML: {e}") from None


def apply_override(cfg: Config, text: str) -> None:
    """Apply one ``key.sub=value`` override in place (type-checked, not yet validated)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.max_steps=100")
    key = text.split("=", 1)[0].strip()
    parts = key.split(".")
    section: Any = cfg
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"--set {text}: '{prefix}' is a value, not a section")
        hints = _hints(type(section))
        if part not in hints:
            raise _unknown_key(part, prefix, list(hints), f"--set {text}")
        if depth < len(parts) - 1:
            section = getattr(section, part)
    name, tp = parts[-1], hints[parts[-1]]
    value = _parse_override(text, tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        # NOTE: a whole-section override (`--set method={alpha: 1.2}`) merges into the current
        # section instead of resetting its other keys to defaults.
        value = {**config_to_dict(getattr(section, name)), **value}
    value = _coerce(value, tp, key, f"--set {text}")
    setattr(section, name, value)


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Load a preset (by name) or YAML file (by path) with its ``extends:`` chain, apply ``--set``
    overrides, validate."""
    path = _resolve_source(str(name_or_path))
    source = str(path)
    cfg = _build(Config, read_config_tree(path), "", source)
    for text in overrides:
        apply_override(cfg, text)
    _validate_from(cfg, source, overrides)
    return cfg


def resolve_deepspeed_config(cfg: Config) -> Path:
    """The DeepSpeed JSON path: absolute as is; relative against the cwd, then the repo root."""
    raw = Path(cfg.deepspeed.config).expanduser()
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw, REPO_ROOT / raw]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"deepspeed.config = {cfg.deepspeed.config!r}: file not found (tried {tried})")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    presets = ", ".join(list_presets()) or "(none)"
    parser.add_argument("--config", default="toy",
                        help=f"preset name ({presets}) or path to a YAML file (default: toy)")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.max_steps=100 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set or ())

