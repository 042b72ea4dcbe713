"""Key paths of a config (``"policy.tiers[1].blocks"``) and which file set each one."""

from __future__ import annotations

import re
from collections.abc import Mapping

from packforcing.core.errors import ConfigError

KeyPath = tuple[str, ...]


def split_path(path: str) -> KeyPath:
    """``"policy.tiers[1].blocks"`` → ``("policy", "tiers", "1", "blocks")``."""
    parts: list[str] = []
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if m is None:
            parts.append(part)
            continue
        if m.group(1):
            parts.append(m.group(1))
        parts.extend(re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(parts)


def source_of(sources: Mapping[KeyPath, str], path: str | None, default: str | None) -> str | None:
    if not path:
        return default
    parts = split_path(path)
    for n in range(len(parts), 0, -1):
        found = sources.get(parts[:n])
        if found is not None:
            return found
    return default


def locate(exc: ConfigError, sources: Mapping[KeyPath, str], default: str | None) -> ConfigError:
    """``exc`` attributed to the file that set its key path (if it names no file yet)."""
    return exc.located(source_of(sources, exc.path, default))
