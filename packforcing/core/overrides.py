"""``--set KEY.PATH=VALUE`` overrides, applied last with YAML-typed values."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from packforcing.core.compose import deprecated_key
from packforcing.core.errors import ConfigError
from packforcing.core.keypaths import KeyPath, split_path
from packforcing.core.structure import show
from packforcing.plugins.kinds import DEPRECATED_KEYS, KINDS

COMPONENT_KEYS = tuple(k.name for k in KINDS)
"""The kinds' names: the components' config keys, in build order."""
DEFAULT_COMPONENTS = {k.name: k.default for k in KINDS if k.default is not None}
NAME_OPTIONAL = tuple(k.name for k in KINDS if k.name_optional)
OVERRIDE_SOURCE = "--set"


def _parse_value(raw: str) -> Any:
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(
    data: dict[str, Any], override: str, sources: dict[KeyPath, str] | None = None, label: str = OVERRIDE_SOURCE
) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` (value parsed as YAML; ``a.list[1].b`` or ``a.list.1.b`` index lists)
    to a copy of ``data``; records ``label`` (``--set``, or the option that set it, e.g.
    ``--blocks``) as the source of the key in ``sources``."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"expected KEY.PATH=VALUE, got {override!r}", source=label)
    value = _parse_value(raw)
    parts = split_path(key)
    if parts[0] in DEPRECATED_KEYS:  # --set attention.name=sdpa: the backend's name
        new = deprecated_key(parts[0], label)
        key = new + key[len(parts[0]) :]
        parts = (new, *parts[1:])
    out = copy.deepcopy(data)
    node: Any = out
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"{'.'.join(parts[:i])} is a list: index it with a number", source=label, path=key)
            index = int(part)
            if index >= len(node):
                raise ConfigError(f"index {index} is out of range ({len(node)} items)", source=label, path=key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(
                f"cannot set it: {'.'.join(parts[:i])} is {show(node)}, not a mapping", source=label, path=key
            )
        if last:
            current = node.get("name", DEFAULT_COMPONENTS.get(parts[0]) if parts[0] in NAME_OPTIONAL else None)
            if i == 1 and part == "name" and parts[0] in COMPONENT_KEYS and current not in (None, value):
                node.clear()  # a different component: the old one's parameters do not carry over
                if sources is not None:
                    for p in [p for p in sources if p[:1] == parts[:1] and len(p) > 1]:
                        del sources[p]
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and i == 0 and part in COMPONENT_KEYS:
                child = node[part] = {"name": child}  # "policy: full" spelled as a string
            node = child
        if sources is not None:
            sources[split_path(here)] = label
    if sources is not None:
        for p in [p for p in sources if p[: len(parts)] == parts and len(p) > len(parts)]:
            sources[p] = label
    return out
