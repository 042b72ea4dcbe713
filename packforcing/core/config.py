"""Loading, composing and validating run configurations.

A config is a mapping with the top-level keys ``model``, ``policy``, ``compressor``,
``selector``, ``positional``, ``attention``, ``sampler`` and ``run``. Component blocks are
``name:`` plus that component's parameters (declared by its plugin as an attrs class).
Files may ``extends:`` other files (a path or a list, relative to the file, deep-merged in
order, later wins); ``overrides`` such as ``"policy.window_frames=64"`` are applied last with
YAML-typed values. Every problem raises :class:`ConfigError` naming the file and key path.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from packforcing.core.errors import ConfigError
from packforcing.core.geometry import DTYPES
from packforcing.core.sampler import FlowMatchSampler
from packforcing.core.structure import structure, unstructure
from packforcing.core.validators import non_negative, one_of, positive

COMPONENT_KEYS = ("model", "policy", "compressor", "selector", "positional", "attention")
TOP_KEYS = (*COMPONENT_KEYS, "sampler", "run")
DEFAULT_COMPONENTS = {"model": "tiny_dit", "positional": "identity", "attention": "auto"}
OPTIONAL_COMPONENTS = ("compressor", "selector")


@attrs.frozen
class RunParams:
    """The ``run:`` block."""

    seed: int = attrs.field(default=0, validator=non_negative)
    blocks: int = attrs.field(default=16, validator=positive)
    batch_size: int = attrs.field(default=1, validator=positive)
    device: str = "auto"
    dtype: str = attrs.field(default="float32", validator=one_of(*DTYPES))
    fps: float = 16.0
    """Frames per second of the written video (one latent frame decodes to one frame)."""


@attrs.frozen
class ComponentSpec:
    """A resolved component: its registered ``name`` and structured ``params``."""

    name: str
    params: Any


@attrs.frozen
class Config:
    """A validated configuration. ``data`` is the merged mapping it was built from."""

    data: dict[str, Any]
    source: str | None
    components: dict[str, ComponentSpec | None]
    sampler: FlowMatchSampler
    run: RunParams

    def resolved(self) -> dict[str, Any]:
        """Every section with defaults filled in (YAML/JSON-able)."""
        out: dict[str, Any] = {}
        for key in COMPONENT_KEYS:
            spec = self.components.get(key)
            out[key] = None if spec is None else {"name": spec.name, **unstructure(spec.params)}
        out["sampler"] = unstructure(self.sampler)
        out["run"] = unstructure(self.run)
        return out


# ---------------------------------------------------------------------- YAML files
def _read_yaml(path: Path) -> dict[str, Any]:
    label = os.path.relpath(path) if path.is_absolute() else str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", source=label) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=label) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", source=where) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", source=label)
    return dict(data)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``; a component block naming another component replaces it."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            if "name" in value and "name" in old and value["name"] != old["name"]:
                out[key] = copy.deepcopy(dict(value))
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_file(path: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merged data of ``path`` and its ``extends`` chain, and the source file of each top key."""
    path = path.resolve()
    label = os.path.relpath(path)
    if path in stack:
        chain = " -> ".join(os.path.relpath(p) for p in (*stack, path))
        raise ConfigError(f"extends: cycle {chain}", source=label)
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"expected a path or a list of paths, got {parents!r}", source=label, path="extends")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.exists():
            raise ConfigError(f"extends: file not found: {parent}", source=label, path="extends")
        pdata, psources = _load_file(parent_path, (*stack, path))
        merged = deep_merge(merged, pdata)
        sources.update(psources)
    merged = deep_merge(merged, data)
    sources.update({k: label for k in data})
    return merged, sources


# ---------------------------------------------------------------------- overrides
def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` (value parsed as YAML) to a copy of ``data``."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE", source="--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    out = copy.deepcopy(data)
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a mapping", source="--set")
        node = child
    last = parts[-1]
    if len(parts) == 2 and last == "name" and node.get("name") not in (None, value):
        node.clear()  # a different component: the old one's parameters do not carry over
    node[last] = value
    return out


# ---------------------------------------------------------------------- entry point
def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    registry: Any = None,
) -> Config:
    """Load, compose and validate a config from a YAML path or a mapping."""
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
        label = None
        sources: dict[str, str] = {}
        if "extends" in data:
            raise ConfigError("extends: only supported in files", path="extends")
    else:
        data, sources = _load_file(Path(source), ())
        label = os.path.relpath(Path(source).resolve())
    for override in overrides:
        data = apply_override(data, override)
        key = override.partition("=")[0].split(".")[0]
        sources[key] = "--set"
    for key in data:
        if key not in TOP_KEYS:
            import difflib

            hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"unknown top-level key{did} (expected one of: {', '.join(TOP_KEYS)})",
                source=sources.get(key, label),
                path=str(key),
            )
    if registry is None:
        from packforcing.plugins.manager import default_registry

        registry = default_registry()
    components: dict[str, ComponentSpec | None] = {}
    for key in COMPONENT_KEYS:
        where = sources.get(key, label)
        block = data.get(key)
        if block is None:
            if key in OPTIONAL_COMPONENTS:
                components[key] = None
                continue
            if key not in DEFAULT_COMPONENTS:
                raise ConfigError("required section is missing", source=where, path=key)
            block = {"name": DEFAULT_COMPONENTS[key]}
        if isinstance(block, str):
            block = {"name": block}
        if not isinstance(block, Mapping) or not isinstance(block.get("name"), str):
            raise ConfigError(f"expected a mapping with a 'name', got {block!r}", source=where, path=key)
        params = {k: v for k, v in block.items() if k != "name"}
        try:
            factory = registry.factory(key, block["name"])
            structured = structure(factory.params, params, key)
        except ConfigError as exc:
            raise exc.located(where) from None
        except LookupError as exc:
            raise ConfigError(str(exc.args[0]), source=where, path=f"{key}.name") from None
        components[key] = ComponentSpec(block["name"], structured)
    try:
        sampler = structure(FlowMatchSampler, data.get("sampler") or {}, "sampler")
    except ConfigError as exc:
        raise exc.located(sources.get("sampler", label)) from None
    try:
        run = structure(RunParams, data.get("run") or {}, "run")
    except ConfigError as exc:
        raise exc.located(sources.get("run", label)) from None
    return Config(data=data, source=label, components=components, sampler=sampler, run=run)
