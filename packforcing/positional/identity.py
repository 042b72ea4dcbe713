"""The ``identity`` realigner: every block keeps the position it was stored at."""

from __future__ import annotations

from collections.abc import Sequence

from packforcing.core.interfaces import PositionalRealigner
from packforcing.core.records import BlockQuery


class IdentityRealigner(PositionalRealigner):
    """Absolute positions, no rotation (Self-Forcing's rolling cache, full cache).

    Gaps left by evicted blocks stay gaps; the query sits at its absolute first frame.
    """

    name = "identity"
    rotates = False
    keeps_finite = True

    def assign(self, spans: Sequence[tuple[float, float]], query: BlockQuery) -> tuple[list[float], float]:
        return [home for home, _ in spans], float(query.start_frame)
