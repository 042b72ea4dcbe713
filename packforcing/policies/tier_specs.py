"""The tiered policy's parameters: its tiers (``TierSpec``) and ``TieredParams``.

YAML form::

    policy:
      name: tiered
      overflow: archive          # or drop: what leaves the oldest non-pinned tier
      tiers:                     # oldest first
        - {name: sink, frames: 8, pinned: true}
        - {name: mid, blocks: 16, fidelity: compressed, select: true}
        - {name: recent, frames: 4}

``fidelity`` is ``full``, ``compressed`` (the top-level ``compressor``) or a component
mapping such as ``{name: pool, window: [1, 2, 2]}`` for a tier-specific compressor.
``select: true`` means only the blocks the configured selector picks are attended.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from packforcing.core.errors import ParamError
from packforcing.core.geometry import Geometry
from packforcing.core.records import (
    FULL,
)
from packforcing.core.validators import one_of, optional_non_negative, positive
from packforcing.policies.layout import ARCHIVE, DROP

MAX_PLAN_BLOCKS = 10_000_000
"""Runs longer than this are refused (at 4 frames a block and 16 fps, 79 years of video)."""


def _fidelity(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return dict(value)
    raise ParamError("fidelity", f"expected 'full', 'compressed' or a compressor mapping with a name, got {value!r}")


@attrs.frozen
class TierSpec:
    """One tier: capacity in latent ``frames`` or in ``blocks`` (neither: unbounded)."""

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    frames: int | None = attrs.field(default=None, validator=optional_non_negative)
    blocks: int | None = attrs.field(default=None, validator=optional_non_negative)
    fidelity: str | dict[str, Any] = attrs.field(default=FULL, converter=_fidelity)
    pinned: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    select: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.frames is not None and self.blocks is not None:
            raise ParamError(f"tiers.{self.name}", "give frames or blocks, not both")
        if self.name == ARCHIVE:
            raise ParamError("tiers", "'archive' is reserved for overflow")

    def capacity(self, geometry: Geometry) -> int | None:
        """Capacity in blocks (whole blocks that fit in ``frames``)."""
        if self.frames is not None:
            if not self.pinned and 0 < self.frames < geometry.frames_per_block:
                raise ParamError(
                    f"tiers.{self.name}.frames",
                    f"{self.frames} frames is smaller than one block ({geometry.frames_per_block} frames)",
                )
            return geometry.frames_to_blocks(self.frames)
        return self.blocks


def _tiers(value: Any) -> tuple[TierSpec, ...]:
    out = []
    for i, t in enumerate(value):
        if isinstance(t, TierSpec):
            out.append(t)
        elif isinstance(t, Mapping):
            out.append(TierSpec(**t))
        else:
            raise ParamError(f"tiers[{i}]", f"expected a mapping, got {t!r}")
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ParamError("tiers", f"duplicate tier names {sorted(dup)}")
    return tuple(out)


def _archive_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise ParamError(attribute.name, f"expected auto, pinned, cpu or a device name, got {value!r}")
    if value not in ("auto", "pinned"):
        try:
            torch.device(value)
        except RuntimeError:
            raise ParamError(
                attribute.name, f"expected auto, pinned, cpu or a device name such as cuda:0, got {value!r}"
            ) from None


def archive_placement(setting: str, cache_device: torch.device) -> tuple[torch.device, bool]:
    """``(device, pinned)`` of the archive for ``archive_device: setting`` when the cache lives
    on ``cache_device``."""
    if setting == "auto":
        return (torch.device("cpu"), True) if cache_device.type == "cuda" else (cache_device, False)
    if setting == "pinned":
        return torch.device("cpu"), torch.cuda.is_available()
    return torch.device(setting), False


@attrs.frozen
class TieredParams:
    """Parameters of the ``tiered`` policy."""

    tiers: tuple[TierSpec, ...] = attrs.field(converter=_tiers)
    overflow: str = attrs.field(default=DROP, validator=one_of(ARCHIVE, DROP))
    archive_device: str = attrs.field(default="auto", validator=_archive_device)
    """Where archived blocks live: ``auto`` (pinned host memory when the cache is on CUDA, else
    beside the cache), ``pinned`` (pinned host memory), ``cpu``, or a torch device (``cuda:1``)."""
    archive_max_blocks: int | None = attrs.field(default=None, validator=optional_non_negative)
    """At most this many archived blocks (the oldest is dropped beyond it); ``None``: unbounded."""
    page_blocks: int = attrs.field(default=4, validator=positive)
    """Slots per page of a tier's store (capped at its capacity). A bounded ``select: true`` tier
    is one page of its capacity instead, so a context gathers its picks straight from the page."""
