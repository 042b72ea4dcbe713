"""``temporal_rope_shift``: PackForcing's temporal RoPE adjustment.

When mid blocks are skipped (not selected, archived or dropped) the context has temporal gaps.
This realigner packs the context contiguously, in time order, and moves each gathered key to
its packed position by rotating its **temporal band only** (RoPE rotations compose, so moving a
key from ``p`` to ``p'`` is one multiply by ``e^{iω(p'−p)}``; the height/width bands are
untouched).

Anchors (YAML ``realigner: {name: temporal_rope_shift, anchor: ...}``):

``absolute`` (the paper)
    The block being generated sits at its absolute first frame; the context is packed
    backwards from it, so the recent blocks (contiguous with it) keep their positions and the
    selected mid blocks and the sink are placed immediately before them. Figure example: S0,
    S1, M2..M7, R8, R9 with M2 and M6 skipped → S0=2, S1=3, M3=4, M4=5, M5=6, M7=7, R8=8, R9=9.

``window``
    Positions relative to the context (StreamingLLM / Infinity-RoPE style): the oldest
    context block starts at ``origin`` and the block being generated follows the context, so
    positions never exceed ``origin`` + the context's frames however long the video is.

Precision and "incremental" rotation
    Stored keys are never modified. Every gather rotates the block's *stored* keys from the
    home position they were stored at straight to the current target, with angles in float64
    and the rotation in float32 (:meth:`Rope3D.shift_temporal`): one rounding to the storage
    dtype whatever the history of shifts, so precision does not decay with video length. (The
    paper's "apply only the change since the last step" compounds one rounding per shift in
    place: in bfloat16 the error grows from 2e-3 after one shift to 2.5e-1 after 500.)
    Blocks whose target equals their home position — the recent blocks in ``absolute`` mode,
    and every block while nothing was skipped — are returned untouched, without a copy.

    A split context (``backend: {name: sdpa, split_context: true}``) moves the query instead of
    a run of keys that all move by the same shift (the sink): the keys stay where they are stored
    and the query is rotated by the opposite shift (``shifts_query``, :meth:`query_shifter`),
    which RoPE scores the same way.

    Rotated copies are deliberately not memoised across forward passes: a memo would hold a
    second copy of every moved block (up to doubling the cache, outside the tiers' memory
    plan) to save one elementwise multiply of the temporal band per gathered token, which is
    small next to the attention over the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from packforcing.core.errors import ParamError
from packforcing.core.interfaces import PositionalRealigner
from packforcing.core.records import BlockQuery, CachedBlock
from packforcing.core.rope import Rope3D
from packforcing.core.validators import one_of

ABSOLUTE = "absolute"
WINDOW = "window"


@attrs.frozen
class TemporalRopeShiftParams:
    """Parameters of ``temporal_rope_shift``.

    ``anchor``: ``absolute`` (pack backwards from the block's absolute position, the paper) or
    ``window`` (pack forwards from ``origin``, positions bounded by the context length).
    ``origin``: first position of the context in ``window`` mode.
    """

    anchor: str = attrs.field(default=ABSOLUTE, validator=one_of(ABSOLUTE, WINDOW))
    origin: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.origin < 0:
            raise ParamError("origin", f"expected a number >= 0, got {self.origin!r}")


class TemporalRopeShift(PositionalRealigner):
    """Packs the context contiguously; rotates temporal bands from home positions.

    Each gathered key's temporal band is rotated from its home position to its packed one (see
    the module docstring)."""

    name = "temporal_rope_shift"
    targets_from_frames = True  # assign() packs by frame counts only
    keeps_finite = True  # a rotation: finite keys stay finite
    shifts_query = True  # the default gather_shifted's RoPE rotation: moving the query by -Δ is the same

    def __init__(self, params: TemporalRopeShiftParams | None = None) -> None:
        self.params = params or TemporalRopeShiftParams()

    @property
    def anchor(self) -> str:
        return self.params.anchor

    def assign(self, spans: Sequence[tuple[float, float]], query: BlockQuery) -> tuple[list[float], float]:
        frames = [float(n) for _, n in spans]
        if self.params.anchor == ABSOLUTE:
            query_position = float(query.start_frame)
            targets: list[float] = []
            end = query_position
            for n in reversed(frames):
                end -= n
                targets.append(end)
            targets.reverse()
            return targets, query_position
        position = float(self.params.origin)
        targets = []
        for n in frames:
            targets.append(position)
            position += n
        return targets, position

    def gather(
        self,
        keys: Sequence[torch.Tensor],
        blocks: Sequence[CachedBlock],
        targets: Sequence[float],
        rope: Rope3D,
        tail: torch.Tensor,
    ) -> torch.Tensor:
        """The context's keys in one tensor, the moved blocks rotated in a single call.

        Packed contexts move a prefix (sink and mid) and leave the suffix (recent, the block
        itself) in place, so one per-token rotation covers every moved block: a few kernels per
        layer instead of a few per block. Each token's shift is ``target - home`` of its block,
        applied to the stored keys (one rounding, as in :meth:`realign`).
        """
        if any(isinstance(t, torch.Tensor) for t in targets):
            return super().gather(keys, blocks, targets, rope, tail)
        out = torch.cat([*keys, tail], dim=1)
        deltas = [float(t) - b.position for b, t in zip(blocks, targets, strict=True)]
        moved = [i for i, d in enumerate(deltas) if d != 0]
        if not moved:
            return out
        runs = [(d, k.shape[1]) for d, k in zip(deltas[: moved[-1] + 1], keys, strict=False)]
        rope.shift_temporal_tokens_(out[:, : sum(n for _, n in runs)], rope.shifts_of_runs(runs))
        return out
