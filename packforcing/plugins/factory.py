"""What a plugin registers: a component class, or a parameters class and a build function.

A hook returns ``{name: value}``. The simplest value is the component class itself::

    class MyPool(PoolCompressor):
        \"\"\"Average pooling, my way.\"\"\"           # the description `packforcing plugins` shows

Its YAML parameters come from the class (:func:`params_class_of`), it is built with
``cls(params)`` (or ``cls.from_env(params, env)`` when it needs collaborators such as the model),
and it is named by the key it was registered under. :class:`ComponentFactory` spells the same
three things out, for the rare component that needs a build function of its own.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class EmptyParams:
    """A component without parameters."""


@attrs.frozen
class ComponentFactory:
    """``params``: an attrs class declaring the YAML parameters (validated and typed);
    ``build(params, env)``: returns the component, given a :class:`~packforcing.core.build.BuildEnv`
    with the geometry, model, backend and other already-built parts; ``description``: one line for
    ``packforcing plugins``. ``name`` is set by the registry (the key the factory is registered
    under) and given to every component :meth:`create` builds; ``component`` is the registered
    class when the factory was derived from one."""

    params: type
    build: Callable[[Any, Any], Any]
    description: str = ""
    name: str | None = attrs.field(default=None, kw_only=True)
    component: type | None = attrs.field(default=None, kw_only=True, repr=False)

    def __attrs_post_init__(self) -> None:
        if not attrs.has(self.params):
            raise TypeError(f"ComponentFactory.params must be an attrs class, got {self.params!r}")
        if not callable(self.build):
            raise TypeError(f"ComponentFactory.build must be callable as build(params, env), got {self.build!r}")
        if not isinstance(self.description, str):
            raise TypeError(f"ComponentFactory.description must be a string, got {self.description!r}")

    @classmethod
    def from_class(cls, component: type, description: str | None = None) -> ComponentFactory:
        """The factory of a component class (see the module docstring and :func:`params_class_of`)."""
        params = params_class_of(component)
        from_env = getattr(component, "from_env", None)
        if callable(from_env):
            build: Callable[[Any, Any], Any] = from_env
        elif params is component:
            build = _itself
        elif params is EmptyParams and not _takes_params(component):
            build = _without_params(component)
        else:
            build = _with_params(component)
        return cls(
            params,
            build,
            description if description is not None else first_doc_line(component),
            component=component,
        )

    def named(self, name: str) -> ComponentFactory:
        """This factory, registered as ``name``."""
        return attrs.evolve(self, name=name)

    def create(self, params: Any, env: Any) -> Any:
        """Build the component from structured ``params`` and name it as registered."""
        component = self.build(params, env)
        if self.name is not None:
            give_name(component, self.name)
        return component


@attrs.frozen
class LazyFactory:
    """A component named by import path, imported only when first used.

    ``target`` is ``"module:attribute"`` naming a component class or a :class:`ComponentFactory`;
    ``description`` is what ``packforcing plugins`` lists without importing it. The built-ins
    register this way, so listing components and reading the table of kinds import neither
    torch nor any component. :meth:`load` imports the target and checks it as a hook's value
    (a class must derive from ``base()``, the kind's interface)."""

    target: str
    description: str
    base: Callable[[], type | None] | None = attrs.field(default=None, repr=False)
    name: str | None = attrs.field(default=None, kw_only=True)

    def load(self) -> ComponentFactory:
        """The :class:`ComponentFactory` of the target (imported once), named as registered; a
        factory without a description takes this one."""
        return _load(self.target, self.name, self.base, self.description)

    def named(self, name: str) -> LazyFactory:
        """This factory, registered as ``name``."""
        return attrs.evolve(self, name=name)


@functools.cache
def _load(target: str, name: str | None, base: Callable[[], type | None] | None, description: str) -> ComponentFactory:
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    factory = as_factory(name or attr, value, base() if base is not None else None)
    if not factory.description:
        factory = attrs.evolve(factory, description=description)
    return factory.named(name) if name is not None else factory


Registered = ComponentFactory | LazyFactory
"""What the registry holds per name: a factory, or a :class:`LazyFactory` that loads one."""


def loaded(entry: Registered) -> ComponentFactory:
    """``entry`` as a :class:`ComponentFactory` (a :class:`LazyFactory` is imported)."""
    return entry.load() if isinstance(entry, LazyFactory) else entry


def _itself(params: Any, env: Any) -> Any:
    return params


def _with_params(component: type) -> Callable[[Any, Any], Any]:
    return lambda params, env: component(params)


def _without_params(component: type) -> Callable[[Any, Any], Any]:
    return lambda params, env: component()


def _takes_params(component: type) -> bool:
    try:
        return "params" in inspect.signature(component).parameters
    except (TypeError, ValueError):
        return False


def params_class_of(component: type[Any]) -> type:
    """The attrs class holding ``component``'s YAML parameters: the class itself when it is an
    attrs class (it is its own parameters), else its ``Params`` attribute, else the annotation
    of the ``params`` argument of ``__init__`` (``X | None`` counts as ``X``), else
    :class:`EmptyParams`."""
    if attrs.has(component):
        return component
    declared = getattr(component, "Params", None)
    if declared is not None:
        if not (isinstance(declared, type) and attrs.has(declared)):
            raise TypeError(f"{component.__name__}.Params must be an attrs class, got {declared!r}")
        return declared
    init = component.__init__
    if init is object.__init__ or "params" not in inspect.signature(init).parameters:
        return EmptyParams
    try:
        hints = typing.get_type_hints(init)
    except Exception as exc:
        raise TypeError(f"cannot resolve the annotation of {component.__name__}.__init__'s params: {exc}") from None
    annotation = hints.get("params")
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
    if not (isinstance(annotation, type) and attrs.has(annotation)):
        raise TypeError(
            f"{component.__name__}.__init__(params) must be annotated with an attrs class "
            f"(or give the class a Params attribute), got {annotation!r}"
        )
    return annotation


def first_doc_line(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring (inherited if it has none) on one line, without
    reStructuredText literal quotes, or ``""``."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")


def give_name(component: Any, name: str) -> None:
    """Set ``component.name`` to its registered ``name`` (also on frozen attrs instances)."""
    if getattr(component, "name", None) == name:
        return
    try:
        object.__setattr__(component, "name", name)
    except AttributeError:
        raise TypeError(
            f"{type(component).__name__} cannot take its registered name {name!r}: its 'name' is read-only"
        ) from None


def no_params(build: Callable[[Any], Any], description: str = "") -> ComponentFactory:
    """Factory for a component that takes no parameters: ``build(env)``."""
    return ComponentFactory(EmptyParams, lambda params, env: build(env), description)


def as_factory(name: str, value: Any, base: type | None) -> ComponentFactory:
    """A hook's ``value`` for ``name`` (a component class or a :class:`ComponentFactory`) as a
    factory; a one-line ``TypeError`` saying what was expected otherwise."""
    if isinstance(value, ComponentFactory):
        return value
    if isinstance(value, LazyFactory):
        return value.load()
    checked_base = None if base is None or getattr(base, "_is_protocol", False) else base
    expected = (
        f"a ComponentFactory or a subclass of {checked_base.__name__}"
        if checked_base is not None
        else "a ComponentFactory or a class"
    )
    if isinstance(value, type):
        if checked_base is not None and not issubclass(value, checked_base):
            raise TypeError(f"returned class {value.__name__} for {name!r}, expected {expected}")
        try:
            return ComponentFactory.from_class(value)
        except TypeError as exc:
            raise TypeError(f"returned class {value.__name__} for {name!r}: {exc}") from None
    raise TypeError(f"returned {type(value).__name__} for {name!r}, expected {expected}")
