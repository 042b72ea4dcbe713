"""The attention context of the tiered policy: one forward pass over the tiers' blocks,
selected per layer and batch item, realigned and gathered."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch

from packforcing.attention.merge import merge_by_lse
from packforcing.core.boundary import (
    DeferredChecks,
    Origin,
    checked_budget,
    number_problem,
    selection_problem,
    tensor_problem,
)
from packforcing.core.finite import finite_flags, finite_probe
from packforcing.core.interfaces import (
    AttentionBackend,
    AttentionContext,
    PositionalRealigner,
    Selector,
)
from packforcing.core.records import (
    BlockQuery,
    CachedBlock,
)
from packforcing.core.rope import Rope3D
from packforcing.core.store import Slot, adjacent_runs
from packforcing.core.transfer import to_device


def _one_page(blocks: Sequence[CachedBlock]) -> tuple[torch.Tensor, list[int]] | None:
    """The store page holding every one of ``blocks`` and their slots in it, or ``None``."""
    slots = [b.slot for b in blocks]
    first = slots[0]
    if not isinstance(first, Slot):
        return None
    same_page = [s for s in slots if isinstance(s, Slot) and s.store is first.store and s.page == first.page]
    if len(same_page) != len(slots):
        return None
    return first.store.pages[first.page], [s.index for s in same_page]


def _picks_ok(idx: torch.Tensor, candidates: int) -> torch.Tensor:
    """``[n]`` bool on the device: each of ``n`` selections ``[n, B, k]`` lies in
    ``[0, candidates)`` and increases along ``k``."""
    inside = ((idx >= 0) & (idx < candidates)).flatten(1).all(1)
    return inside & (idx[..., 1:] > idx[..., :-1]).flatten(1).all(1)


@attrs.define
class _Piece:
    """A run of context blocks in packed order: fixed blocks, or one ``select: true`` group."""

    blocks: list[CachedBlock]
    group: int | None = None
    """Index of the selected group (``None``: every block enters)."""
    count: int = 0
    """Blocks that enter (the selector's budget for a group)."""
    tokens: int = 0
    """Tokens per block of a selected group."""
    deltas: torch.Tensor | None = None
    """Fixed blocks: per-token shifts ``[T]``; a group: home positions of its candidates ``[C]``."""
    targets: torch.Tensor | None = None
    """A group: target positions of its ``count`` picks ``[k]`` (they depend only on frames)."""
    page: torch.Tensor | None = None
    """A group whose candidates all live in one store page ``[2, L, B, P, n, H, D]``: that page
    (picks are then gathered from it in one indexing, without stacking the candidates)."""
    slots: torch.Tensor | None = None
    """With ``page``: each candidate's slot in it, ``[C]`` int64 on the device."""
    picked: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """A group whose picks hold for the whole pass (a selector ``shared_across_layers``): the
    picks' slots in ``page`` (or their indices among the candidates) ``[B, k]`` and per-token
    shifts ``[B, k·n]``, made on the first layer and reused by every other."""

    def place(self, values: torch.Tensor, offset: int) -> int:
        """A selected group's ``deltas`` (its candidates' homes) then ``targets`` out of the pass's
        device-side ``values`` from ``offset`` (see :meth:`TieredContext._group_piece`); returns
        the offset after them."""
        c = len(self.blocks)
        self.deltas = values[offset : offset + c]
        self.targets = values[offset + c : offset + c + self.count]
        return offset + c + self.count


@attrs.define
class _Run:
    """Stored keys a split context attends where they are: adjacent slots of one page (or one
    block held outside a store), all moved by the same ``delta``."""

    first: Slot | CachedBlock
    count: int
    delta: float
    shift: torch.Tensor | None = None
    """``[1]`` float64 on the device: ``delta`` (``None`` when it is 0)."""
    shifter: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The realigner's :meth:`~PositionalRealigner.query_shifter` for ``shift``, made once per pass."""

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` ``[B, count·N, H, D]`` of ``layer``."""
        if isinstance(self.first, Slot):
            return self.first.span_kv(layer, self.count)
        return self.first.layer_kv(layer)


@attrs.define
class _DeviceLayout:
    """What a context needs to gather on the device, made once per forward pass."""

    pieces: list[_Piece]
    moved_pieces: int
    """Leading pieces whose tokens may move (0: nothing moves)."""
    batch_rows: torch.Tensor
    """``[B, 1]`` batch indices (to gather each item's picks)."""
    runs: list[_Run] = attrs.Factory(list)
    """Split contexts: the fixed blocks as stored runs (their pieces are then only the selected
    groups)."""
    deltas: torch.Tensor | None = None
    """The pass's per-token shifts ``[B or 1, M]`` when no layer's differ (no selected group, or a
    selector shared across layers): concatenated on the first layer, reused by every other."""


class TieredContext(AttentionContext):
    """History of one forward pass: tiers' blocks, selected, realigned and gathered.

    Selection runs per layer with that layer's queries (or once per pass when the selector is
    shared across layers) and per batch item. Gathered keys are rotated from each block's home
    position to the realigner's target; stored keys are never modified. What the selector,
    the realigner and the backend return is checked on every call (see
    :mod:`packforcing.core.boundary`); a violation is a :class:`~packforcing.core.errors.PluginError`.

    When the realigner's targets do not depend on which blocks are picked
    (``targets_from_frames``, or a realigner that never ``rotates``) and every selected tier's
    blocks have one size, the selection stays on the device: picks are gathered with index
    tensors and their shifts computed on the device, so a layer makes no host-device
    synchronisation. The per-pass invariants (layout, targets, shifts of the fixed blocks) are
    computed once, on the first layer. The checks of what lives on the device (indices in range
    and increasing, finite output) are then made on the device, indices clamped so a bad one
    cannot fault the gather, and read once: with ``checks`` (the policy's
    :class:`~packforcing.core.boundary.DeferredChecks`) when the policy settles the block,
    for all its passes at once; without, at the pass's last layer. Either raises the same
    :class:`~packforcing.core.errors.PluginError`, naming the first bad layer. Otherwise picks
    and checks are read on the host at every layer.

    On that device-side path, a backend that asks for it (``split_context``, with
    ``returns_lse``) gets the context in parts instead of one gathered copy per layer, when the
    realigner can move the query instead of the keys (``shifts_query``) or never moves anything:
    see :meth:`_attend_split`.
    """

    def __init__(
        self,
        *,
        groups: Sequence[tuple[list[CachedBlock], bool]],
        query: BlockQuery,
        selector: Selector | None,
        realigner: PositionalRealigner,
        backend: AttentionBackend,
        rope: Any,
        origins: tuple[Origin, Origin, Origin] | None = None,
        checks: DeferredChecks | None = None,
    ) -> None:
        self._groups = groups
        self._checks = checks
        self._query = query
        self._selector = selector
        self._realigner = realigner
        self._backend = backend
        self._rope = rope
        self._origins = origins or (
            Origin.of("selector", selector),
            Origin.of("realigner", realigner),
            Origin.of("backend", backend),
        )
        self._shared: dict[int, torch.Tensor] = {}
        self._context_tokens = 0
        self._layout: _DeviceLayout | None = None
        self._picks: list[tuple[int, int, torch.Tensor]] = []
        """Selections kept on the device, not checked yet: ``(layer, group, indices [B, k])``."""
        self._outputs: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        """Per layer, not read yet: ``(layer, the output's finite_probe, the gathered keys'
        finite_probe or None when the realigner ``keeps_finite``)`` (see :mod:`packforcing.core.finite`)."""
        self.selections: dict[tuple[int, int], torch.Tensor] = {}
        """(layer, group index) → ``[B, k']`` indices chosen by the selector (for inspection)."""
        # Query position depends on how many blocks enter, not on which: use the first k'.
        self._counts = [
            checked_budget(self._origins[0], selector, len(blocks), block=query.block_id)
            if select and selector is not None
            else len(blocks)
            for blocks, select in groups
        ]
        """Blocks of each group that enter: the selector's budget for a selected one (checked:
        the build checks it up to the tiers' capacities, an unbounded tier may outgrow that)."""
        spans: list[tuple[float, float]] = []
        for (blocks, _), count in zip(groups, self._counts, strict=True):
            spans.extend((b.position, b.num_frames) for b in blocks[:count])
        self._targets, self._position = self._assign(spans)
        self._on_device = (realigner.targets_from_frames or not realigner.rotates) and all(
            len({(b.num_tokens, b.num_frames) for b in blocks}) == 1 for blocks, select in groups if select
        )
        self._split = (
            self._on_device
            and backend.split_context
            and backend.returns_lse
            and (realigner.shifts_query or not realigner.rotates)
        )
        """Attend the fixed blocks where they are stored and merge by log-sum-exp (see
        :meth:`_attend_split`)."""
        self._last_layer = groups[0][0][0].num_layers - 1 if groups else -1

    @property
    def position(self) -> float:
        return self._position

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    def _assign(self, spans: Sequence[tuple[float, float]]) -> tuple[list[float], float]:
        """The realigner's target positions, checked: one finite number per span, and the query's."""
        origin = self._origins[1]
        block = self._query.block_id
        result = origin.call(block, self._realigner.assign, spans, self._query)
        try:
            targets, qpos = result
            targets = list(targets)
        except (TypeError, ValueError):
            raise origin.error(f"assign() returned {result!r}, expected (targets, query position)", block) from None
        if len(targets) != len(spans):
            raise origin.error(f"assign() returned {len(targets)} targets for {len(spans)} context blocks", block)
        problem = number_problem("the query position", qpos) or next(
            (p for i, t in enumerate(targets) if (p := number_problem(f"target {i}", t))), None
        )
        if problem:
            raise origin.error(f"assign(): {problem}", block)
        return targets, qpos

    def _choose(self, layer: int, q: torch.Tensor) -> list[list[CachedBlock]]:
        """Ordered context blocks for each batch item."""
        batch = q.shape[0]
        rows: list[list[CachedBlock]] = [[] for _ in range(batch)]
        origin = self._origins[0]
        for g, (blocks, select) in enumerate(self._groups):
            if not select:
                for row in rows:
                    row.extend(blocks)
                continue
            assert self._selector is not None
            if self._selector.shared_across_layers and g in self._shared:
                idx = self._shared[g]
            else:
                idx = origin.call(self._query.block_id, self._selector.select, q, blocks, layer)
                problem = selection_problem(
                    idx,
                    batch=batch,
                    budget=self._counts[g],
                    candidates=len(blocks),
                    device=q.device,
                )
                if problem:
                    raise origin.error(f"layer {layer}: {problem}", self._query.block_id)
                if self._selector.shared_across_layers:
                    self._shared[g] = idx
            self.selections[(layer, g)] = idx
            for row, chosen in zip(rows, idx.tolist(), strict=True):
                row.extend(blocks[i] for i in chosen)
        return rows

    def _gather(
        self, layer: int, blocks: list[CachedBlock], item: slice, k_self: torch.Tensor, v_self: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B', N_ctx + N, H, D]`` of ``blocks`` (batch rows ``item``) followed by
        the block's own ``k_self, v_self``; keys moved to the realigner's targets."""
        spans = [(b.position, b.num_frames) for b in blocks]
        targets, qpos = self._assign(spans)
        origin = self._origins[1]
        if qpos != self._position:
            raise origin.error(
                f"moved the query from {self._position} to {qpos} depending on which blocks were selected",
                self._query.block_id,
            )
        ks, vs = [], []
        for block in blocks:
            k, v = block.layer_kv(layer)
            ks.append(k[item])
            vs.append(v[item])
        keys = origin.call(self._query.block_id, self._realigner.gather, ks, blocks, targets, self._rope, k_self)
        shape = (k_self.shape[0], sum(b.num_tokens for b in blocks) + k_self.shape[1], *k_self.shape[2:])
        problem = tensor_problem("gather() keys", keys, shape, k_self.dtype, k_self.device, finite=False)
        if problem:
            raise origin.error(f"layer {layer}: {problem}", self._query.block_id)
        return keys, torch.cat([*vs, v_self], dim=1)

    def _attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The backend's output, checked: ``q``'s shape, dtype and device, finite. Non-finite
        output is blamed on the realigner if the keys it gathered are non-finite."""
        origin = self._origins[2]
        block = self._query.block_id
        out = origin.call(block, self._backend.attend, q, keys, values)
        problem = tensor_problem("output", out, tuple(q.shape), q.dtype, q.device)
        if problem:
            if not bool(torch.isfinite(keys).all()):
                raise self._origins[1].error(f"layer {layer}: gather() keys hold non-finite values (NaN/Inf)", block)
            raise origin.error(f"layer {layer}: {problem}", block)
        return out

    def _pick(self, layer: int, g: int, q: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, k']`` the selector picks from group ``g`` at ``layer``, kept on the device:
        shape, dtype and device checked now, values on the device (read at the pass's end)."""
        blocks = self._groups[g][0]
        assert self._selector is not None
        if self._selector.shared_across_layers and g in self._shared:
            idx = self._shared[g]
        else:
            origin = self._origins[0]
            idx = origin.call(self._query.block_id, self._selector.select, q, blocks, layer)
            budget = self._counts[g]
            problem = selection_problem(
                idx, batch=q.shape[0], budget=budget, candidates=len(blocks), device=q.device, read=False
            )
            if problem:
                raise origin.error(f"layer {layer}: {problem}", self._query.block_id)
            if budget:
                self._picks.append((layer, g, idx))  # checked at the pass's end, all layers at once
                idx = idx.clamp(0, len(blocks) - 1)
            if self._selector.shared_across_layers:
                self._shared[g] = idx
        self.selections[(layer, g)] = idx
        return idx

    def _device_layout(self, q: torch.Tensor) -> _DeviceLayout:
        """Pieces in packed order with their shifts on ``q``'s device: one asynchronous
        host-to-device copy per forward pass."""
        pieces: list[_Piece] = []
        parts: list[list[tuple[float, int]] | None] = []
        """Per piece, what it needs on the device as ``(value, count)`` runs: per-token shifts of
        fixed blocks (one run per block), or a group's candidates' homes followed by its picks'
        targets; ``None`` when the piece cannot move."""
        rotates = self._realigner.rotates
        targets = iter(self._targets)
        for g, (blocks, select) in enumerate(self._groups):
            if select:
                piece, homes = self._group_piece(g, blocks, targets)
                pieces.append(piece)
                parts.append(homes if rotates and piece.count else None)
            else:
                deltas = [float(next(targets)) - b.position for b in blocks]
                pieces.append(_Piece(blocks, count=len(blocks)))
                moves = rotates and any(d != 0 for d in deltas)
                parts.append([(d, b.num_tokens) for b, d in zip(blocks, deltas, strict=True)] if moves else None)
        moved = max((i + 1 for i, part in enumerate(parts) if part is not None), default=0)
        runs: list[tuple[float, int]] = []
        for piece, part in zip(pieces[:moved], parts[:moved], strict=True):
            if part is None and piece.group is None:  # inside the moved prefix, not moving itself
                part = [(0.0, b.num_tokens) for b in piece.blocks]
            runs.extend(part or ())
        paged = self._paged(pieces, runs)
        values = to_device(Rope3D.shifts_of_runs(runs), q.device) if runs else None
        self._slots_from(paged, values)
        offset = 0
        for piece in pieces[:moved]:
            assert values is not None
            if piece.group is None:
                n = sum(b.num_tokens for b in piece.blocks)
                piece.deltas = values[offset : offset + n]
                offset += n
            elif piece.count:
                offset = piece.place(values, offset)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        return _DeviceLayout(pieces, moved, rows)

    def _group_piece(
        self, g: int, blocks: list[CachedBlock], targets: Iterator[float]
    ) -> tuple[_Piece, list[tuple[float, int]]]:
        """Selected group ``g`` as a piece (taking its picks' targets from ``targets``) and what it
        needs on the device, as ``(value, 1)`` runs: its candidates' homes, then its picks'
        targets (:meth:`_Piece.place` takes them back)."""
        assert self._selector is not None
        count = self._counts[g]
        picked = [float(next(targets)) for _ in range(count)]
        homes = [(b.position, 1) for b in blocks] + [(t, 1) for t in picked]
        return _Piece(blocks, g, count, blocks[0].num_tokens), homes

    @staticmethod
    def _paged(pieces: list[_Piece], runs: list[tuple[float, int]]) -> list[tuple[_Piece, int]]:
        """Give each selected piece whose candidates share one store page that page, and append
        their slots to ``runs`` (``(slot, 1)``, to go to the device with the pass's layout);
        returns each such piece with the offset of its slots in the values ``runs`` expand to."""
        paged = []
        size = sum(count for _, count in runs)
        for piece in pieces:
            found = _one_page(piece.blocks) if piece.group is not None and piece.count else None
            if found is not None:
                piece.page = found[0]
                paged.append((piece, size))
                runs.extend((float(slot), 1) for slot in found[1])
                size += len(found[1])
        return paged

    @staticmethod
    def _slots_from(paged: list[tuple[_Piece, int]], values: torch.Tensor | None) -> None:
        """The paged pieces' slots out of the pass's device-side values."""
        for piece, offset in paged:
            assert values is not None
            piece.slots = values[offset : offset + len(piece.blocks)].long()

    def _split_layout(self, q: torch.Tensor) -> _DeviceLayout:
        """:meth:`_device_layout` for a split context: the fixed blocks as runs of adjacent
        stored slots with one shift each, the selected groups as pieces; one asynchronous
        host-to-device copy per forward pass."""
        pieces: list[_Piece] = []
        runs: list[_Run] = []
        host: list[tuple[float, int]] = []
        """What goes to the device as ``(value, 1)`` runs: each moved run's shift, each selected
        group's candidates' homes and picks' targets."""
        wants: list[tuple[_Run | _Piece, int]] = []
        rotates = self._realigner.rotates
        targets = iter(self._targets)
        for g, (blocks, select) in enumerate(self._groups):
            if select:
                piece, homes = self._group_piece(g, blocks, targets)
                if piece.count:
                    pieces.append(piece)
                    if rotates:
                        wants.append((piece, len(host)))
                        host.extend(homes)
                continue
            moves: dict[float, list[CachedBlock]] = {}
            for block in blocks:
                moves.setdefault(float(next(targets)) - block.position if rotates else 0.0, []).append(block)
            for delta, members in moves.items():
                stored = [b.slot for b in members if isinstance(b.slot, Slot)]
                found = [_Run(first, count, delta) for first, count in adjacent_runs(stored)]
                found += [_Run(b, 1, delta) for b in members if not isinstance(b.slot, Slot)]
                for run in found:
                    if delta != 0:
                        wants.append((run, len(host)))
                        host.append((delta, 1))
                runs.extend(found)
        paged = self._paged(pieces, host)
        values = to_device(torch.tensor([v for v, _ in host], dtype=torch.float64), q.device) if host else None
        self._slots_from(paged, values)
        for what, offset in wants:
            assert values is not None
            if isinstance(what, _Run):
                what.shift = values[offset : offset + 1]
            else:
                what.place(values, offset)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        return _DeviceLayout(pieces, len(pieces) if rotates else 0, rows, runs)

    def _verify(self) -> None:
        """Hand the pass's device-side checks to the policy's :class:`DeferredChecks` (read once
        per block), or, for a context made without them, read them now (one host read); the
        first bad one raises."""
        picks, self._picks = self._picks, []
        outputs, self._outputs = self._outputs, []
        flags: list[torch.Tensor] = []
        by_group: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for layer, g, idx in picks:
            by_group.setdefault(g, []).append((layer, idx))
        for g, entries in by_group.items():
            stacked = torch.stack([idx for _, idx in entries])  # [layers, B, k]
            flags.append(_picks_ok(stacked, len(self._groups[g][0])))
        probes = [x for _, out_probe, keys_probe in outputs for x in (out_probe, keys_probe) if x is not None]
        if probes:
            flags.append(finite_flags(probes))
        if not flags:
            return
        flat = torch.cat([f.reshape(-1) for f in flags])
        if self._checks is not None:
            self._checks.add(self._query.block_id, flat, lambda: self._explain(picks, outputs))
        elif not bool(flat.all()):
            self._explain(picks, outputs)

    def _explain(
        self,
        picks: list[tuple[int, int, torch.Tensor]],
        outputs: list[tuple[int, torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Raise the error of the first bad check of a pass (by layer; a layer's picks first)."""
        block = self._query.block_id
        # by layer, a layer's picks before its output; each in the order recorded
        order = sorted([(p[0], 0, i) for i, p in enumerate(picks)] + [(o[0], 1, i) for i, o in enumerate(outputs)])
        for layer, kind, i in order:
            if kind == 0:
                _, g, idx = picks[i]
                if bool(_picks_ok(idx[None], len(self._groups[g][0])).all()):
                    continue
                problem = selection_problem(
                    idx,
                    batch=idx.shape[0],
                    budget=idx.shape[1],
                    candidates=len(self._groups[g][0]),
                    device=idx.device,
                )
                raise self._origins[0].error(f"layer {layer}: {problem}", block)
            _, out_probe, keys_probe = outputs[i]
            if keys_probe is not None and not bool(torch.isfinite(keys_probe)):  # the realigner's output was non-finite
                raise self._origins[1].error(
                    f"layer {layer}: gather() keys (or query_shifter() queries) hold non-finite values (NaN/Inf)", block
                )
            if not bool(torch.isfinite(out_probe)):
                raise self._origins[2].error(f"layer {layer}: output contains non-finite values (NaN/Inf)", block)

    def _attend_on_device(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:meth:`attend` with the picks kept on the device (see the class docstring)."""
        if self._layout is None:
            self._layout = self._device_layout(q)
        layout = self._layout
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        shifts: list[torch.Tensor] = []
        batch = q.shape[0]
        for i, piece in enumerate(layout.pieces):
            if piece.group is None:
                for cached in piece.blocks:
                    kb, vb = cached.layer_kv(layer)
                    keys.append(kb)
                    values.append(vb)
                if i < layout.moved_pieces:
                    assert piece.deltas is not None
                    shifts.append(piece.deltas[None].expand(batch, -1))
                continue
            if piece.count:
                self._gather_picks(layer, q, piece, layout, keys, values, shifts)
        gathered, values_all = self._gather_on_device(layer, keys, values, shifts, k, v)
        self._context_tokens = gathered.shape[1] - k.shape[1]
        backend = self._origins[2]
        block = self._query.block_id
        out = backend.call(block, self._backend.attend, q, gathered, values_all)
        problem = tensor_problem("output", out, tuple(q.shape), q.dtype, q.device, finite=False)
        if problem:
            raise backend.error(f"layer {layer}: {problem}", block)
        return self._checked_later(layer, out, None if self._realigner.keeps_finite else [gathered])

    def _gather_picks(
        self,
        layer: int,
        q: torch.Tensor,
        piece: _Piece,
        layout: _DeviceLayout,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        shifts: list[torch.Tensor],
    ) -> None:
        """Append the selected group ``piece``'s picks at ``layer`` to ``keys``/``values``
        (``[B, k·n, H, D]``) and, when they move, their per-token shifts ``[B, k·n]`` to
        ``shifts``; all on the device."""
        assert piece.group is not None
        idx = self._pick(layer, piece.group, q)  # [B, k]
        if piece.picked is None:
            rows = piece.slots[idx] if piece.page is not None and piece.slots is not None else idx
            moved = None
            if piece.targets is not None:
                assert piece.deltas is not None
                picked = piece.targets[None] - piece.deltas[idx]  # [B, k]: target − home of each pick
                moved = picked[:, :, None].expand(-1, -1, piece.tokens).flatten(1, 2)
            if self._selector is not None and self._selector.shared_across_layers:
                piece.picked = (rows, moved)  # the same picks on every layer of this pass
        else:
            rows, moved = piece.picked
        if piece.page is not None:  # K and V of the picks in one indexing of their page
            kv = piece.page[:, layer][:, layout.batch_rows, rows]  # [2, B, k, n, H, D]
            keys.append(kv[0].flatten(1, 2))  # [B, k·n, H, D]
            values.append(kv[1].flatten(1, 2))
        else:
            kv_list = [block.layer_kv(layer) for block in piece.blocks]
            stacked_k = torch.stack([kb for kb, _ in kv_list], dim=1)  # [B, C, n, H, D]
            stacked_v = torch.stack([vb for _, vb in kv_list], dim=1)
            keys.append(stacked_k[layout.batch_rows, rows].flatten(1, 2))
            values.append(stacked_v[layout.batch_rows, rows].flatten(1, 2))
        if moved is not None:
            shifts.append(moved)

    def _gather_on_device(
        self,
        layer: int,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        shifts: list[torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys`` then ``k`` in one tensor through the realigner's :meth:`gather_shifted` (the
        first tokens moved by ``shifts``), checked, and ``values`` then ``v``."""
        deltas = self._pass_deltas(shifts)
        origin = self._origins[1]
        block = self._query.block_id
        gathered = origin.call(block, self._realigner.gather_shifted, keys, deltas, self._rope, k)
        shape = (k.shape[0], sum(x.shape[1] for x in keys) + k.shape[1], *k.shape[2:])
        problem = tensor_problem("gather_shifted() keys", gathered, shape, k.dtype, k.device, finite=False)
        if problem:
            raise origin.error(f"layer {layer}: {problem}", block)
        return gathered, torch.cat([*values, v], dim=1)

    def _pass_deltas(self, shifts: list[torch.Tensor]) -> torch.Tensor | None:
        """The per-token shifts ``[B or 1, M]`` of this layer's moved pieces in one tensor; when
        no layer's differ (see :attr:`_DeviceLayout.deltas`), the first layer's."""
        layout = self._layout
        assert layout is not None
        if layout.deltas is not None:
            return layout.deltas
        deltas = (shifts[0] if len(shifts) == 1 else torch.cat(shifts, dim=1)) if shifts else None
        if self._selector is None or self._selector.shared_across_layers:
            layout.deltas = deltas
        return deltas

    def _checked_later(self, layer: int, out: torch.Tensor, moved: list[torch.Tensor] | None) -> torch.Tensor:
        """``out``, its finiteness (and that of the realigner's ``moved`` tensors, unless
        ``None``) kept as flags on the device, which the pass's last layer hands to :meth:`_verify`."""
        if out.is_floating_point():
            # flags only (holding the tensors would keep every layer's context alive); the
            # realigner's tensors only when it does not promise finite ones (a pass over the
            # whole context per layer)
            probes = [finite_probe(x) for x in moved or ()]
            moved_probe = (probes[0] if len(probes) == 1 else torch.stack(probes).amax()) if probes else None
            self._outputs.append((layer, finite_probe(out), moved_probe))
        if layer >= self._last_layer:
            self._verify()
        return out

    def _attend_split(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:meth:`_attend_on_device` without the per-layer copy of the context: each run of
        stored fixed blocks is attended where it is stored — with the query moved by the run's
        ``−delta`` (:meth:`PositionalRealigner.query_shifter`) instead of the keys by ``+delta`` —
        the selected groups' picks and the block's own tokens are gathered (the only copy), and
        the parts are merged by their log-sum-exp (:func:`~packforcing.attention.merge.merge_by_lse`)."""
        if self._layout is None:
            self._layout = self._split_layout(q)
        layout = self._layout
        block = self._query.block_id
        realigner = self._origins[1]
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        moved_queries: dict[float, torch.Tensor] = {}
        tokens = 0
        for run in layout.runs:
            kr, vr = run.kv(layer)
            query = q
            if run.shift is not None:
                if run.delta not in moved_queries:
                    if run.shifter is None:  # made on the pass's first layer
                        run.shifter = realigner.call(block, self._realigner.query_shifter, run.shift, self._rope)
                    moved = realigner.call(block, run.shifter, q)
                    problem = tensor_problem(
                        "query_shifter() query", moved, tuple(q.shape), q.dtype, q.device, finite=False
                    )
                    if problem:
                        raise realigner.error(f"layer {layer}: {problem}", block)
                    moved_queries[run.delta] = moved
                query = moved_queries[run.delta]
            parts.append(self._attend_part(layer, query, kr, vr))
            tokens += kr.shape[1]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        shifts: list[torch.Tensor] = []
        for piece in layout.pieces:
            self._gather_picks(layer, q, piece, layout, keys, values, shifts)
        gathered, values_all = self._gather_on_device(layer, keys, values, shifts, k, v) if keys else (k, v)
        parts.append(self._attend_part(layer, q, gathered, values_all))
        self._context_tokens = tokens + gathered.shape[1] - k.shape[1]
        out = merge_by_lse(parts)
        probed = None if self._realigner.keeps_finite else [gathered, *moved_queries.values()]
        return self._checked_later(layer, out, probed)

    def _attend_part(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend's ``attend_lse`` over one part of the context, its shapes checked."""
        backend = self._origins[2]
        block = self._query.block_id
        result = backend.call(block, self._backend.attend_lse, q, k, v)
        try:
            out, lse = result
        except (TypeError, ValueError):
            returned = type(result).__name__
            raise backend.error(
                f"layer {layer}: attend_lse() returned {returned}, expected (out, lse)", block
            ) from None
        problem = tensor_problem("attend_lse() output", out, tuple(q.shape), q.dtype, q.device, finite=False)
        if problem is None and (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3])):
            got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
            problem = f"attend_lse() log-sum-exp: expected shape {tuple(q.shape[:3])}, got {got}"
        if problem:
            raise backend.error(f"layer {layer}: {problem}", block)
        return out, lse

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._groups:
            self._context_tokens = 0
            return self._attend(layer, q, k, v)
        if self._split:
            return self._attend_split(layer, q, k, v)
        if self._on_device:
            return self._attend_on_device(layer, q, k, v)
        rows = self._choose(layer, q)
        batch = q.shape[0]
        same = all(len(r) == len(rows[0]) and all(a is b for a, b in zip(r, rows[0], strict=False)) for r in rows[1:])
        if same:
            keys, values = self._gather(layer, rows[0], slice(None), k, v)
        else:
            per_item = [self._gather(layer, rows[b], slice(b, b + 1), k[b : b + 1], v[b : b + 1]) for b in range(batch)]
            keys = torch.cat([kv[0] for kv in per_item], dim=0)
            values = torch.cat([kv[1] for kv in per_item], dim=0)
        self._context_tokens = keys.shape[1] - k.shape[1]
        return self._attend(layer, q, keys, values)
