"""The plugin manager: built-ins plus the ``packforcing`` entry-point group.

This module is the only place that knows pluggy. A :class:`Registry` collects, per component
kind, the factories every plugin returns; a plugin that fails to import, or whose hook raises
or returns the wrong thing, is reported once (a warning naming its distribution) and skipped.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy

from packforcing.plugins import hookspecs
from packforcing.plugins.factory import ComponentFactory

ENTRY_POINT_GROUP = "packforcing"
DISABLE_ENV = "PACKFORCING_DISABLE_PLUGINS"
BUILTIN = "packforcing"

KINDS: dict[str, str] = {
    "model": "packforcing_models",
    "attention": "packforcing_attention_backends",
    "positional": "packforcing_realigners",
    "selector": "packforcing_selectors",
    "compressor": "packforcing_compressors",
    "policy": "packforcing_policies",
}
"""Config key → hook name."""


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded or returned something unusable."""


class UnknownComponentError(LookupError):
    """A config names a component no plugin provides, or one provided twice."""


@attrs.frozen
class Provided:
    """A factory and the distribution (``dist``) and version that provide it."""

    name: str
    kind: str
    factory: ComponentFactory
    dist: str
    version: str


def _builtin_version() -> str:
    try:
        return importlib.metadata.version(BUILTIN)
    except importlib.metadata.PackageNotFoundError:
        return "dev"


class Registry:
    """Components by kind and name, gathered through the plugin hooks."""

    def __init__(self, plugin_manager: pluggy.PluginManager, dists: Mapping[int, tuple[str, str]]) -> None:
        self._pm = plugin_manager
        self._dists = dict(dists)  # id(plugin object) -> (distribution, version)
        self._table: dict[str, dict[str, list[Provided]]] | None = None
        self.problems: list[str] = []

    # ------------------------------------------------------------------ building
    @classmethod
    def create(
        cls,
        *,
        entry_points: bool = True,
        extra_plugins: Iterable[tuple[object, str]] = (),
        disabled: Iterable[str] | None = None,
    ) -> Registry:
        """A fresh registry: built-ins, then ``extra_plugins`` ``(module, dist name)``, then the
        entry-point group (minus distributions named in ``disabled`` or ``$PACKFORCING_DISABLE_PLUGINS``)."""
        from packforcing.plugins import builtin

        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        dists: dict[int, tuple[str, str]] = {}
        problems: list[str] = []
        pm.register(builtin, name=BUILTIN)
        dists[id(builtin)] = (BUILTIN, _builtin_version())
        for plugin, dist in extra_plugins:
            pm.register(plugin, name=f"{dist}:{getattr(plugin, '__name__', id(plugin))}")
            dists[id(plugin)] = (dist, "")
        if entry_points:
            if disabled is None:
                disabled = [d.strip() for d in os.environ.get(DISABLE_ENV, "").split(",") if d.strip()]
            skip = {_norm(d) for d in disabled}
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist.name if ep.dist is not None else ep.value
                version = ep.dist.version if ep.dist is not None else ""
                if _norm(dist) in skip:
                    continue
                try:
                    plugin = ep.load()
                    pm.register(plugin, name=f"{dist}:{ep.name}")
                    pm.check_pending()
                except Exception as exc:
                    problems.append(f"plugin {ep.name!r} from distribution {dist} failed to load: {exc!r}")
                    try:
                        pm.unregister(name=f"{dist}:{ep.name}")
                    except Exception:
                        pass
                    continue
                dists[id(plugin)] = (dist, version)
        registry = cls(pm, dists)
        registry.problems.extend(problems)
        for message in problems:
            warnings.warn(message, PluginWarning, stacklevel=2)
        return registry

    def _collect(self) -> dict[str, dict[str, list[Provided]]]:
        if self._table is not None:
            return self._table
        table: dict[str, dict[str, list[Provided]]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            hook = getattr(self._pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                dist, version = self._dists.get(id(impl.plugin), (impl.plugin_name, ""))
                try:
                    result = impl.function()
                    if not isinstance(result, Mapping):
                        raise TypeError(f"expected a mapping of name -> ComponentFactory, got {type(result).__name__}")
                    for name, factory in result.items():
                        if not isinstance(name, str) or not isinstance(factory, ComponentFactory):
                            raise TypeError(f"entry {name!r} is not a ComponentFactory")
                except Exception as exc:
                    message = f"plugin {impl.plugin_name!r} from distribution {dist}: hook {hook_name} failed: {exc}"
                    self.problems.append(message)
                    warnings.warn(message, PluginWarning, stacklevel=2)
                    continue
                for name, factory in result.items():
                    table[kind].setdefault(name, []).append(Provided(name, kind, factory, dist, version))
        self._table = table
        return table

    # ------------------------------------------------------------------ lookup
    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind`` (a config key such as ``"policy"``)."""
        return sorted(self._collect()[kind])

    def providers(self) -> list[Provided]:
        """Every registered component, for listing."""
        return [p for kind in KINDS for name in self.names(kind) for p in self._collect()[kind][name]]

    def get(self, kind: str, name: str) -> Provided:
        """The factory for ``name``; ``"dist:name"`` picks one distribution's when several provide it."""
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
        table = self._collect()[kind]
        dist = None
        if ":" in name:
            dist, name = name.split(":", 1)
        candidates = table.get(name, [])
        if dist is not None:
            candidates = [p for p in candidates if _norm(p.dist) == _norm(dist)]
        if not candidates:
            available = ", ".join(sorted(table)) or "none"
            hint = difflib.get_close_matches(name, list(table), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            where = f" from distribution {dist}" if dist else ""
            raise UnknownComponentError(f"unknown {kind} {name!r}{where}{did_you_mean}; available: {available}")
        if len(candidates) > 1:
            owners = " and ".join(p.dist for p in candidates)
            raise UnknownComponentError(f"{kind} {name!r} is provided by {owners}; pick one as '<distribution>:{name}'")
        return candidates[0]

    def factory(self, kind: str, name: str) -> ComponentFactory:
        return self.get(kind, name).factory


def _norm(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry (plugins load, and problems are reported, once)."""
    return Registry.create()


def build_component(registry: Registry, kind: str, name: str, params: Any, env: Any) -> Any:
    """Build ``name`` of ``kind`` from already-structured ``params``."""
    return registry.factory(kind, name).build(params, env)
