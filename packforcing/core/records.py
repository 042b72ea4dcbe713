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
    """A compressor's output: the K/V of one block on a coarser token grid.

    RoPE semantics (what a compressor must respect): temporal token ``i`` of the compressed
    grid sits at temporal position ``position + i * temporal_stride`` and spatial token
    ``(j, l)`` at ``(j * hw_stride, l * hw_stride)``; ``keys`` must be rotated at exactly those
    positions, because realigners later move them by rotating from ``position`` (the block's
    home) to wherever the block is packed. Subsampling real tokens keeps their rotation;
    averaging keys needs the rotation undone first and redone on the coarse grid (see
    :class:`~packforcing.compressors.pool.PoolCompressor`).
    """

    grid: Grid
    """Compressed token grid ``(t, h, w)``; t-major token order, ``N' = t * h * w``."""
    temporal_stride: float
    """Latent frames one temporal token spans (the block's stride times the temporal reduction)."""
    position: float
    """Temporal RoPE position of temporal token 0 (normally the block's own ``position``)."""
    keys: Sequence[torch.Tensor]
    """One ``[B, N', H, D]`` tensor per layer, rotated on ``grid`` as described above, in the
    block's dtype and on its device. Fresh tensors: never views of the block's storage."""
    values: Sequence[torch.Tensor]
    """One ``[B, N', H, D]`` tensor per layer (values carry no rotation)."""
    hw_stride: float = 1.0
    """Full-resolution tokens one spatial token spans along height and width."""

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@attrs.frozen(eq=False)
class CachedBlock:
    """One block held by the cache: what compressors, selectors and realigners read.

    The cache never rotates stored keys after the commit: realigners rotate gathered copies from
    the block's home ``position``, so precision does not decay with video length. Read K/V with
    :meth:`layer_kv` (or :attr:`keys` / :attr:`values`): they are views into the cache's
    storage and must never be written to.
    """

    block_id: int
    """Index of the block in generation order (0 = the first block)."""
    start_frame: int
    """First latent frame of the block in the video."""
    num_frames: int
    """Latent frames the block covers."""
    fidelity: str
    """``"full"``, or the registered name of the compressor that produced it."""
    grid: Grid
    """Token grid ``(t, h, w)`` of the stored K/V (t-major order)."""
    position: float
    """Temporal RoPE position the stored keys are rotated at (their home; see :class:`CompressedKV`)."""
    temporal_stride: float
    """Latent frames one temporal token spans (the patch size in time for a full block)."""
    slot: Slot | HeldTensors
    """Where the K/V (and latents, when the tier keeps them) live: a store slot, or plain tensors
    for a block built by :meth:`from_tensors`."""
    hw_stride: float = 1.0
    """Full-resolution tokens one spatial token spans (spatial positions are ``j * hw_stride``)."""
    condition: Any = None
    """The JSON-able condition spec the block was committed under (``None`` without one)."""

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def compressed(self) -> bool:
        return self.fidelity != FULL

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, N, H, D]`` of ``layer`` (read-only views into the store)."""
        return self.slot.layer_kv(layer)

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per-layer keys ``[B, N, H, D]`` rotated at :attr:`position` on :attr:`grid` (read-only views)."""
        return [self.slot.layer_kv(i)[0] for i in range(self.slot.num_layers)]

    @property
    def values(self) -> list[torch.Tensor]:
        """Per-layer values ``[B, N, H, D]`` (read-only views)."""
        return [self.slot.layer_kv(i)[1] for i in range(self.slot.num_layers)]

    @property
    def num_layers(self) -> int:
        return self.slot.num_layers

    @property
    def latents(self) -> torch.Tensor | None:
        """The clean block ``[B, C, F, H, W]`` when the tier keeps it (for latent compressors)."""
        return self.slot.latents()

    @classmethod
    def from_tensors(
        cls,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        *,
        block_id: int,
        start_frame: int,
        num_frames: int,
        grid: Grid,
        position: float,
        temporal_stride: float,
        latents: torch.Tensor | None = None,
        fidelity: str = FULL,
        hw_stride: float = 1.0,
        condition: Any = None,
    ) -> CachedBlock:
        """A block over per-layer ``keys``/``values`` ``[B, N, H, D]`` (and ``latents``) as given,
        without a store: e.g. a commit seen as a block, or a block built by a test. The tensors
        are held, not copied."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} layers of keys but {len(values)} of values")
        t, h, w = grid
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            if k.ndim != 4 or k.shape != v.shape or k.shape[1] != t * h * w:
                raise ValueError(
                    f"layer {layer}: expected keys and values [B, {t * h * w}, H, D] for grid {tuple(grid)}, "
                    f"got {tuple(k.shape)} / {tuple(v.shape)}"
                )
        return cls(
            block_id=block_id,
            start_frame=start_frame,
            num_frames=num_frames,
            fidelity=fidelity,
            grid=grid,
            position=position,
            temporal_stride=temporal_stride,
            slot=HeldTensors(tuple(keys), tuple(values), latents),
            hw_stride=hw_stride,
            condition=condition,
        )


@attrs.frozen(eq=False)
class HeldTensors:
    """K/V of a :class:`CachedBlock` held as plain tensors rather than in a store page (the
    same read interface as a store slot)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    latent_block: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def latents(self) -> torch.Tensor | None:
        return self.latent_block


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
    archive_device: str | None = None
    """Where archived blocks live (the policy's ``archive_device`` setting), if it archives."""
    archive_max_blocks: int | None = None
    """The archive's bound (``None``: unbounded)."""

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tiers.values())

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.tiers.values())
