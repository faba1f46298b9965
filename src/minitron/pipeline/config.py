"""Typed recipe configs: nested dataclasses <-> YAML, dotted command-line overrides, strict keys.

    cfg = load_config(RunConfig, "recipes/default.yaml", ["distill.tokens=200000", "target.params=70M"])
Unknown keys and values of the wrong type are errors that name the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp` (Optional, list, dataclass, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)  # accepts 2e5 as well as 200000
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are errors listing the known ones."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_override(data: dict, cls, assignment: str) -> None:
    """Apply one `a.b.c=value` to a nested dict, checking the path against the dataclass schema."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} needs the form key.sub=value")
    path, _, raw = assignment.partition("=")
    keys = path.strip().lstrip("-").split(".")
    node, schema = data, cls
    for i, key in enumerate(keys):
        if not dataclasses.is_dataclass(schema):
            raise ConfigError(f"override {path}: {'.'.join(keys[:i])} is not a section")
        names = [f.name for f in dataclasses.fields(schema)]
        if key not in names:
            raise ConfigError(f"override {path}: unknown key {key!r}; known: {', '.join(names)}")
        tp = _hints(schema)[key]
        if i == len(keys) - 1:
            node[key] = yaml.safe_load(raw) if raw.strip() else ""
        else:
            node = node.setdefault(key, {})
            schema = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """YAML file (optional) + dotted overrides -> a checked `cls` instance."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
    for assignment in overrides or []:
        apply_override(data, cls, assignment)
    return from_dict(cls, data)


def save_config(obj, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run really used)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# ---- one source of every default: CLI options read them from the dataclasses ----------------------------

def default_of(cls, name: str):
    """The default of dataclass field `name` of `cls` (CLI options and recipe sections take theirs from here)."""
    fld = {f.name: f for f in dataclasses.fields(cls)}[name]
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    raise ConfigError(f"{cls.__name__}.{name} has no default")


def _scalar_type(tp):
    """int | None -> int; list[...] and unions of several types -> None (parsed by the caller)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 and args[0] in (int, float, str) else None
    return tp if tp in (int, float, str) else None


def add_option(parser, cls, name: str, help: str = "", flag: str | None = None, **kw) -> None:
    """`--name-with-dashes` for dataclass field `name`: its type and its default come from `cls`, so the
    command line and the config can never disagree. Booleans that default to False become store_true flags."""
    default = default_of(cls, name)
    flag = flag or "--" + name.replace("_", "-")
    tp = _hints(cls)[name]
    shown = f" (default: {default})" if default not in (None, False, "") else ""
    if tp is bool:
        parser.add_argument(flag, dest=kw.pop("dest", name), action="store_false" if default else "store_true",
                            help=help, **kw)
        return
    kw.setdefault("type", _scalar_type(tp))
    if kw["type"] is None:
        del kw["type"]
    parser.add_argument(flag, dest=kw.pop("dest", name), default=default, help=help + shown, **kw)
