"""The classic cache policies as presets of the tiered mechanism (no separate code paths)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from packforcing.core.errors import ConfigError, ParamError
from packforcing.core.validators import non_negative, positive
from packforcing.policies.layout import DROP
from packforcing.policies.tiered import TieredParams, TieredPolicy, TierSpec


def build_tiered(params: TieredParams, env: Any, name: str = "tiered") -> TieredPolicy:
    """A :class:`TieredPolicy` wired to the environment's model, backend, realigner, selector
    and compressors (``fidelity: compressed`` → the top-level compressor; a mapping → its own)."""
    compressors = {}
    known = getattr(env, "origins", {})
    origins = {key: known[key] for key in ("selector", "realigner", "backend") if key in known}
    paths = {}
    for i, tier in enumerate(params.tiers):
        if tier.fidelity == "full":
            continue
        path = f"policy.tiers[{i}].fidelity"
        if tier.fidelity == "compressed":
            if env.compressor is None:
                raise ConfigError(
                    f"tier {tier.name!r} is compressed but no top-level compressor is configured", path=path
                )
            compressors[tier.name] = env.compressor
            paths[tier.name] = "compressor"
            if "compressor" in known:
                origins[f"compressor:{tier.name}"] = known["compressor"]
        elif isinstance(tier.fidelity, dict):
            compressors[tier.name] = env.build("compressor", tier.fidelity, path)
            paths[tier.name] = path
            if path in known:
                origins[f"compressor:{tier.name}"] = known[path]
        else:
            raise ConfigError(f"expected full, compressed or a compressor mapping, got {tier.fidelity!r}", path=path)
    return TieredPolicy(
        params,
        geometry=env.geometry,
        model=env.model,
        backend=env.backend,
        realigner=env.realigner,
        selector=env.selector,
        compressors=compressors,
        name=name,
        origins=origins,
        compressor_paths=paths,
    )


@attrs.frozen
class FullParams:
    """``full``: every block at full resolution, forever."""

    page_blocks: int = attrs.field(default=4, validator=positive)

    TIER_KEYS: ClassVar[dict[str, str]] = {}
    """Tier name → the parameter that sizes it (where a problem with the tier is reported)."""

    def tiers(self) -> TieredParams:
        return TieredParams(tiers=(TierSpec(name="history"),), overflow=DROP, page_blocks=self.page_blocks)


@attrs.frozen
class SlidingWindowParams:
    """``sliding_window``: the last ``window_frames`` latent frames (whole blocks)."""

    window_frames: int = attrs.field(validator=positive)
    page_blocks: int = attrs.field(default=4, validator=positive)

    TIER_KEYS: ClassVar[dict[str, str]] = {"window": "window_frames"}
    """Tier name → the parameter that sizes it (where a problem with the tier is reported)."""

    def tiers(self) -> TieredParams:
        return TieredParams(
            tiers=(TierSpec(name="window", frames=self.window_frames),), overflow=DROP, page_blocks=self.page_blocks
        )


@attrs.frozen
class SinkRecentParams:
    """``sink_recent``: the first ``sink_frames`` forever plus the last ``window_frames``."""

    sink_frames: int = attrs.field(validator=non_negative)
    window_frames: int = attrs.field(validator=positive)
    page_blocks: int = attrs.field(default=4, validator=positive)

    TIER_KEYS: ClassVar[dict[str, str]] = {"sink": "sink_frames", "recent": "window_frames"}
    """Tier name → the parameter that sizes it (where a problem with the tier is reported)."""

    def tiers(self) -> TieredParams:
        return TieredParams(
            tiers=(
                TierSpec(name="sink", frames=self.sink_frames, pinned=True),
                TierSpec(name="recent", frames=self.window_frames),
            ),
            overflow=DROP,
            page_blocks=self.page_blocks,
        )


def preset_builder(name: str):
    """Build function for a preset whose params class has ``tiers() -> TieredParams`` and
    ``TIER_KEYS`` (tier name → the preset's own parameter that sizes it)."""

    def build(params: Any, env: Any) -> TieredPolicy:
        return build_preset(params, env, name)

    return build


def build_preset(params: Any, env: Any, name: str) -> TieredPolicy:
    """The tiered policy of a preset's ``params``; a problem with one of its tiers is reported on
    the preset's own parameter that sizes the tier (``policy.window_frames``), not on a tier the
    user never wrote."""
    try:
        return build_tiered(params.tiers(), env, name)
    except ConfigError as exc:
        parts = (exc.path or "").split(".")
        key = getattr(params, "TIER_KEYS", {}).get(parts[1]) if len(parts) > 1 and parts[0] == "tiers" else None
        if key is None:
            raise
        raise ParamError(key, exc.message) from None
