"""The live tiers of the tiered policy: each tier's blocks and store, and the two-phase
puts a commit prepares (checked first, copied only once every step of the commit is known to
succeed)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from packforcing.core.geometry import Grid
from packforcing.core.interfaces import (
    Compressor,
)
from packforcing.core.records import (
    CachedBlock,
)
from packforcing.core.store import TierStore
from packforcing.policies.tier_specs import TierSpec


class Tier:
    """One tier as the cache runs it: its spec, capacity, compressor, token grid, store and blocks."""

    def __init__(self, spec: TierSpec, capacity: int | None, compressor: Compressor | None) -> None:
        self.spec = spec
        self.capacity = capacity
        self.compressor = compressor
        self.blocks: deque[CachedBlock] = deque()
        self.grid: Grid = (0, 0, 0)
        self.keep_latents = False
        self.store: TierStore | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tokens(self) -> int:
        """Tokens of one block on this tier's grid."""
        t, h, w = self.grid
        return t * h * w


class Put:
    """A block checked and ready to be copied into ``store`` (phase two of a commit).

    Its K/V are known to be finite: the policy checks a commit's and a compressor's before
    making a Put, and a store holds nothing else. :meth:`check` does not read them again."""

    def __init__(
        self,
        store: TierStore,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        latents: torch.Tensor | None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.values = values
        self.latents = latents
        self.record: dict[str, Any] = {}

    def check(self) -> None:
        self.store.check(self.keys, self.values, self.latents, finite=False)

    def apply(self) -> CachedBlock:
        slot = self.store.put(self.keys, self.values, self.latents, checked=True)
        return CachedBlock(slot=slot, **self.record)


@attrs.frozen
class Step:
    """One move of a commit with the block it moves and what will be stored where."""

    move: Any
    src: Tier | None
    block: CachedBlock | None
    put: Put | None
