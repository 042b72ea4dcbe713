"""Composing config files: ``extends`` chains deep-merged in order, recording which file set
each key path; a component block naming another component replaces the inherited one."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from packforcing.core.errors import ConfigError, DeprecatedKeyWarning
from packforcing.core.keypaths import KeyPath
from packforcing.core.structure import show
from packforcing.core.yamlfile import file_label, file_problem, read_yaml
from packforcing.plugins.kinds import DEPRECATED_KEYS


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


def _replaces(old: Any, new: Any) -> bool:
    """``new`` names a different component than ``old``: it replaces it instead of merging."""
    return (
        isinstance(old, Mapping)
        and isinstance(new, Mapping)
        and "name" in old
        and "name" in new
        and new["name"] != old["name"]
    )


def deep_merge(
    base: Mapping[str, Any], over: Mapping[str, Any], *, _prefix: KeyPath = (), _replaced: list[KeyPath] | None = None
) -> dict[str, Any]:
    """``over`` merged into ``base``; a component block naming another component replaces it."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        old = out.get(key)
        path = (*_prefix, str(key))
        if isinstance(old, Mapping) and isinstance(value, Mapping) and not _replaces(old, value):
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
        where = "extends" if single else f"extends[{i}]"
        problem = file_problem(parent_path, yaml_suffix=True)  # never read /etc/shadow as a parent
        if problem:
            raise ConfigError(f"{parent}: {problem}", source=label, path=where)
        pdata, psources = load_file(parent_path, (*stack, path))
        merged, sources = _compose(merged, sources, pdata, psources)
    return _compose(merged, sources, data, dict.fromkeys(_key_paths(data), label))
