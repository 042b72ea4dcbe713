"""What a plugin registers: a parameters class and a function that builds the component."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class ComponentFactory:
    """``params``: an attrs class declaring the YAML parameters (validated and typed);
    ``build(params, env)``: returns the component, given a :class:`~packforcing.core.build.BuildEnv`
    with the geometry, model, backend and other already-built parts."""

    params: type
    build: Callable[[Any, Any], Any]
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if not attrs.has(self.params):
            raise TypeError(f"ComponentFactory.params must be an attrs class, got {self.params!r}")
        if not callable(self.build):
            raise TypeError(f"ComponentFactory.build must be callable as build(params, env), got {self.build!r}")
        if not isinstance(self.description, str):
            raise TypeError(f"ComponentFactory.description must be a string, got {self.description!r}")

    @classmethod
    def of(cls, component: type, description: str = "") -> ComponentFactory:
        """Factory for an attrs class that *is* its own parameters (built as-is)."""
        return cls(
            params=component,
            build=lambda params, env: params,
            description=description or (component.__doc__ or "").strip().split("\n")[0],
        )


@attrs.frozen
class EmptyParams:
    """A component without parameters."""


def no_params(build: Callable[[Any], Any], description: str = "") -> ComponentFactory:
    """Factory for a component that takes no parameters: ``build(env)``."""
    return ComponentFactory(EmptyParams, lambda params, env: build(env), description)
