"""Reading one YAML config file, safely: strict keys, bounded size and aliases, one-line errors
naming the file (and line)."""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from packforcing import presets
from packforcing.core.errors import ConfigError


def file_label(path: Path) -> str:
    """How a file is named in messages: relative to the working directory when below it."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: let the base constructor report it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def missing_file(path: Path) -> str:
    hint = ""
    if path.parent.is_dir():
        siblings = {p.stem: p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")}
        close = difflib.get_close_matches(path.stem, list(siblings), n=1)
        hint = f" (did you mean {siblings[close[0]]!r}?)" if close else ""
    if not hint and len(path.parts) == 1:
        hint = preset_hint(path)
    return f"file not found{hint}"


def preset_hint(name: Path) -> str:
    """What to add to "file not found" for ``name``, which could have been a preset's name."""
    close = difflib.get_close_matches(name.with_suffix("").as_posix(), presets.names(), n=1)
    return f" (did you mean the preset {close[0]!r}?)" if close else " (nor a preset: see 'packforcing presets')"


MAX_CONFIG_BYTES = 1 << 20
"""Config files larger than this (1 MiB) are refused unread."""
MAX_YAML_NODES = 100_000
"""A YAML document whose aliases expand to more nodes than this is refused (alias bombs)."""
YAML_SUFFIXES = (".yaml", ".yml")


def file_problem(path: Path, *, yaml_suffix: bool = False) -> str | None:
    """Why ``path`` cannot be a config file (missing, a directory, a FIFO or device, too large;
    with ``yaml_suffix``, not named ``.yaml``/``.yml``), without opening it; ``None`` if it may
    be read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return missing_file(path)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a YAML file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        return f"is {kind}, not a regular file"
    if info.st_size > MAX_CONFIG_BYTES:
        return f"is {info.st_size} bytes; config files are limited to {MAX_CONFIG_BYTES} bytes"
    if yaml_suffix and path.suffix.lower() not in YAML_SUFFIXES:
        return "not a YAML file (files given to extends end in .yaml or .yml)"
    return None


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes ``node`` stands for once every alias is expanded (stops past the limit)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # a node reached again while expanding itself: unbounded
    count = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        count += _expanded_nodes(child, memo)
        if count > MAX_YAML_NODES:
            break
    memo[key] = count
    return count


def read_yaml(path: Path) -> dict[str, Any]:
    label = file_label(path)
    problem = file_problem(path)
    if problem:
        raise ConfigError(problem, source=label)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=label) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"is larger than {MAX_CONFIG_BYTES} bytes, the limit for config files", source=label)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a text file", source=label) from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise ConfigError(
                f"YAML aliases expand to more than {MAX_YAML_NODES} nodes; refusing it (an alias bomb?)", source=label
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", source=where) from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply", source=label) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", source=label)
    return dict(data)
