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
    """One kind of component.

    Its :attr:`name` is the kind's one name everywhere: the config key (``compressor:``), the
    :class:`~packforcing.core.build.BuildEnv` attribute, ``packforcing plugins --kind``, the first
    part of error key paths and instrumentation labels; its hook is ``packforcing_<plural>``.
    """

    name: str
    """The kind's name: config key, ``BuildEnv`` attribute, ``--kind`` value, key-path root."""
    base: str
    """``module:attribute`` of the interface a registered class derives from."""
    default: str | None = None
    """Component used when the config has no such section (``None``: required or optional)."""
    optional: bool = False
    """The config may leave the section out and nothing is built."""
    name_optional: bool = False
    """A section without ``name`` means the default component (e.g. ``sampler: {steps: 8}``)."""
    description: str = ""
    plural: str = attrs.field(default=attrs.Factory(lambda self: f"{self.name}s", takes_self=True))
    """Plural of :attr:`name`, for the hook name."""
    deprecated_keys: tuple[str, ...] = ()
    """Former config keys, still read as this kind's key (deprecated; a config giving both is an error)."""
    deprecated_hooks: tuple[str, ...] = ()
    """Former hook names, still called (with a ``DeprecationWarning``) and merged into this kind."""

    @property
    def hook(self) -> str:
        """The hook that registers components of this kind: ``packforcing_<plural>``."""
        return f"packforcing_{self.plural}"

    def base_class(self) -> type:
        """The interface class (imported on first use)."""
        module, _, attr = self.base.partition(":")
        return getattr(importlib.import_module(module), attr)


_INTERFACES = "packforcing.core.interfaces"

KINDS: tuple[Kind, ...] = (
    Kind("model", f"{_INTERFACES}:BlockModel", default="tiny_dit",
         description="models implementing the BlockModel protocol"),
    Kind("backend", f"{_INTERFACES}:AttentionBackend", default="auto", description="attention backends",
         deprecated_keys=("attention",), deprecated_hooks=("packforcing_attention_backends",)),
    Kind("realigner", f"{_INTERFACES}:PositionalRealigner", default="identity",
         description="positional realigners", deprecated_keys=("positional",)),
    Kind("selector", f"{_INTERFACES}:Selector", optional=True, description="relevance selectors"),
    Kind("compressor", f"{_INTERFACES}:Compressor", optional=True, description="compressors"),
    Kind("sampler", "packforcing.core.sampler:Sampler", default="euler", name_optional=True,
         description="samplers"),
    Kind("policy", f"{_INTERFACES}:CachePolicy", description="cache policies", plural="policies"),
)  # fmt: skip
"""Every kind, in build order."""

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}

DEPRECATED_KEYS: dict[str, str] = {old: k.name for k in KINDS for old in k.deprecated_keys}
"""Former config key → the kind's name (``attention`` → ``backend``, ``positional`` → ``realigner``)."""

SECTIONS: tuple[str, ...] = ("run", "text_encoder")
"""The config's other top-level sections (not components)."""
