"""``packforcing``: the paper's three-partition cache as a preset of the tier mechanism.

It is exactly this ``tiered`` config (no separate code path; ``configs/packforcing_tiered.yaml``
spells it out and gives identical output)::

    policy:
      name: tiered
      overflow: <mid_overflow>
      tiers:
        - {name: sink, frames: <sink_frames>, pinned: true}
        - {name: mid, blocks: <mid_capacity_blocks>, fidelity: compressed, select: true}
        - {name: recent, frames: <recent_frames>}

Sink: the first ``sink_frames`` latent frames at full fidelity, never evicted. Recent: the last
``recent_frames`` before the current block, full fidelity. Mid: a block leaving recent is
compressed by the top-level ``compressor`` in the same step (its full K/V slot is freed) and
enters the bank; only the blocks the ``selector`` picks are attended. Beyond
``mid_capacity_blocks`` the oldest mid block is archived (out of the budget, retrievable) or
dropped. Context order: ``[sink | selected mid, by time | recent]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from packforcing.core.errors import ConfigError
from packforcing.core.validators import non_negative, one_of, optional_non_negative, positive
from packforcing.policies.layout import ARCHIVE, DROP
from packforcing.policies.presets import build_preset
from packforcing.policies.tiered import TieredParams, TieredPolicy, TierSpec


@attrs.frozen
class PackForcingParams:
    """Parameters of the ``packforcing`` policy (frames are latent frames, whole blocks)."""

    sink_frames: int = attrs.field(default=8, validator=non_negative)
    recent_frames: int = attrs.field(default=4, validator=positive)
    mid_capacity_blocks: int = attrs.field(default=16, validator=positive)
    mid_overflow: str = attrs.field(default=ARCHIVE, validator=one_of(ARCHIVE, DROP))
    archive_device: str = "auto"
    """Where archived mid blocks live: ``auto`` = pinned host memory when generating on CUDA."""
    archive_max_blocks: int | None = attrs.field(default=None, validator=optional_non_negative)
    """Bound on the archive (the oldest archived block is dropped beyond it); ``None``: unbounded."""
    page_blocks: int = attrs.field(default=4, validator=positive)

    TIER_KEYS: ClassVar[dict[str, str]] = {
        "sink": "sink_frames",
        "mid": "mid_capacity_blocks",
        "recent": "recent_frames",
    }
    """Tier name → the parameter that sizes it (where a problem with the tier is reported)."""

    def tiers(self) -> TieredParams:
        return TieredParams(
            tiers=(
                TierSpec(name="sink", frames=self.sink_frames, pinned=True),
                TierSpec(name="mid", blocks=self.mid_capacity_blocks, fidelity="compressed", select=True),
                TierSpec(name="recent", frames=self.recent_frames),
            ),
            overflow=self.mid_overflow,
            archive_device=self.archive_device,
            archive_max_blocks=self.archive_max_blocks,
            page_blocks=self.page_blocks,
        )


def build_packforcing(params: PackForcingParams, env: Any) -> TieredPolicy:
    """The tiered policy for ``params``, with the configured compressor and selector."""
    if env.compressor is None:
        raise ConfigError(
            "the packforcing policy compresses mid blocks: configure a compressor "
            "(e.g. compressor: {name: dual_branch} or {name: pool})"
        )
    if env.selector is None:
        raise ConfigError(
            "the packforcing policy selects mid blocks: configure a selector (e.g. selector: {name: topk, k: 16})"
        )
    return build_preset(params, env, "packforcing")
