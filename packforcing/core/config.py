"""Loading, composing and validating run configurations.

A config is a mapping with the top-level keys ``model``, ``policy``, ``compressor``,
``selector``, ``realigner``, ``backend``, ``sampler`` and ``run`` (plus ``text_encoder``
for models conditioned on text prompts): one key per kind of component
(:mod:`packforcing.plugins.kinds`). The former keys ``attention`` (for ``backend``) and
``positional`` (for ``realigner``) are deprecated but still read as the new ones, in files,
mappings and ``--set`` (a :class:`~packforcing.core.errors.DeprecatedKeyWarning`); a file giving
both the old and the new key is an error. Component blocks are
``name:`` plus that component's parameters (declared by its plugin as an attrs class); a
``sampler`` block without a ``name`` is the default ``euler`` sampler.

Composition rules:

- ``extends: <path>`` or a list of paths (relative to the file) are loaded first and
  deep-merged in order, later wins; the file's own keys are merged last. Cycles and missing
  files are errors.
- Mappings merge key by key; lists and scalars are replaced. A component block whose ``name``
  differs from the one it extends *replaces* it: the old component's parameters are not
  merged into the new one.
- ``overrides`` such as ``"policy.window_frames=64"`` or ``"policy.tiers[1].blocks=8"`` are
  applied last, with values parsed as YAML (``8`` is an integer, ``[1, 2, 2]`` a list).

Every problem raises :class:`ConfigError` naming the file (or ``--set``) that set the
offending key and the key path. By concern: :mod:`packforcing.core.yamlfile` reads one file,
:mod:`packforcing.core.compose` follows ``extends``, :mod:`packforcing.core.overrides` applies
``--set``, :mod:`packforcing.core.keypaths` locates keys; this module holds the schema
(``run``, ``text_encoder``, the component sections) and :func:`load_config`.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from attrs import validators as v

from packforcing import presets
from packforcing.core.compose import deep_merge, load_file, rename_deprecated_keys
from packforcing.core.conditions import ConditionError, ConditionSchedule
from packforcing.core.errors import ConfigError, ParamError
from packforcing.core.geometry import DTYPES
from packforcing.core.keypaths import KeyPath, locate, source_of
from packforcing.core.overrides import (
    COMPONENT_KEYS,
    DEFAULT_COMPONENTS,
    NAME_OPTIONAL,
    OVERRIDE_SOURCE,
    apply_override,
)
from packforcing.core.structure import show, structure, unstructure
from packforcing.core.validators import (
    explained,
    integer,
    number,
    one_of,
    optional_positive,
    positive,
    seed_in_range,
)
from packforcing.core.yamlfile import MAX_CONFIG_BYTES, file_label, missing_file
from packforcing.plugins.kinds import KINDS, SECTIONS

__all__ = [
    "COMPONENT_KEYS",
    "DEFAULT_COMPONENTS",
    "MAX_CONFIG_BYTES",
    "OPTIONAL_COMPONENTS",
    "TOP_KEYS",
    "ComponentSpec",
    "Config",
    "RunParams",
    "TextEncoderParams",
    "apply_override",
    "deep_merge",
    "file_label",
    "load_config",
]

TOP_KEYS = (*COMPONENT_KEYS, *SECTIONS)
OPTIONAL_COMPONENTS = tuple(k.name for k in KINDS if k.optional)

_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


_positive_number = explained("a number > 0", *number(v.gt(0), v.lt(math.inf)), shown=show)


def _prompts(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    try:
        ConditionSchedule.parse(value, name=attribute.name)
    except ConditionError as exc:
        raise ParamError(exc.path(attribute.name), exc.message) from None


_threads = explained("an integer >= 1 or auto", v.or_(v.in_(("auto",)), v.and_(*integer(v.ge(1)))), shown=show)


def _device_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    """A device name torch accepts (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``meta``, ...) or ``auto``;
    whether this machine has that device is checked when building, not here."""
    if value != "auto":
        try:
            torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            raise ParamError(
                attribute.name, f"expected auto or a torch device (cpu, cuda, cuda:N, mps, ...), got {value!r}"
            ) from None


@attrs.frozen
class RunParams:
    """The ``run:`` block."""

    seed: int = attrs.field(default=0, validator=seed_in_range)
    blocks: int = attrs.field(default=16, validator=positive)
    batch_size: int = attrs.field(default=1, validator=positive)
    device: str = attrs.field(default="auto", validator=_device_name)
    dtype: str = attrs.field(default="float32", validator=one_of(*DTYPES))
    fps: float = attrs.field(default=16.0, validator=_positive_number)
    """Frames per second of the written video (one latent frame decodes to one frame)."""
    threads: int | str = attrs.field(default="auto", validator=_threads)
    """CPU intra-op threads: an integer >= 1, or ``auto`` (from the model size and the cores;
    see :mod:`packforcing.core.threads`)."""
    prompts: list[dict[str, Any]] | None = attrs.field(default=None, validator=_prompts)
    """Per-block condition schedule ``[{from_block: 0, **spec}, ...]`` (model-specific specs, e.g.
    ``{embeds: FILE}`` for ``wan``); ``None``: unconditional."""
    recache: bool = False
    """At each prompt switch, re-run the clean pass of the blocks held at full resolution under the
    new prompt (LongLive's KV re-cache)."""
    checkpoint_every: int | None = attrs.field(default=None, validator=optional_positive)
    """``generate`` saves the whole generation state every N blocks (and always when interrupted)."""

    def schedule(self) -> ConditionSchedule:
        """``prompts`` as a :class:`~packforcing.core.conditions.ConditionSchedule`."""
        return ConditionSchedule.parse(self.prompts, name="run.prompts")


_dtype_name = explained(f"'auto' or one of {sorted(DTYPES)}", v.in_(("auto", *DTYPES)))


@attrs.frozen
class TextEncoderParams:
    """Where and how to run the UMT5 text encoder (the ``text_encoder:`` config block).

    ``path``: a diffusers pipeline root (``text_encoder/`` + ``tokenizer/``) or the encoder
    folder; ``tokenizer``: its folder when it is elsewhere; ``device``: ``auto`` (CUDA when
    available) or a torch device; ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on the CPU).
    """

    path: str | None = None
    tokenizer: str | None = None
    device: str = attrs.field(default="auto", validator=_device_name)
    dtype: str = attrs.field(default="auto", validator=_dtype_name)
    max_length: int = attrs.field(default=512, validator=positive)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def check_device(self, label: str = "text_encoder.device") -> None:
        """``ValueError`` naming ``label`` when the device asked for is CUDA and torch has none."""
        if self.torch_device().type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{label}: {self.device!r}: this torch build has no CUDA (use cpu or auto)")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@attrs.frozen
class ComponentSpec:
    """A resolved component: its registered ``name`` and structured ``params``."""

    name: str
    params: Any


@attrs.frozen
class Config:
    """A validated configuration. ``data`` is the merged mapping it was built from; ``sources``
    records which file (or ``--set``) last set each key path, for error messages."""

    data: dict[str, Any]
    source: str | None
    components: dict[str, ComponentSpec | None]
    run: RunParams
    sources: dict[KeyPath, str] = attrs.field(factory=dict, repr=False)
    text_encoder: TextEncoderParams = attrs.field(factory=lambda: TextEncoderParams())

    @property
    def sampler(self) -> Any:
        """The ``sampler`` block's structured parameters (for the built-ins, the sampler itself)."""
        spec = self.components["sampler"]
        assert spec is not None
        return spec.params

    def resolved(self) -> dict[str, Any]:
        """Every section with defaults filled in (YAML/JSON-able)."""
        out: dict[str, Any] = {}
        for key in COMPONENT_KEYS:
            spec = self.components.get(key)
            out[key] = None if spec is None else {"name": spec.name, **unstructure(spec.params)}
        out["run"] = unstructure(self.run)
        if self.text_encoder != TextEncoderParams():
            out["text_encoder"] = unstructure(self.text_encoder)
        return out

    def source_of(self, path: str | None) -> str | None:
        """The file (or ``--set``) that set key ``path`` (``"policy.tiers[1].blocks"``), or the
        closest enclosing key that was set; the config's own file if none was."""
        return source_of(self.sources, path, self.source)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    registry: Any = None,
    labels: Iterable[str] | None = None,
) -> Config:
    """Load, compose and validate a config from a YAML path, a preset name (``"sink_recent"``,
    see :mod:`packforcing.presets`) or a mapping. ``labels[i]`` names where ``overrides[i]`` came
    from in error messages (default ``--set``)."""
    data, sources, label = _read(source)
    overrides = list(overrides)
    labels = list(labels) if labels is not None else []
    for i, override in enumerate(overrides):
        data = apply_override(data, override, sources, labels[i] if i < len(labels) else OVERRIDE_SOURCE)
    _check_top_keys(data, sources, label)
    if registry is None:
        from packforcing.plugins.manager import default_registry

        registry = default_registry()
    components = {key: _component(key, data.get(key), registry, sources, label) for key in COMPONENT_KEYS}
    try:
        block = data.get("run")
        run = structure(RunParams, {} if block is None else block, "run")
    except ConfigError as exc:
        raise locate(exc, sources, label) from None
    try:
        block = data.get("text_encoder")
        text_encoder = structure(TextEncoderParams, {} if block is None else block, "text_encoder")
    except ConfigError as exc:
        raise locate(exc, sources, label) from None
    return Config(data=data, source=label, components=components, run=run, sources=sources, text_encoder=text_encoder)


def _read(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], dict[KeyPath, str], str | None]:
    """``(data, sources, label)`` of a config before overrides: a mapping as given (deprecated keys
    renamed, no ``extends``), else the file or packaged preset ``source`` names, composed."""
    if isinstance(source, Mapping):
        data = rename_deprecated_keys(copy.deepcopy(dict(source)), None)
        if "extends" in data:
            raise ConfigError("only supported in files", path="extends")
        return data, {}, None
    path = presets.resolve(source)  # a file, else a packaged preset name ("sink_recent")
    if not path.exists():
        raise ConfigError(missing_file(path), source=str(source))
    data, sources = load_file(path, ())
    return data, sources, file_label(path.resolve())


def _check_top_keys(data: Mapping[str, Any], sources: Mapping[KeyPath, str], label: str | None) -> None:
    """A :class:`ConfigError` for a top-level key that is not one of :data:`TOP_KEYS` (with the
    closest one, if any)."""
    for key in data:
        if key not in TOP_KEYS:
            hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            shown = str(key) if _KEY_NAME.fullmatch(str(key)) else None  # never echo other text
            raise ConfigError(
                f"{'unknown top-level key' if shown else 'a top-level key that is not a name'}{did} "
                f"(expected one of: {', '.join(TOP_KEYS)})",
                source=source_of(sources, str(key), label),
                path=shown,
            )


def _component(
    key: str, block: Any, registry: Any, sources: Mapping[KeyPath, str], label: str | None
) -> ComponentSpec | None:
    """The component section ``key`` (a name, or a mapping with a ``name`` and its parameters)
    structured into its registered factory's params; the default component for a missing
    section that has one, ``None`` for a missing optional one."""
    where = source_of(sources, key, label)
    if block is None:
        if key in OPTIONAL_COMPONENTS:
            return None
        if key not in DEFAULT_COMPONENTS:
            available = ", ".join(registry.names(key)) or "none"
            raise ConfigError(
                f"required section is missing (a mapping with a name; available: {available})",
                source=where,
                path=key,
            )
        block = {"name": DEFAULT_COMPONENTS[key]}
    if isinstance(block, str):
        block = {"name": block}
    if not isinstance(block, Mapping):
        raise ConfigError(
            f"expected a component name or a mapping with a 'name', got {show(block)}", source=where, path=key
        )
    name = block.get("name")
    if name is None and key in NAME_OPTIONAL:
        name = DEFAULT_COMPONENTS[key]
    if not isinstance(name, str):
        available = ", ".join(registry.names(key)) or "none"
        problem = "required key is missing" if name is None else f"expected a string, got {show(name)}"
        raise ConfigError(
            f"{problem} (available: {available})",
            source=source_of(sources, f"{key}.name", where),
            path=f"{key}.name",
        )
    params = {k: v for k, v in block.items() if k != "name"}
    try:
        factory = registry.factory(key, name)
    except LookupError as exc:
        raise ConfigError(
            str(exc.args[0]), source=source_of(sources, f"{key}.name", where), path=f"{key}.name"
        ) from None
    try:
        structured = structure(factory.params, params, key, f"{key} {name!r}")
    except ConfigError as exc:
        raise locate(exc, sources, label) from None
    return ComponentSpec(name, structured)
