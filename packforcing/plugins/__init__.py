"""Plugin system: hookspecs, the registry and the built-in registrations."""

from packforcing.plugins.factory import ComponentFactory, LazyFactory, no_params
from packforcing.plugins.hookspecs import hookimpl, hookspec

__all__ = ["ComponentFactory", "LazyFactory", "hookimpl", "hookspec", "no_params"]
