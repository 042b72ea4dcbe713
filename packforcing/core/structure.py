"""Turning YAML mappings into validated attrs parameter classes, with located errors."""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from packforcing.core.errors import ConfigError


def show(value: Any) -> str:
    """``value`` as it would be written in YAML (``true``, ``null``, ``-3``, ``'abc'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if attrs.has(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (YAML-typed input)."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        expected = " or ".join(_type_name(a) for a in args if a is not type(None))
        if type(None) in args:
            expected += " or null"
        raise ConfigError(f"expected {expected}, got {show(value)}", path=path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected a boolean (true/false), got {show(value)}", path=path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"expected an integer, got {show(value)}", path=path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"expected a finite number, got {show(value)}", path=path)
            return float(value)
        raise ConfigError(f"expected a number, got {show(value)}", path=path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {show(value)}", path=path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {show(value)}", path=path)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected a list of {len(args)} items, got {show(value)}", path=path)
            items = [coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item = args[0] if args else Any
            items = [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {show(value)}", path=path)
        return dict(value)
    if attrs.has(tp):
        if isinstance(value, tp):
            return value
        return structure(tp, value, path)
    return value


def structure(cls: type, data: Any, path: str) -> Any:
    """Build attrs class ``cls`` from mapping ``data``; errors name ``path`` and the key."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {show(data)}", path=path)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations naming types only imported for type checking: do not coerce
        hints = {}
    fields = {f.name: f for f in attrs.fields(cls)}
    init_names = {(f.alias or f.name): f for f in fields.values() if f.init}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in init_names:
            hint = difflib.get_close_matches(str(key), list(init_names), n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            allowed = ", ".join(init_names) or "none"
            raise ConfigError(f"unknown key{did} (expected one of: {allowed})", path=sub)
        field = init_names[key]
        kwargs[key] = coerce(value, hints.get(field.name, Any), sub)
    missing = [n for n, f in init_names.items() if f.default is attrs.NOTHING and n not in kwargs]
    if missing:
        raise ConfigError("required key is missing", path=f"{path}.{missing[0]}" if path else missing[0])
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a ParamError from a validator: its path is relative to ``cls``
        raise exc.under(path) if path else exc from None
    except (TypeError, ValueError) as exc:  # e.g. attrs' own validators: the message names the field
        raise ConfigError(" ".join(str(exc).split()), path=path or None) from None


def unstructure(obj: Any) -> Any:
    """Plain YAML/JSON-able data of an attrs instance (tuples become lists)."""
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: unstructure(v) for k, v in obj.items()}
    return obj
