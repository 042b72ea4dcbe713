"""Hook specifications of packforcing's plugin system, one per kind of component.

The hooks are generated from the table of kinds (:data:`packforcing.plugins.kinds.KINDS`):
``packforcing_models``, ``packforcing_backends``, ``packforcing_realigners``,
``packforcing_selectors``, ``packforcing_compressors``, ``packforcing_samplers`` and
``packforcing_policies`` (``packforcing_<plural of the kind's name>``). Each returns a mapping
``name -> component class`` (a subclass of the kind's interface) or ``name -> ComponentFactory``
(see :mod:`packforcing.plugins.factory`).
The built-in components register through these same hooks (:mod:`packforcing.plugins.builtin`);
external packages provide a module under the ``packforcing`` entry-point group that implements
any of them with ``@hookimpl``. Hooks take no arguments today; pluggy passes an implementation
only the arguments it names, so a hook can gain arguments without breaking plugins.

Deprecated: ``packforcing_attention_backends`` (now ``packforcing_backends``) is still called and
merged into the ``backend`` kind; implementing it warns (``DeprecationWarning``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from packforcing.plugins.kinds import KINDS, Kind

PROJECT = "packforcing"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _spec(kind: Kind, hook: str | None = None) -> Callable[[], Mapping[str, Any]]:
    def spec() -> Mapping[str, Any]:
        raise NotImplementedError  # a specification: plugins implement it

    spec.__name__ = spec.__qualname__ = hook or kind.hook
    spec.__module__ = __name__
    interface = kind.base.replace(":", ".")
    spec.__doc__ = (
        f"{kind.description.capitalize()} (subclasses of :class:`~{interface}`), selected by "
        f"``{kind.name}.name``: return ``{{name: class or ComponentFactory}}``."
    )
    if hook is None:
        return hookspec(spec)
    spec.__doc__ = f"Deprecated: implement ``{kind.hook}`` instead (same result). " + spec.__doc__
    warning = DeprecationWarning(f"hook {hook} is deprecated: implement {kind.hook} instead (same result)")
    return hookspec(warn_on_impl=warning)(spec)


globals().update({k.hook: _spec(k) for k in KINDS})
globals().update({old: _spec(k, old) for k in KINDS for old in k.deprecated_hooks})
