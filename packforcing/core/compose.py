"""Composing config files: ``extends`` chains deep-merged in order (a parent is a path relative
to the file, else the name of a packaged preset), recording which file set each key path; a
component block naming another component replaces the inherited one."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from packforcing import presets
from packforcing.core.errors import ConfigError, DeprecatedKeyWarning
from packforcing.core.keypaths import KeyPath
from packforcing.core.structure import show
from packforcing.core.yamlfile import file_label, file_problem, preset_hint, read_yaml
from packforcing.plugins.kinds import BY_NAME, DEPRECATED_KEYS, Kind


def deprecated_key(old: str, source: str | None) -> str:
    """The kind name for the deprecated top-level key ``old`` (``attention`` → ``backend``),
    warning once per source with a :class:`DeprecatedKeyWarning`."""
    new = DEPRECATED_KEYS[old]
    where = f"{source}: " if source else ""
    warnings.warn(f"{where}{old}: deprecated key, read as {new} (write {new} instead)", DeprecatedKeyWarning, 3)
    return new


def rename_deprecated_keys(data: dict[str, Any], source: str | None) -> dict[str, Any]:
    """``data`` (one file's or mapping's top level) with deprecated keys renamed to their kind's
    name, in place of the old key; giving both the old and the new key is an error."""
    if not any(old in data for old in DEPRECATED_KEYS):
        return data
    for old, new in DEPRECATED_KEYS.items():
        if old in data and new in data:
            raise ConfigError(f"both {old} (deprecated) and {new} are given; keep only {new}", source=source, path=old)
    return {(deprecated_key(k, source) if k in DEPRECATED_KEYS else k): v for k, v in data.items()}


def _replaces(old: Any, new: Any, kind: Kind | None = None) -> bool:
    """``new`` names a different component than ``old``: it replaces it instead of merging.

    For a top-level component section (``kind`` given) the names are the effective ones, as
    ``--set KIND.name=...`` sees them: a section without ``name`` of a kind whose name is optional
    (``sampler``) is the kind's default component."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping) and "name" in new):
        return False
    old_name = old.get("name")
    if old_name is None and kind is not None and kind.name_optional:
        old_name = kind.default
    return old_name is not None and new["name"] != old_name


def _as_section(value: Any, other: Any, kind: Kind | None) -> Any:
    """A top-level component section spelled as its name (``policy: full``) as the mapping it
    stands for (``{name: full}``), when it meets a mapping to merge with."""
    if kind is not None and isinstance(value, str) and isinstance(other, Mapping):
        return {"name": value}
    return value


def deep_merge(
    base: Mapping[str, Any], over: Mapping[str, Any], *, _prefix: KeyPath = (), _replaced: list[KeyPath] | None = None
) -> dict[str, Any]:
    """``over`` merged into ``base``; a component section naming another component replaces it
    (see :func:`_replaces`)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        kind = None if _prefix else BY_NAME.get(str(key))
        old = _as_section(out.get(key), value, kind)
        value = _as_section(value, old, kind)
        path = (*_prefix, str(key))
        if isinstance(old, Mapping) and isinstance(value, Mapping) and not _replaces(old, value, kind):
            out[key] = deep_merge(old, value, _prefix=path, _replaced=_replaced)
        else:
            out[key] = copy.deepcopy(value)
            if _replaced is not None and key in base:
                _replaced.append(path)
    return out


def _key_paths(data: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every mapping key path in ``data`` (lists are leaves: they are replaced, never merged)."""
    out: list[KeyPath] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = (*prefix, str(key))
            out.append(path)
            out.extend(_key_paths(value, path))
    return out


def _compose(
    base: dict[str, Any], base_sources: dict[KeyPath, str], over: Mapping[str, Any], over_sources: dict[KeyPath, str]
) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    replaced: list[KeyPath] = []
    merged = deep_merge(base, over, _replaced=replaced)
    sources = {p: s for p, s in base_sources.items() if not any(p[: len(r)] == r and len(p) > len(r) for r in replaced)}
    sources.update(over_sources)
    return merged, sources


def load_file(path: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    """Merged data of ``path`` and its ``extends`` chain, and the file that set each key path."""
    path = path.resolve()
    label = file_label(path)
    if path in stack:
        chain = " -> ".join(file_label(p) for p in (*stack, path))
        raise ConfigError(f"cyclic extends: {chain}", source=file_label(stack[-1]), path="extends")
    data = rename_deprecated_keys(read_yaml(path), label)
    parents = data.pop("extends", None)
    single = isinstance(parents, str)
    if parents is None:
        parents = []
    elif single:
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"expected a path or a list of paths, got {show(parents)}", source=label, path="extends")
    merged: dict[str, Any] = {}
    sources: dict[KeyPath, str] = {}
    for i, parent in enumerate(parents):
        parent_path = path.parent / parent
        if not os.path.lexists(parent_path) and (preset := presets.path(parent)) is not None:
            parent_path = preset  # no such file beside this one: the packaged preset of that name
        where = "extends" if single else f"extends[{i}]"
        problem = file_problem(parent_path, yaml_suffix=True)  # never read /etc/shadow as a parent
        if problem == "file not found" and not Path(parent).is_absolute() and ".." not in Path(parent).parts:
            problem += preset_hint(Path(parent))  # it could have named a preset
        if problem:
            raise ConfigError(f"{parent}: {problem}", source=label, path=where)
        pdata, psources = load_file(parent_path, (*stack, path))
        merged, sources = _compose(merged, sources, pdata, psources)
    return _compose(merged, sources, data, dict.fromkeys(_key_paths(data), label))
