"""The kinds of component a config assembles, in one table.

Every kind has one name, its config key (``compressor:``), and is registered through one hook
(``packforcing_compressors``) by returning ``{name: class or ComponentFactory}``; a registered
class must derive from the kind's base class. Kinds are built in the table's order (the model
first, the policy last), so a factory's :class:`~packforcing.core.build.BuildEnv` holds every
kind listed before its own.

The table names base classes by import path, so reading it (``packforcing --help``,
``packforcing plugins --kind``) imports neither torch nor any component.
"""

from __future__ import annotations

import importlib

import attrs


@attrs.frozen
class Kind:
    """One kind of component."""

    key: str
    """Config key, the kind's name everywhere (``packforcing plugins --kind``, error messages)."""
    hook: str
    """The hook that registers components of this kind."""
    base: str
    """``module:attribute`` of the interface a registered class derives from."""
    env_attr: str
    """Attribute of :class:`~packforcing.core.build.BuildEnv` that holds the built component."""
    default: str | None = None
    """Component used when the config has no such section (``None``: required or optional)."""
    optional: bool = False
    """The config may leave the section out and nothing is built."""
    name_optional: bool = False
    """A section without ``name`` means the default component (e.g. ``sampler: {steps: 8}``)."""
    description: str = ""

    def base_class(self) -> type:
        """The interface class (imported on first use)."""
        module, _, attr = self.base.partition(":")
        return getattr(importlib.import_module(module), attr)


_INTERFACES = "packforcing.core.interfaces"

KINDS: tuple[Kind, ...] = (
    Kind("model", "packforcing_models", f"{_INTERFACES}:BlockModel", "model", default="tiny_dit",
         description="models implementing the BlockModel protocol"),
    Kind("attention", "packforcing_attention_backends", f"{_INTERFACES}:AttentionBackend", "backend",
         default="auto", description="attention backends"),
    Kind("positional", "packforcing_realigners", f"{_INTERFACES}:PositionalRealigner", "realigner",
         default="identity", description="positional realigners"),
    Kind("selector", "packforcing_selectors", f"{_INTERFACES}:Selector", "selector", optional=True,
         description="relevance selectors"),
    Kind("compressor", "packforcing_compressors", f"{_INTERFACES}:Compressor", "compressor", optional=True,
         description="compressors"),
    Kind("sampler", "packforcing_samplers", "packforcing.core.sampler:Sampler", "sampler", default="euler",
         name_optional=True, description="samplers"),
    Kind("policy", "packforcing_policies", f"{_INTERFACES}:CachePolicy", "policy",
         description="cache policies"),
)  # fmt: skip
"""Every kind, in build order."""

BY_KEY: dict[str, Kind] = {k.key: k for k in KINDS}

SECTIONS: tuple[str, ...] = ("run", "text_encoder")
"""The config's other top-level sections (not components)."""
