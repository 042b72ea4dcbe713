"""Hook specifications of packforcing's plugin system.

Every hook returns a mapping ``name -> ComponentFactory`` (see
:mod:`packforcing.plugins.factory`). The built-in components register through these same
hooks (:mod:`packforcing.plugins.builtin`); external packages provide a module under the
``packforcing`` entry-point group that implements any of them with ``@hookimpl``.
"""

from __future__ import annotations

from collections.abc import Mapping

import pluggy

from packforcing.plugins.factory import ComponentFactory

PROJECT = "packforcing"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def packforcing_policies() -> Mapping[str, ComponentFactory]:
    """Cache policies (:class:`~packforcing.core.interfaces.CachePolicy`), selected by ``policy.name``."""


@hookspec
def packforcing_compressors() -> Mapping[str, ComponentFactory]:
    """Compressors (:class:`~packforcing.core.interfaces.Compressor`), selected by ``compressor.name``
    or by a tier's ``fidelity`` mapping."""


@hookspec
def packforcing_selectors() -> Mapping[str, ComponentFactory]:
    """Relevance selectors (:class:`~packforcing.core.interfaces.Selector`), by ``selector.name``."""


@hookspec
def packforcing_realigners() -> Mapping[str, ComponentFactory]:
    """Positional realigners (:class:`~packforcing.core.interfaces.PositionalRealigner`), by
    ``positional.name``."""


@hookspec
def packforcing_attention_backends() -> Mapping[str, ComponentFactory]:
    """Attention backends (:class:`~packforcing.core.interfaces.AttentionBackend`), by ``attention.name``."""


@hookspec
def packforcing_models() -> Mapping[str, ComponentFactory]:
    """Models implementing :class:`~packforcing.core.interfaces.BlockModel`, by ``model.name``."""


@hookspec
def packforcing_samplers() -> Mapping[str, ComponentFactory]:
    """Samplers (:class:`~packforcing.core.sampler.Sampler`), by ``sampler.name``."""
