"""Where blocks go: the tier mechanism as pure bookkeeping on block ids.

A policy is an ordered list of tiers, oldest first. Pinned tiers (the sink) take the first
blocks until they are full and never give them up. Every other block enters the newest tier;
when a tier is full its oldest block moves to the next older non-pinned tier (compressed to
that tier's fidelity), and the oldest non-pinned tier overflows to the archive or is dropped.

The same :class:`TierLayout` drives the real cache (which executes the moves on tensors) and
the memory planner (which only counts them), so the plan and the cache cannot disagree.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from numbers import Integral

import attrs

from packforcing.core.errors import ParamError

ARCHIVE = "archive"
DROP = "drop"
NEW = None


@attrs.frozen
class Move:
    """Block ``block_id`` goes from tier ``src`` (``None``: a new commit) to tier ``dst``
    (a tier index, or ``"archive"`` / ``"drop"``)."""

    block_id: int
    src: int | None
    dst: int | str

    @property
    def tier(self) -> int:
        """``dst`` as a tier index; a ``ValueError`` when the block goes to the archive or is dropped."""
        if isinstance(self.dst, str):
            raise ValueError(f"block {self.block_id} goes to {self.dst!r}, not to a tier")
        return self.dst


@attrs.frozen
class TierSlotSpec:
    """Capacity (blocks; ``None`` = unbounded) and pinning of one tier."""

    name: str
    capacity: int | None
    pinned: bool = False


class TierLayout:
    """Block-id bookkeeping for an ordered list of tiers (oldest first)."""

    def __init__(self, tiers: Sequence[TierSlotSpec], overflow: str) -> None:
        if overflow not in (ARCHIVE, DROP):
            raise ParamError("overflow", f"expected archive or drop, got {overflow!r}")
        if not tiers:
            raise ParamError("tiers", "expected at least one tier")
        seen_unpinned = False
        for spec in tiers:
            if spec.pinned and seen_unpinned:
                raise ParamError(f"tiers.{spec.name}", "pinned tiers must come first (oldest)")
            if spec.pinned and spec.capacity is None:
                raise ParamError(f"tiers.{spec.name}", "a pinned tier needs a capacity")
            if not spec.pinned:
                seen_unpinned = True
                if spec.capacity is not None and spec.capacity < 1:
                    raise ParamError(f"tiers.{spec.name}", "capacity must hold at least one block")
        if tiers[-1].pinned:
            raise ParamError(f"tiers.{tiers[-1].name}", "the newest tier cannot be pinned")
        self.specs = tuple(tiers)
        self.overflow = overflow
        self.members: list[deque[int]] = [deque() for _ in tiers]

    def copy(self) -> TierLayout:
        """An independent layout in the same state (to try a commit before applying it)."""
        twin = TierLayout(self.specs, self.overflow)
        twin.members = [deque(m) for m in self.members]
        return twin

    def reset(self) -> None:
        for m in self.members:
            m.clear()

    def _older(self, index: int) -> int | None:
        """Next older non-pinned tier, or ``None`` if ``index`` is the oldest one."""
        j = index - 1
        if j < 0 or self.specs[j].pinned:
            return None
        return j

    def _make_room(self, index: int, moves: list[Move]) -> None:
        cap = self.specs[index].capacity
        if cap is None or len(self.members[index]) < cap:
            return
        victim = self.members[index].popleft()
        older = self._older(index)
        if older is None:
            moves.append(Move(victim, index, self.overflow))
            return
        self._make_room(older, moves)
        self.members[older].append(victim)
        moves.append(Move(victim, index, older))

    def commit(self, block_id: int) -> list[Move]:
        """Moves (in execution order) that admitting ``block_id`` causes."""
        moves: list[Move] = []
        for i, spec in enumerate(self.specs):
            if spec.pinned and len(self.members[i]) < (spec.capacity or 0):
                self.members[i].append(block_id)
                moves.append(Move(block_id, NEW, i))
                return moves
        newest = len(self.specs) - 1
        self._make_room(newest, moves)
        self.members[newest].append(block_id)
        moves.append(Move(block_id, NEW, newest))
        return moves


class IdRuns:
    """A set of block ids held as sorted, disjoint runs ``[start, stop)`` and a count.

    The ids of dropped blocks: a tiered cache's blocks leave it in the order they came (FIFO
    through the tiers, then the archive), so its dropped ids are one run however long the video
    is, and this bookkeeping stays a few integers where a list of ids grew by one per block.
    Ids added in any order are kept exactly (a gap costs one run more); adding a held id is a
    no-op. Iteration is in increasing order.
    """

    __slots__ = ("_count", "_starts", "_stops")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self._count = 0
        for block_id in ids:
            self.add(block_id)

    @classmethod
    def from_runs(cls, runs: Iterable[tuple[int, int]]) -> IdRuns:
        """The ids of ``runs`` ``(start, stop)``: sorted and disjoint, none empty (adjacent runs
        are joined); a ``ValueError`` otherwise. As many steps as runs, not as ids."""
        made = cls()
        for start, stop in runs:
            start, stop = int(start), int(stop)
            if start >= stop:
                raise ValueError(f"run [{start}, {stop}) is empty")
            if made._stops and start < made._stops[-1]:
                raise ValueError(f"run [{start}, {stop}) is not after run [{made._starts[-1]}, {made._stops[-1]})")
            if made._stops and start == made._stops[-1]:
                made._stops[-1] = stop
            else:
                made._starts.append(start)
                made._stops.append(stop)
            made._count += stop - start
        return made

    def add(self, block_id: int) -> None:
        i = bisect_right(self._starts, block_id)  # the runs before i start at or before block_id
        if i and block_id < self._stops[i - 1]:
            return  # held already
        joins_left = i > 0 and self._stops[i - 1] == block_id
        joins_right = i < len(self._starts) and self._starts[i] == block_id + 1
        if joins_left and joins_right:
            self._stops[i - 1] = self._stops.pop(i)
            del self._starts[i]
        elif joins_left:
            self._stops[i - 1] = block_id + 1
        elif joins_right:
            self._starts[i] = block_id
        else:
            self._starts.insert(i, block_id)
            self._stops.insert(i, block_id + 1)
        self._count += 1

    def clear(self) -> None:
        self._starts.clear()
        self._stops.clear()
        self._count = 0

    @property
    def runs(self) -> list[tuple[int, int]]:
        """The runs ``(start, stop)``, in increasing order."""
        return list(zip(self._starts, self._stops, strict=True))

    def __contains__(self, block_id: object) -> bool:
        # as a dict keyed by ids answers: any integral id (a numpy integer too), nothing else
        if not isinstance(block_id, Integral):
            return False
        block_id = int(block_id)
        i = bisect_right(self._starts, block_id)
        return i > 0 and block_id < self._stops[i - 1]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for start, stop in self.runs:
            yield from range(start, stop)

    def __repr__(self) -> str:
        return f"IdRuns({self.runs})"
