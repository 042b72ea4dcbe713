"""The general tiered cache policy; every shipped policy is a composition of it.

YAML form::

    policy:
      name: tiered
      overflow: archive          # or drop: what leaves the oldest non-pinned tier
      tiers:                     # oldest first
        - {name: sink, frames: 8, pinned: true}
        - {name: mid, blocks: 16, fidelity: compressed, select: true}
        - {name: recent, frames: 4}

``fidelity`` is ``full``, ``compressed`` (the top-level ``compressor``) or a component
mapping such as ``{name: pool, window: [1, 2, 2]}`` for a tier-specific compressor.
``select: true`` means only the blocks the configured selector picks are attended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from packforcing.core.geometry import Geometry, Grid
from packforcing.core.interfaces import (
    AttentionBackend,
    AttentionContext,
    BlockModel,
    CachePolicy,
    Compressor,
    PositionalRealigner,
    Selector,
)
from packforcing.core.records import (
    FULL,
    BlockCommit,
    BlockQuery,
    CachedBlock,
    CacheStats,
    MemoryPlan,
    TierStats,
)
from packforcing.core.store import TierStore, check_finite
from packforcing.core.validators import one_of, optional_non_negative, positive
from packforcing.policies.layout import ARCHIVE, DROP, TierLayout, TierSlotSpec


def _fidelity(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return dict(value)
    raise ValueError(f"fidelity: expected 'full', 'compressed' or a compressor mapping with a name, got {value!r}")


@attrs.frozen
class TierSpec:
    """One tier: capacity in latent ``frames`` or in ``blocks`` (neither: unbounded)."""

    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    frames: int | None = attrs.field(default=None, validator=optional_non_negative)
    blocks: int | None = attrs.field(default=None, validator=optional_non_negative)
    fidelity: str | dict[str, Any] = attrs.field(default=FULL, converter=_fidelity)
    pinned: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    select: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.frames is not None and self.blocks is not None:
            raise ValueError(f"tiers.{self.name}: give frames or blocks, not both")
        if self.name == ARCHIVE:
            raise ValueError("tiers: 'archive' is reserved for overflow")

    def capacity(self, geometry: Geometry) -> int | None:
        """Capacity in blocks (whole blocks that fit in ``frames``)."""
        if self.frames is not None:
            if not self.pinned and 0 < self.frames < geometry.frames_per_block:
                raise ValueError(
                    f"tiers.{self.name}: frames={self.frames} is smaller than one block "
                    f"({geometry.frames_per_block} frames)"
                )
            return geometry.frames_to_blocks(self.frames)
        return self.blocks


def _tiers(value: Any) -> tuple[TierSpec, ...]:
    out = []
    for i, t in enumerate(value):
        if isinstance(t, TierSpec):
            out.append(t)
        elif isinstance(t, Mapping):
            out.append(TierSpec(**t))
        else:
            raise ValueError(f"tiers[{i}]: expected a mapping, got {t!r}")
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"tiers: duplicate tier names {sorted(dup)}")
    return tuple(out)


@attrs.frozen
class TieredParams:
    """Parameters of the ``tiered`` policy."""

    tiers: tuple[TierSpec, ...] = attrs.field(converter=_tiers)
    overflow: str = attrs.field(default=DROP, validator=one_of(ARCHIVE, DROP))
    archive_device: str | None = None
    page_blocks: int = attrs.field(default=4, validator=positive)


class _Tier:
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


class TieredPolicy(CachePolicy):
    """A cache of ordered tiers; see the module docstring for the rules."""

    name = "tiered"

    def __init__(
        self,
        params: TieredParams,
        *,
        geometry: Geometry,
        model: BlockModel,
        backend: AttentionBackend,
        realigner: PositionalRealigner,
        selector: Selector | None = None,
        compressors: Mapping[str, Compressor] | None = None,
        name: str | None = None,
    ) -> None:
        self.params = params
        if name is not None:
            self.name = name
        self.geometry = geometry
        self.model = model
        self.backend = backend
        self.realigner = realigner
        self.selector = selector
        compressors = dict(compressors or {})
        self._tiers: list[_Tier] = []
        for spec in params.tiers:
            comp = None
            if spec.fidelity != FULL:
                if spec.name not in compressors:
                    raise ValueError(f"tiers.{spec.name}: fidelity {spec.fidelity!r} needs a compressor")
                comp = compressors[spec.name]
            if spec.select and selector is None:
                raise ValueError(f"tiers.{spec.name}: select: true needs a selector")
            self._tiers.append(_Tier(spec, spec.capacity(geometry), comp))
        self.layout = TierLayout(
            [TierSlotSpec(t.name, t.capacity, t.spec.pinned) for t in self._tiers], params.overflow
        )
        self._resolve_grids()
        self._archive: deque[CachedBlock] = deque()
        self._archive_store: TierStore | None = None
        self._dropped: list[int] = []
        self._where: dict[int, int | str] = {}
        self._last_block_id = -1

    # ------------------------------------------------------------------ geometry
    def _resolve_grids(self) -> None:
        """Token grid per tier along the demotion chain, and which tiers keep latents."""
        g = self.geometry
        entry = g.block_grid
        n = len(self._tiers)
        for i in reversed(range(n)):
            tier = self._tiers[i]
            if tier.spec.pinned or i == n - 1:
                source = entry
            else:
                source = self._tiers[i + 1].grid
            tier.grid = tier.compressor.output_grid(source) if tier.compressor else source
            needs_latents = tier.compressor is not None and tier.compressor.needs_latents
            if needs_latents and not tier.spec.pinned and i < n - 1:
                # blocks arrive from the next newer tier: it must keep their latents,
                # and only full-fidelity blocks carry them
                feeder = self._tiers[i + 1]
                if feeder.compressor is not None:
                    raise ValueError(
                        f"tiers.{tier.name}: compressor {tier.compressor.name!r} needs latents, "
                        f"but tier {feeder.name!r} holds compressed blocks"
                    )
                feeder.keep_latents = True
        for tier in self._tiers:
            t, h, w = tier.grid
            tier.store = TierStore(
                name=tier.name,
                slot_tokens=t * h * w,
                num_layers=g.num_layers,
                num_heads=g.num_heads,
                head_dim=g.head_dim,
                capacity=tier.capacity,
                page_blocks=self.params.page_blocks,
                keep_latents=tier.keep_latents,
            )

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self._tiers]

    def tier_blocks(self, name: str) -> list[CachedBlock]:
        """Blocks held by tier ``name``, oldest first."""
        for t in self._tiers:
            if t.name == name:
                return list(t.blocks)
        raise KeyError(f"no tier {name!r}; tiers are {self.tier_names}")

    def tier_compressor(self, name: str) -> Compressor | None:
        """The compressor that fills tier ``name`` (``None`` for a full-fidelity tier)."""
        for t in self._tiers:
            if t.name == name:
                return t.compressor
        raise KeyError(f"no tier {name!r}; tiers are {self.tier_names}")

    @property
    def archived(self) -> list[CachedBlock]:
        """Blocks moved out of the active budget (retrievable), oldest first."""
        return list(self._archive)

    @property
    def dropped(self) -> list[int]:
        """Ids of blocks dropped by the overflow rule."""
        return list(self._dropped)

    def location(self, block_id: int) -> int | str:
        """Tier name, ``"archive"`` or ``"drop"`` for a committed block."""
        where = self._where[block_id]
        return self._tiers[where].name if isinstance(where, int) else where

    def validate(self, env: Any) -> None:
        """Cross-checks once every component is built (called by the builder): a selector's
        ``k`` may not exceed the capacity of a ``select: true`` tier it picks from."""
        spec = env.config.components.get("selector") if env.config is not None else None
        k = getattr(spec.params, "k", None) if spec is not None else None
        if self.selector is None or not isinstance(k, int):
            return
        for tier in self._tiers:
            if tier.spec.select and tier.capacity is not None and k > tier.capacity:
                raise ValueError(
                    f"selector.k: {k} is larger than the capacity of tier {tier.name!r} it selects from "
                    f"({tier.capacity} blocks)"
                )

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        self.layout.reset()
        for t in self._tiers:
            t.blocks.clear()
            assert t.store is not None
            t.store.clear()
        self._archive.clear()
        if self._archive_store is not None:
            self._archive_store.clear()
        self._dropped.clear()
        self._where.clear()
        self._last_block_id = -1

    def _store_block(self, tier: _Tier, source: BlockCommit | CachedBlock) -> CachedBlock:
        assert tier.store is not None
        if tier.compressor is not None and not (
            isinstance(source, CachedBlock) and source.fidelity == tier.compressor.name and source.grid == tier.grid
        ):
            block = source if isinstance(source, CachedBlock) else self._transient(source)
            ckv = tier.compressor.compress(block, self.model)
            if ckv.grid != tier.grid:
                raise RuntimeError(f"compressor {tier.compressor.name!r} produced grid {ckv.grid}, planned {tier.grid}")
            latents = source.latents if tier.keep_latents else None
            slot = tier.store.put(ckv.keys, ckv.values, latents)
            return CachedBlock(
                block_id=source.block_id,
                start_frame=source.start_frame,
                num_frames=source.num_frames,
                fidelity=tier.compressor.name,
                grid=ckv.grid,
                position=ckv.position,
                temporal_stride=ckv.temporal_stride,
                slot=slot,
                hw_stride=ckv.hw_stride,
                condition=source.condition,
            )
        if isinstance(source, CachedBlock):
            keys, values = source.keys, source.values
            stride = source.temporal_stride
            hw_stride = source.hw_stride
            fidelity = source.fidelity
        else:
            keys, values = list(source.keys), list(source.values)
            stride = float(self.geometry.patch[0])
            hw_stride = 1.0
            fidelity = FULL
        latents = source.latents if tier.keep_latents else None
        slot = tier.store.put(keys, values, latents)
        return CachedBlock(
            block_id=source.block_id,
            start_frame=source.start_frame,
            num_frames=source.num_frames,
            fidelity=fidelity,
            grid=source.grid,
            position=source.position,
            temporal_stride=stride,
            slot=slot,
            hw_stride=hw_stride,
            condition=source.condition,
        )

    def _transient(self, commit: BlockCommit) -> CachedBlock:
        """A commit seen as a block (for compressing straight into a compressed entry tier)."""
        return CachedBlock.from_tensors(
            commit.keys,
            commit.values,
            latents=commit.latents,
            block_id=commit.block_id,
            start_frame=commit.start_frame,
            num_frames=commit.num_frames,
            grid=commit.grid,
            position=commit.position,
            temporal_stride=float(self.geometry.patch[0]),
            condition=commit.condition,
        )

    def _archive_block(self, block: CachedBlock) -> CachedBlock:
        if self._archive_store is None or self._archive_store.slot_tokens != block.num_tokens:
            if self._archive_store is not None and self._archive_store.live_blocks:
                raise RuntimeError("archive holds blocks of another size")
            g = self.geometry
            self._archive_store = TierStore(
                name=ARCHIVE,
                slot_tokens=block.num_tokens,
                num_layers=g.num_layers,
                num_heads=g.num_heads,
                head_dim=g.head_dim,
                capacity=None,
                page_blocks=self.params.page_blocks,
                device=self.params.archive_device,
            )
        slot = self._archive_store.put(block.keys, block.values)
        return attrs.evolve(block, slot=slot)

    def commit(self, commit: BlockCommit) -> None:
        if commit.grid != self.geometry.block_grid:
            raise ValueError(f"commit grid {commit.grid} differs from the geometry's {self.geometry.block_grid}")
        if commit.block_id <= self._last_block_id:
            raise ValueError(f"block {commit.block_id} committed after block {self._last_block_id}")
        # refuse before any bookkeeping changes, so a bad block leaves the cache as it was
        check_finite(commit.keys, commit.values, f"block {commit.block_id}")
        for move in self.layout.commit(commit.block_id):
            if move.src is None:
                tier = self._tiers[move.dst]  # type: ignore[index]
                tier.blocks.append(self._store_block(tier, commit))
                self._where[move.block_id] = move.dst
                continue
            src = self._tiers[move.src]
            block = src.blocks.popleft()
            assert block.block_id == move.block_id
            if move.dst == ARCHIVE:
                self._archive.append(self._archive_block(block))
            elif move.dst == DROP:
                self._dropped.append(block.block_id)
            else:
                dst = self._tiers[move.dst]  # type: ignore[index]
                dst.blocks.append(self._store_block(dst, block))
            assert src.store is not None
            src.store.release(block.slot)
            self._where[move.block_id] = move.dst
        self._last_block_id = commit.block_id

    def full_resolution_blocks(self) -> list[CachedBlock]:
        """Blocks of the full-fidelity tiers (sink, recent, ...), oldest first."""
        held = [b for t in self._tiers if t.compressor is None for b in t.blocks]
        return sorted(held, key=lambda b: b.block_id)

    def replace_kv(
        self,
        block_id: int,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        *,
        position: float,
        condition: Any = None,
    ) -> None:
        where = self._where.get(block_id)
        tier = self._tiers[where] if isinstance(where, int) else None
        if tier is None or tier.compressor is not None:
            raise ValueError(f"block {block_id} is not held at full resolution (it is in {where or 'no tier'})")
        check_finite(keys, values, f"block {block_id}")
        i = next(i for i, b in enumerate(tier.blocks) if b.block_id == block_id)
        block = tier.blocks[i]
        n = block.slot.num_layers
        slots = [block.slot.layer_kv(layer) for layer in range(n)]
        if (
            len(keys) != n
            or len(values) != n
            or any(keys[i].shape != slots[i][0].shape or values[i].shape != slots[i][1].shape for i in range(n))
        ):
            raise ValueError(f"block {block_id}: the new K/V do not match the cached block's layers and shapes")
        for (k, v), (k_slot, v_slot) in zip(zip(keys, values, strict=True), slots, strict=True):  # checked first
            k_slot.copy_(k)
            v_slot.copy_(v)
        tier.blocks[i] = attrs.evolve(block, position=position, condition=condition)

    # ------------------------------------------------------------------ attention
    def context(self, query: BlockQuery) -> TieredContext:
        # only blocks before the query (all of them while generating; the older ones on a re-cache)
        groups: list[tuple[list[CachedBlock], bool]] = []
        for t in self._tiers:
            blocks = [b for b in t.blocks if b.block_id < query.block_id]
            if blocks:
                groups.append((blocks, t.spec.select))
        return TieredContext(
            groups=groups,
            query=query,
            selector=self.selector,
            realigner=self.realigner,
            backend=self.backend,
            rope=self.model.rope,
        )

    # ------------------------------------------------------------------ memory
    def _tier_stats(self, blocks: Sequence[CachedBlock], store: TierStore | None) -> TierStats:
        return TierStats(
            blocks=len(blocks),
            tokens=sum(b.num_tokens for b in blocks),
            bytes=store.nbytes if store is not None else 0,
        )

    def stats(self) -> CacheStats:
        return CacheStats(
            tiers={t.name: self._tier_stats(t.blocks, t.store) for t in self._tiers},
            archive=self._tier_stats(self._archive, self._archive_store),
            dropped_blocks=len(self._dropped),
        )

    def _slot_bytes(self, tokens: int, keep_latents: bool, batch_size: int) -> int:
        g = self.geometry
        nbytes = tokens * g.bytes_per_token * batch_size
        if keep_latents:
            t, h, w = g.frames_per_block, g.latent_height, g.latent_width
            nbytes += g.latent_channels * t * h * w * g.itemsize * batch_size
        return nbytes

    def plan(self, num_blocks: int, batch_size: int = 1) -> MemoryPlan:
        layout = TierLayout(self.layout.specs, self.layout.overflow)
        peak = [0] * len(self._tiers)
        archived = 0
        context_tokens = 0
        for block_id in range(num_blocks):
            context_tokens = max(context_tokens, self._planned_context(layout))
            for move in layout.commit(block_id):
                if move.dst == ARCHIVE:
                    archived += 1
            for i, members in enumerate(layout.members):
                peak[i] = max(peak[i], len(members))
        tiers: dict[str, TierStats] = {}
        for tier, live in zip(self._tiers, peak, strict=True):
            t, h, w = tier.grid
            tokens = t * h * w
            slots = TierStore.planned_slots(live, self.params.page_blocks, tier.capacity)
            tiers[tier.name] = TierStats(
                blocks=live,
                tokens=live * tokens,
                bytes=slots * self._slot_bytes(tokens, tier.keep_latents, batch_size),
            )
        oldest = next((t for t in self._tiers if not t.spec.pinned), self._tiers[-1])
        at, ah, aw = oldest.grid
        archive_slots = TierStore.planned_slots(archived, self.params.page_blocks, None)
        archive = TierStats(
            blocks=archived,
            tokens=archived * at * ah * aw,
            bytes=archive_slots * self._slot_bytes(at * ah * aw, False, batch_size),
        )
        full_tokens = num_blocks * self.geometry.tokens_per_block
        return MemoryPlan(
            num_blocks=num_blocks,
            tiers=tiers,
            archive=archive,
            context_tokens=context_tokens,
            full_cache_tokens=full_tokens,
            full_cache_bytes=full_tokens * self.geometry.bytes_per_token * batch_size,
        )

    def _planned_context(self, layout: TierLayout) -> int:
        total = 0
        for tier, members in zip(self._tiers, layout.members, strict=True):
            t, h, w = tier.grid
            count = len(members)
            if tier.spec.select and count:
                assert self.selector is not None
                count = self.selector.budget(count)
            total += count * t * h * w
        return total


class TieredContext(AttentionContext):
    """History of one forward pass: tiers' blocks, selected, realigned and gathered.

    Selection runs per layer with that layer's queries (or once per pass when the selector is
    shared across layers) and per batch item. Gathered keys are rotated from each block's home
    position to the realigner's target; stored keys are never modified.
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
    ) -> None:
        self._groups = groups
        self._query = query
        self._selector = selector
        self._realigner = realigner
        self._backend = backend
        self._rope = rope
        self._shared: dict[int, torch.Tensor] = {}
        self._context_tokens = 0
        self.selections: dict[tuple[int, int], torch.Tensor] = {}
        """(layer, group index) → ``[B, k']`` indices chosen by the selector (for inspection)."""
        # Query position depends on how many blocks enter, not on which: use the first k'.
        spans: list[tuple[float, float]] = []
        for blocks, select in groups:
            count = selector.budget(len(blocks)) if select and selector is not None else len(blocks)
            spans.extend((b.position, b.num_frames) for b in blocks[:count])
        _, self._position = realigner.assign(spans, query)

    @property
    def position(self) -> float:
        return self._position

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    def _choose(self, layer: int, q: torch.Tensor) -> list[list[CachedBlock]]:
        """Ordered context blocks for each batch item."""
        batch = q.shape[0]
        rows: list[list[CachedBlock]] = [[] for _ in range(batch)]
        for g, (blocks, select) in enumerate(self._groups):
            if not select:
                for row in rows:
                    row.extend(blocks)
                continue
            assert self._selector is not None
            if self._selector.shared_across_layers and g in self._shared:
                idx = self._shared[g]
            else:
                idx = self._selector.select(q, blocks, layer)
                if self._selector.shared_across_layers:
                    self._shared[g] = idx
            expected = self._selector.budget(len(blocks))
            if tuple(idx.shape) != (batch, expected):
                raise RuntimeError(
                    f"selector {self._selector.name!r} returned indices of shape {tuple(idx.shape)}, "
                    f"expected ({batch}, {expected})"
                )
            self.selections[(layer, g)] = idx
            for b, row in enumerate(rows):
                row.extend(blocks[i] for i in idx[b].tolist())
        return rows

    def _gather(
        self, layer: int, blocks: list[CachedBlock], item: slice, k_self: torch.Tensor, v_self: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B', N_ctx + N, H, D]`` of ``blocks`` (batch rows ``item``) followed by
        the block's own ``k_self, v_self``; keys moved to the realigner's targets."""
        spans = [(b.position, b.num_frames) for b in blocks]
        targets, qpos = self._realigner.assign(spans, self._query)
        if qpos != self._position:
            raise RuntimeError(
                f"realigner {self._realigner.name!r} moved the query from {self._position} to {qpos} "
                "depending on which blocks were selected"
            )
        ks, vs = [], []
        for block in blocks:
            k, v = block.layer_kv(layer)
            ks.append(k[item])
            vs.append(v[item])
        keys = self._realigner.gather(ks, blocks, targets, self._rope, tail=k_self)
        return keys, torch.cat([*vs, v_self], dim=1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._groups:
            self._context_tokens = 0
            return self._backend.attend(q, k, v)
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
        return self._backend.attend(q, keys, values)
