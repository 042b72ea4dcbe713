"""``recency``: the newest ``k`` candidate blocks (the FIFO baseline for ``topk``)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from packforcing.core.interfaces import Selector
from packforcing.core.records import CachedBlock
from packforcing.core.validators import positive


@attrs.frozen
class RecencyParams:
    """Parameters of ``recency``: ``k`` newest blocks."""

    k: int = attrs.field(default=16, validator=positive)


class RecencySelector(Selector):
    """The newest ``k`` candidates, whatever the queries (one choice for every layer)."""

    name = "recency"
    shared_across_layers = True

    def __init__(self, params: RecencyParams | None = None) -> None:
        self.params = params or RecencyParams()

    def budget(self, num_candidates: int) -> int:
        return min(self.params.k, num_candidates)

    def select(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        num = len(candidates)
        k = self.budget(num)
        row = torch.arange(num - k, num, dtype=torch.int64, device=queries.device)
        return row[None].expand(queries.shape[0], k).clone()
