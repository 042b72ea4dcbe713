"""Turning YAML mappings into validated attrs parameter classes, with located errors.

Structuring is cattrs': one :class:`cattrs.Converter` (``forbid_extra_keys``,
``detailed_validation``, attribute aliases as keys) generates each parameter class's structuring
function. What is ours is what YAML input needs and cattrs does not do by default:

- scalars are checked, never converted: ``"8"`` is not an integer and ``true`` is not ``1``
  (a whole float such as ``8.0`` is the integer 8; a float must be finite);
- a list must be a list (not a string iterated by character), a fixed-length tuple is given as
  a list of that many items, a mapping must be a mapping; an annotation the converter does not
  know (``Any``, a class) takes the value as it is;
- an attrs instance is taken as it is, so Python callers may pass parameter objects.

cattrs reports every problem of a class as a :class:`cattrs.ClassValidationError`, whose
exceptions carry their attribute or list index as notes. Each class's structuring turns that
tree into one :class:`~packforcing.core.errors.ConfigError` with the key path of its first
problem (unknown keys first, then the keys in the order they were written, then missing keys),
relative to the class; the enclosing class prefixes its own attribute, so the user reads
``configs/x.yaml: policy.tiers[1].blocks: expected an integer, got 'eight'``. A validator's
:class:`~packforcing.core.errors.ParamError` keeps its own key path (relative to its class, or
absolute), and any other error of a class's constructor is reported at the class's path.

cattrs is imported on the first call (it is not needed to print ``--help``).
"""

from __future__ import annotations

import builtins
import difflib
import functools
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from packforcing.core.errors import ConfigError

if typing.TYPE_CHECKING:
    import cattrs


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
    if origin in (dict, Mapping) or tp in (dict, Mapping) or attrs.has(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------- scalar hooks
def _bool(value: Any, _: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"expected a boolean (true/false), got {show(value)}")


def _int(value: Any, _: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"expected an integer, got {show(value)}")


def _float(value: Any, _: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"expected a finite number, got {show(value)}")
        return float(value)
    raise ConfigError(f"expected a number, got {show(value)}")


def _str(value: Any, _: Any) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"expected a string, got {show(value)}")


def _as_is(value: Any, _: Any) -> Any:
    return value


# ---------------------------------------------------------------------- hook factories
def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _union(tp: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """The first member type that takes the value (``None`` for ``X | None``)."""
    args = typing.get_args(tp)
    nullable = type(None) in args
    members = [(a, converter.get_structure_hook(a)) for a in args if a is not type(None)]
    expected = " or ".join(_type_name(a) for a, _ in members) + (" or null" if nullable else "")

    def structure_union(value: Any, _: Any) -> Any:
        if value is None and nullable:
            return None
        for member, hook in members:
            try:
                return hook(value, member)
            except Exception:
                continue
        raise ConfigError(f"expected {expected}, got {show(value)}")

    return structure_union


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _sequence(tp: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """``list[X]``, ``tuple[X, ...]``: cattrs' own (items noted with their index); ``tuple[X, Y]``:
    exactly that many items."""
    from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(set(args)) == 1:  # tuple[int, int, int]: cattrs' homogeneous tuple, after the length check
            homogeneous = types.GenericAlias(tuple, (args[0], ...))  # tuple[args[0], ...]
            # cattrs annotates its hook factories' first argument `type`; they take generic aliases
            items = homogenous_tuple_structure_factory(homogeneous, converter)  # type: ignore[arg-type]
        else:
            items = _fixed_tuple(args, converter)
        count: int | None = len(args)
    else:
        item = args[0] if args else Any
        factory = list_structure_factory if origin is list else homogenous_tuple_structure_factory
        # list[item] / tuple[item, ...] (the objects the subscripts make), which cattrs takes though it
        # annotates the argument `type`
        alias = types.GenericAlias(list, item) if origin is list else types.GenericAlias(tuple, (item, ...))
        items = factory(alias, converter)  # type: ignore[arg-type]
        count = None

    def structure_sequence(value: Any, _: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {show(value)}")
        if count is not None and len(value) != count:
            raise ConfigError(f"expected a list of {count} items, got {show(value)}")
        return items(value, tp)

    return structure_sequence


def _fixed_tuple(args: tuple[Any, ...], converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """``tuple[X, Y]`` item by item, errors noted with their index as cattrs notes them."""
    from cattrs.errors import IterableValidationError, IterableValidationNote

    hooks = [converter.get_structure_hook(a) for a in args]

    def structure_items(value: Any, tp: Any) -> tuple[Any, ...]:
        out, errors = [], []
        for i, (item, arg, hook) in enumerate(zip(value, args, hooks, strict=True)):
            try:
                out.append(hook(item, arg))
            except Exception as exc:
                note = IterableValidationNote(f"@ index {i}", i, arg)
                # as cattrs notes it: BaseException has __notes__ from Python 3.11 (PEP 678), before
                # that it is a plain attribute that cattrs reads
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return tuple(out)

    return structure_items


def _is_mapping(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping)


def _mapping(value: Any, _: Any) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {show(value)}")
    return dict(value)


def _attrs_class(cls: type[Any], converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """cattrs' generated function for ``cls``, its error tree turned into one :class:`ConfigError`."""
    from cattrs.errors import ClassValidationError
    from cattrs.gen import make_dict_structure_fn

    _resolve_types(cls)
    fn = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True, _cattrs_use_alias=True)
    keys = {f.name: f.alias or f.name for f in attrs.fields(cls) if f.init}

    def structure_class(value: Any, _: Any) -> Any:
        if isinstance(value, cls):
            return value
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {show(value)}")
        try:
            return fn(value, cls)
        except ClassValidationError as group:
            raise _first_problem(group, value, keys) from None

    return structure_class


def _resolve_types(cls: type) -> None:
    """Resolve ``cls``'s annotations for cattrs; a name that cannot be resolved (a type imported
    only for type checking, a class local to a function) is ``Any``: its values are taken as they are."""
    try:
        attrs.resolve_types(cls)
    except Exception:
        module = sys.modules.get(cls.__module__)
        attrs.resolve_types(cls, localns=_AnyForUnknownNames(vars(module) if module is not None else {}))


class _AnyForUnknownNames(dict):
    """Names for evaluating annotations: the module's, the builtins, else ``Any``."""

    def __init__(self, namespace: Mapping[str, Any]) -> None:
        super().__init__()
        self._namespace = namespace

    def __missing__(self, name: str) -> Any:
        if name in self._namespace:
            return self._namespace[name]
        return getattr(builtins, name, Any)


def _first_problem(group: BaseException, value: Mapping[str, Any], keys: Mapping[str, str]) -> ConfigError:
    """One :class:`ConfigError`, its path relative to the class, for cattrs' errors of one class:
    an unknown key (in the order written), else the first bad key as written, else the first
    missing key; without a key (the class's constructor or validators), at the class itself."""
    from cattrs.errors import AttributeValidationNote, ForbiddenExtraKeysError

    written = {str(k): i for i, k in enumerate(value)}
    found = []
    for exc in getattr(group, "exceptions", (group,)):
        note = next((n for n in getattr(exc, "__notes__", ()) if isinstance(n, AttributeValidationNote)), None)
        key = keys.get(note.name, note.name) if note is not None else None
        if isinstance(exc, ForbiddenExtraKeysError):
            unknown = [str(k) for k in value if k in exc.extra_fields]
            allowed = list(keys.values())
            hint = difflib.get_close_matches(unknown[0], allowed, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            error = ConfigError(f"unknown key{did} (expected one of: {', '.join(allowed) or 'none'})", path=unknown[0])
            found.append((0, 0, error))
        elif key is not None and isinstance(exc, KeyError) and key not in written:
            found.append((2, 0, ConfigError("required key is missing", path=key)))
        elif key is not None:
            found.append((1, written.get(key, len(written)), _located(exc).under_key(key)))
        else:
            problem = _located(exc)  # the constructor's: its path is relative to the class
            found.append((1, -1, ConfigError(problem.message, path=problem.path)))
    return min(found, key=lambda t: t[:2])[2]


def _located(exc: BaseException) -> _Problem:
    """``exc`` (a hook's, a nested class's, a list's or a constructor's error) as a problem with a
    relative key path."""
    from cattrs.errors import IterableValidationError, IterableValidationNote

    if isinstance(exc, IterableValidationError):
        inner = exc.exceptions[0]
        note = next(n for n in getattr(inner, "__notes__", ()) if isinstance(n, IterableValidationNote))
        problem = _located(inner)
        if problem.absolute:
            return problem
        return _Problem(problem.message, f"[{note.index}]" + (_dot(problem.path) if problem.path else ""))
    if isinstance(exc, ConfigError):
        return _Problem(exc.message, exc.path, absolute=_is_absolute(exc.path))
    return _Problem(" ".join(str(exc).split()) or type(exc).__name__, None)


@attrs.frozen
class _Problem:
    message: str
    path: str | None
    absolute: bool = False

    def under_key(self, key: str) -> ConfigError:
        """The problem as an error at ``key`` (a path inside it stays relative to it)."""
        if self.absolute:
            return ConfigError(self.message, path=self.path)
        if not self.path:
            return ConfigError(self.message, path=key)
        return ConfigError(self.message, path=key + _dot(self.path))


def _dot(path: str) -> str:
    return path if path.startswith("[") else f".{path}"


def _is_absolute(path: str | None) -> bool:
    from packforcing.core.errors import TOP_LEVEL_KEYS

    if not path:
        return False
    return path.split(".")[0].split("[")[0] in TOP_LEVEL_KEYS


@functools.cache
def converter() -> cattrs.Converter:
    """The converter every parameter class is structured with (built on first use)."""
    import cattrs

    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)
    # cattrs tries the hooks registered last first: the catch-all goes first
    conv.register_structure_hook_func(lambda tp: True, _as_is)
    conv.register_structure_hook_factory(attrs.has, _attrs_class)
    conv.register_structure_hook_func(_is_mapping, _mapping)
    conv.register_structure_hook_factory(_is_sequence, _sequence)
    conv.register_structure_hook_factory(_is_union, _union)
    for tp, hook in ((bool, _bool), (int, _int), (float, _float), (str, _str)):
        conv.register_structure_hook(tp, hook)
    return conv


def structure(cls: type, data: Any, path: str, owner: str | None = None) -> Any:
    """Build attrs class ``cls`` from mapping ``data``; errors name ``path`` and the key.
    ``owner`` (``"backend 'auto'"``) names what ``data`` configures, for the error when ``cls``
    takes no keys at all."""
    if isinstance(data, cls):
        return data
    if owner and isinstance(data, Mapping) and data and attrs.has(cls) and not attrs.fields(cls):
        return _raise(ConfigError(f"unknown key ({owner} takes no parameters)", path=str(next(iter(data)))), path)
    try:
        return converter().structure({} if data is None else data, cls)
    except ConfigError as exc:
        return _raise(exc, path)


def _raise(exc: ConfigError, path: str) -> Any:
    raise (exc.under(path) if path else exc) from None


def unstructure(obj: Any) -> Any:
    """Plain YAML/JSON-able data of an attrs instance (tuples become lists)."""
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: unstructure(v) for k, v in obj.items()}
    return obj
