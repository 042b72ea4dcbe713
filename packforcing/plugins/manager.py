"""The plugin manager: built-ins plus the ``packforcing`` entry-point group.

This module is the only place that knows pluggy. A :class:`Registry` collects, per component
kind (:mod:`packforcing.plugins.kinds`), what every plugin's hook returns — component classes
or factories — calling each plugin's hook through pluggy's hook caller; a plugin that fails to
import, or whose hook raises or returns the wrong thing, is reported once (a warning naming its
distribution) and skipped.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import pluggy

from packforcing.plugins import hookspecs
from packforcing.plugins.factory import ComponentFactory, LazyFactory, Registered, as_factory, loaded
from packforcing.plugins.kinds import BY_NAME, Kind
from packforcing.plugins.kinds import KINDS as KIND_TABLE

ENTRY_POINT_GROUP = "packforcing"
DISABLE_ENV = "PACKFORCING_DISABLE_PLUGINS"
BUILTIN = "packforcing"

KINDS: dict[str, str] = {k.name: k.hook for k in KIND_TABLE}
"""Kind name (config key) → hook name (read from :data:`packforcing.plugins.kinds.KINDS`)."""

EntryPoints = Iterable[importlib.metadata.EntryPoint]
EntryPointSource = bool | EntryPoints | Callable[[], EntryPoints]
"""``True``: the installed ``packforcing`` entry points; ``False``: none; or the entry points
themselves (an iterable, or a callable returning one), e.g. a test's own fake distributions."""


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded or returned something unusable."""


class UnknownComponentError(LookupError):
    """A config names a component no plugin provides, or one provided twice."""


@attrs.frozen
class Provided:
    """A registered component: its factory (``entry``, possibly not imported yet) and the
    distribution (``dist``) and version that provide it."""

    name: str
    kind: str
    entry: Registered
    dist: str
    version: str

    @property
    def factory(self) -> ComponentFactory:
        """The component's factory (a component registered by import path is imported on first
        use); one that cannot be imported, or is not of its kind, is a :class:`PluginError`
        naming it and its distribution."""
        try:
            return loaded(self.entry)
        except Exception as exc:  # importing a plugin's module may raise anything
            from packforcing.core.errors import PluginError

            target = getattr(self.entry, "target", None)
            source = f" from {target}" if target else ""
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise PluginError(
                f"cannot be loaded{source}: {detail}", kind=self.kind, name=self.name, distribution=self.dist
            ) from exc

    @property
    def description(self) -> str:
        """One line for ``packforcing plugins`` (nothing is imported)."""
        return self.entry.description


def _builtin_version() -> str:
    try:
        return importlib.metadata.version(BUILTIN)
    except importlib.metadata.PackageNotFoundError:
        return "dev"


class Registry:
    """Components by kind and name, gathered through the plugin hooks.

    Plugin problems never break the registry: a plugin that fails to load, implements a hook
    that does not exist, or whose hook raises or returns something other than a mapping of
    ``name -> ComponentFactory`` is skipped, and the problem is recorded in :attr:`problems`
    and reported once as a :class:`PluginWarning` naming its distribution.
    """

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
        entry_points: EntryPointSource = True,
        extra_plugins: Iterable[tuple[object, str]] = (),
        disabled: Iterable[str] | None = None,
    ) -> Registry:
        """A fresh registry: built-ins, then ``extra_plugins`` ``(module, dist name)``, then the
        entry points (see :data:`EntryPointSource`; by default the installed ``packforcing``
        group), minus the distributions named in ``disabled`` (default: the comma-separated
        ``$PACKFORCING_DISABLE_PLUGINS``)."""
        from packforcing.plugins import builtin

        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        if disabled is None:
            disabled = os.environ.get(DISABLE_ENV, "").split(",")
        skip = {_norm(d.strip()) for d in disabled if d.strip()}
        registry = cls(pm, {})
        registry._register(builtin, BUILTIN, BUILTIN, _builtin_version())
        for plugin, dist in extra_plugins:
            if _norm(dist) not in skip:
                registry._register(plugin, f"{dist}:{getattr(plugin, '__name__', id(plugin))}", dist, "")
        for ep in _entry_point_list(entry_points):
            dist = ep.dist.name if ep.dist is not None else ep.value.split(".")[0]
            version = ep.dist.version if ep.dist is not None else ""
            if _norm(dist) in skip:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                registry._problem(f"plugin {ep.name!r} from distribution {dist} failed to load: {_describe(exc)}")
                continue
            registry._register(plugin, f"{dist}:{ep.name}", dist, version)
        return registry

    def _problem(self, message: str) -> None:
        self.problems.append(message)
        warnings.warn(message, PluginWarning, stacklevel=3)

    def _register(self, plugin: object, name: str, dist: str, version: str) -> None:
        """Register one plugin object; a bad one is reported and left out."""
        unknown = _unknown_hooks(plugin)
        if unknown:
            self._problem(f"plugin {name!r} from distribution {dist}: {unknown}; plugin skipped")
            return
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            self._problem(f"plugin {name!r} from distribution {dist} could not be registered: {_describe(exc)}")
            if self._pm.get_plugin(name) is not None:
                self._pm.unregister(name=name)
            return
        self._dists[id(plugin)] = (dist, version)

    def _collect(self) -> dict[str, dict[str, list[Provided]]]:
        if self._table is not None:
            return self._table
        table: dict[str, dict[str, list[Provided]]] = {k.name: {} for k in KIND_TABLE}
        plugins = self._pm.get_plugins()
        for kind in KIND_TABLE:
            # the kind's hook, then its deprecated former names, merged into the same table
            impls = [(hook, impl) for hook in _hooks(kind) for impl in getattr(self._pm.hook, hook).get_hookimpls()]
            for hook, impl in impls:  # registration order: built-ins first
                dist, version = self._dists.get(id(impl.plugin), (impl.plugin_name, ""))
                # this plugin's implementation alone, through pluggy's hook caller (which passes
                # each implementation the hookspec arguments it asks for)
                caller = self._pm.subset_hook_caller(hook, [p for p in plugins if p is not impl.plugin])
                try:
                    results = caller()
                    result = _checked(results[0] if results else None, kind.base_class)
                except Exception as exc:
                    self._problem(
                        f"plugin {impl.plugin_name!r} from distribution {dist}: {hook}() {_describe(exc)}; "
                        "its components are skipped"
                    )
                    continue
                for name, factory in result.items():
                    providers = table[kind.name].setdefault(name, [])
                    if any(p.dist == dist for p in providers):
                        continue  # the same distribution through two entry points
                    providers.append(Provided(name, kind.name, factory.named(name), dist, version))
        self._table = table
        return table

    # ------------------------------------------------------------------ lookup
    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind`` (a config key such as ``"policy"``)."""
        return sorted(self._collect()[kind])

    def providers(self) -> list[Provided]:
        """Every registered component (by kind, then name), for listing."""
        return [p for kind in KINDS for name in self.names(kind) for p in self._collect()[kind][name]]

    def distributions(self) -> dict[str, str]:
        """Distribution → version of every registered plugin, built-ins included."""
        return dict(sorted(set(self._dists.values())))

    def get(self, kind: str, name: str) -> Provided:
        """The factory for ``name``; ``"<distribution>:<name>"`` picks one distribution's when
        several provide the same name."""
        if kind not in BY_NAME:
            raise UnknownComponentError(f"unknown component kind {kind!r}; expected one of {', '.join(BY_NAME)}")
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
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint and hint[0] != name else ""
            if dist is not None and name in table:
                owners = ", ".join(p.dist for p in table[name])
                raise UnknownComponentError(
                    f"{kind} {name!r} is not provided by distribution {dist}; it is provided by {owners}"
                )
            where = f" from distribution {dist}" if dist else ""
            raise UnknownComponentError(f"unknown {kind} {name!r}{where}{did_you_mean}; available: {available}")
        if len(candidates) > 1:
            owners = " and ".join(p.dist for p in candidates)
            raise UnknownComponentError(
                f"{kind} {name!r} is provided by {owners}; pick one as '<distribution>:{name}' "
                f"(e.g. '{candidates[-1].dist}:{name}') or disable one with {DISABLE_ENV}"
            )
        return candidates[0]

    def factory(self, kind: str, name: str) -> ComponentFactory:
        """The factory registered as ``name`` (its :meth:`~ComponentFactory.create` names what it builds)."""
        return self.get(kind, name).factory

    def build(self, kind: str, name: str, params: Any, env: Any) -> Any:
        """Build ``name`` of ``kind`` from already-structured ``params``; the component's ``name``
        is the registered one."""
        return self.factory(kind, name).create(params, env)


def _entry_point_list(source: EntryPointSource) -> list[importlib.metadata.EntryPoint]:
    if source is True:
        found: Iterable[importlib.metadata.EntryPoint] = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    elif source is False:
        found = ()
    elif callable(source):
        found = source()
    else:
        found = source
    return sorted(found, key=lambda ep: (ep.value, ep.name))


def entry_points_in(*paths: str | os.PathLike[str]) -> list[importlib.metadata.EntryPoint]:
    """The ``packforcing`` entry points of the distributions installed in ``paths`` only (e.g. a
    test's own site directory), for :meth:`Registry.create`'s ``entry_points``."""
    found: list[importlib.metadata.EntryPoint] = []
    for dist in importlib.metadata.distributions(path=[os.fspath(p) for p in paths]):
        found.extend(ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP)
    return found


def _describe(exc: BaseException) -> str:
    """``TypeError: message`` on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unknown_hooks(plugin: object) -> str:
    """A message for ``@hookimpl`` functions that match no hook (typos) and for functions named
    like a hook but not marked ``@hookimpl``, or ``""``."""
    marker = f"{hookspecs.PROJECT}_impl"
    known = [hook for k in KIND_TABLE for hook in _hooks(k)]
    problems = []
    for attr in dir(plugin):
        try:
            value = getattr(plugin, attr)
        except Exception:
            continue
        marked = getattr(value, marker, None) is not None
        if marked and attr in known:
            continue
        hint = difflib.get_close_matches(attr, known, n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint and hint[0] != attr else ""
        if marked:
            problems.append(f"unknown hook {attr!r}{did}")
        elif callable(value) and attr.startswith(f"{hookspecs.PROJECT}_") and not isinstance(value, type):
            what = "hook" if attr in known else "function named like a hook"
            problems.append(f"{what} {attr!r}{did} is not marked @hookimpl")
    return "; ".join(problems)


def _hooks(kind: Kind) -> tuple[str, ...]:
    """The hook of ``kind`` and its deprecated former names."""
    return (kind.hook, *kind.deprecated_hooks)


def _checked(result: Any, base: Callable[[], type | None]) -> dict[str, Registered]:
    """A hook's result as ``name -> factory`` if it is a mapping of valid names to factories,
    lazy factories (checked when loaded) or component classes (subclasses of ``base()``, the
    kind's interface, imported only to check a class), else a TypeError."""
    if not isinstance(result, Mapping):
        raise TypeError(f"returned {type(result).__name__}, expected a mapping of name -> component class or factory")
    out: dict[str, Registered] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise TypeError(f"returned an invalid component name {name!r} (a non-empty string without ':')")
        if isinstance(value, LazyFactory):
            out[name] = attrs.evolve(value, base=base)
        elif isinstance(value, ComponentFactory):
            out[name] = value
        else:
            out[name] = as_factory(name, value, base())
    return out


def _norm(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry (plugins load, and problems are reported, once)."""
    return Registry.create()
