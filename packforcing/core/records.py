"""Value records that flow between the engine, the policy and its plugins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from packforcing.core.geometry import Grid

if TYPE_CHECKING:
    from packforcing.core.store import Slot

FULL = "full"
"""Fidelity of a block kept at full resolution."""


@attrs.frozen
class BlockCommit:
    """What the engine hands the policy after a block's clean pass.

    ``keys``/``values``: one ``[B, N, H, D]`` tensor per layer, keys already rotated at
    temporal ``position``. ``latents``: the clean block ``[B, C, F, H, W]``. ``condition``: the
    JSON-able condition spec the block was generated under (``None`` without one).
    """

    block_id: int
    start_frame: int
    num_frames: int
    grid: Grid
    position: float
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    latents: torch.Tensor | None = None
    condition: Any = None


@attrs.frozen
class CompressedKV:
    """A compressor's output: per-layer ``[B, N', H, D]`` keys (rotated at ``position`` on the
    compressed ``grid`` with ``temporal_stride`` frames per temporal token and ``hw_stride``
    full-grid tokens per spatial token) and values."""

    grid: Grid
    temporal_stride: float
    position: float
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    hw_stride: float = 1.0

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@attrs.frozen(eq=False)
class CachedBlock:
    """One block held by the cache.

    ``fidelity`` is ``"full"`` or the name of the compressor that produced it; ``grid`` is its
    token grid ``(t, h, w)``; ``position`` is the temporal position its stored keys are rotated
    at (the cache never rotates stored keys afterwards: realigners rotate gathered copies from
    this home position, so precision does not decay with video length). ``temporal_stride`` is
    how many latent frames one temporal token spans and ``hw_stride`` how many full-grid tokens
    one spatial token spans (the spatial RoPE positions are ``j * hw_stride``). K/V live in the
    store slot. ``condition`` is the JSON-able condition spec the block was committed under.
    """

    block_id: int
    start_frame: int
    num_frames: int
    fidelity: str
    grid: Grid
    position: float
    temporal_stride: float
    slot: Slot
    hw_stride: float = 1.0
    condition: Any = None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def compressed(self) -> bool:
        return self.fidelity != FULL

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, N, H, D]`` of ``layer`` (views into the store)."""
        return self.slot.layer_kv(layer)

    @property
    def keys(self) -> list[torch.Tensor]:
        return [self.slot.layer_kv(i)[0] for i in range(self.slot.num_layers)]

    @property
    def values(self) -> list[torch.Tensor]:
        return [self.slot.layer_kv(i)[1] for i in range(self.slot.num_layers)]

    @property
    def latents(self) -> torch.Tensor | None:
        """The clean block ``[B, C, F, H, W]`` when the tier keeps it (for latent compressors)."""
        return self.slot.latents()


@attrs.frozen
class BlockQuery:
    """The block about to be generated: its index, first latent frame and frame count."""

    block_id: int
    start_frame: int
    num_frames: int
    grid: Grid


@attrs.frozen
class TierStats:
    """Blocks, tokens and bytes held by one tier (bytes of the tensors actually allocated)."""

    blocks: int = 0
    tokens: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"blocks": self.blocks, "tokens": self.tokens, "bytes": self.bytes}


@attrs.frozen
class CacheStats:
    """Per-tier occupancy; ``archive`` is kept out of the active budget."""

    tiers: dict[str, TierStats]
    archive: TierStats = TierStats()
    dropped_blocks: int = 0

    @property
    def bytes(self) -> int:
        """Bytes of the active tiers (the cache budget)."""
        return sum(t.bytes for t in self.tiers.values())

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.tiers.values())

    @property
    def blocks(self) -> int:
        return sum(t.blocks for t in self.tiers.values())


@attrs.frozen
class MemoryPlan:
    """Planned peak tokens and bytes per tier for a run, computed without allocating."""

    num_blocks: int
    tiers: dict[str, TierStats]
    archive: TierStats
    context_tokens: int
    full_cache_tokens: int
    full_cache_bytes: int

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tiers.values())

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.tiers.values())
