"""The general tiered cache policy; every shipped policy is a composition of it.

A cache of ordered tiers, oldest first: each commit moves blocks through the tiers as the
:class:`~packforcing.policies.layout.TierLayout` decides, compressing them on demotion into a
compressed tier, archiving or dropping what overflows, atomically (every plugin call and every
allocation happens before any block moves). By concern:

- :mod:`packforcing.policies.tier_specs`: the parameters (``TierSpec``, ``TieredParams``, the YAML form);
- :mod:`packforcing.policies.tiers`: the live tiers (blocks, stores) and a commit's two-phase puts;
- :mod:`packforcing.policies.tiered_context`: what one forward pass attends (selection, realignment);
- :mod:`packforcing.policies.planner`: the memory plan, from the layout and the stores' own page arithmetic;
- :mod:`packforcing.policies.tiered_checkpoint`: a checkpoint written and read back into new stores;
- this module: :class:`TieredPolicy`, which commits (first reading, in one host read, the checks
  its contexts held on the device for the block's passes), builds contexts, reports stats and
  installs checkpoints.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from packforcing.core.boundary import DeferredChecks, Origin, checked_budget, kv_problem, number_problem
from packforcing.core.errors import ConfigError, ParamError, PluginError
from packforcing.core.finite import all_finite
from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import (
    AttentionBackend,
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
    CompressedKV,
    MemoryPlan,
    TierStats,
)
from packforcing.core.store import Reservation, Slot, TierStore, check_finite
from packforcing.policies.layout import ARCHIVE, DROP, IdRuns, TierLayout, TierSlotSpec
from packforcing.policies.planner import plan_tiers
from packforcing.policies.tier_specs import MAX_PLAN_BLOCKS, TieredParams, TierSpec, archive_placement
from packforcing.policies.tiered_checkpoint import LoadedCache, cache_state, stage_cache
from packforcing.policies.tiered_context import TieredContext
from packforcing.policies.tiers import Put, Step, Tier

__all__ = [
    "MAX_PLAN_BLOCKS",
    "TierSpec",
    "TieredContext",
    "TieredParams",
    "TieredPolicy",
    "archive_placement",
]


def _slot_of(block: CachedBlock) -> Slot:
    """The store slot of a block the policy holds (every one lives in a tier's or the archive's store)."""
    if not isinstance(block.slot, Slot):
        raise TypeError(f"block {block.block_id} holds plain tensors, not a store slot")
    return block.slot


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
        origins: Mapping[str, Origin] | None = None,
        compressor_paths: Mapping[str, str] | None = None,
    ) -> None:
        self.params = params
        self.origins = dict(origins or {})
        """Which plugin each part is, for error messages: keys ``selector``, ``realigner``,
        ``backend`` and ``compressor:<tier name>``."""
        if name is not None:
            self.name = name
        self.geometry = geometry
        self.model = model
        self.backend = backend
        self.realigner = realigner
        self.selector = selector
        compressors = dict(compressors or {})
        self._compressor_paths = dict(compressor_paths or {})
        """Tier name → config key path of its compressor, where its parameter errors are reported."""
        self._tiers: list[Tier] = []
        for spec in params.tiers:
            comp = None
            if spec.fidelity != FULL:
                if spec.name not in compressors:
                    raise ParamError(f"tiers.{spec.name}", f"fidelity {spec.fidelity!r} needs a compressor")
                comp = compressors[spec.name]
            if spec.select and selector is None:
                raise ParamError(f"tiers.{spec.name}", "select: true needs a selector")
            self._tiers.append(Tier(spec, spec.capacity(geometry), comp))
        self.layout = TierLayout(
            [TierSlotSpec(t.name, t.capacity, t.spec.pinned) for t in self._tiers], params.overflow
        )
        self._resolve_grids()
        self._archive: deque[CachedBlock] = deque()
        self._archive_store: TierStore | None = None
        self._dropped = IdRuns()
        """Ids of the blocks dropped, as runs: one run in any video (they leave in order)."""
        self._where: dict[int, int | str] = {}
        """Tier index or ``"archive"`` of each block held: a dropped block leaves it, so it holds
        at most the tiers' and the archive's blocks, not one entry per block ever committed."""
        self._last_block_id = -1
        self._checks = DeferredChecks()
        """The device-side checks of the current block's passes, read by :meth:`settle`."""

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
            try:
                tier.grid = tier.compressor.output_grid(source) if tier.compressor else source
            except ConfigError as exc:  # a compressor parameter (e.g. a window larger than the block)
                path = self._compressor_paths.get(tier.name)
                raise exc.under(path) if path else exc from None
            except (ValueError, PluginError):
                raise
            except Exception as exc:  # the compressor's own failure, not the policy's
                raise self._origin(f"compressor:{tier.name}", "compressor", tier.compressor).raised(exc) from exc
            compressor = tier.compressor
            if compressor is not None and compressor.needs_latents and not tier.spec.pinned and i < n - 1:
                # blocks arrive from the next newer tier: it must keep their latents,
                # and only full-fidelity blocks carry them
                feeder = self._tiers[i + 1]
                if feeder.compressor is not None:
                    raise ParamError(
                        f"tiers.{tier.name}",
                        f"compressor {compressor.name!r} needs latents, "
                        f"but tier {feeder.name!r} holds compressed blocks",
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
                # a bounded selected tier is one page: a context gathers its picks straight from it
                page_blocks=tier.capacity if tier.spec.select and tier.capacity else self.params.page_blocks,
                keep_latents=tier.keep_latents,
            )

    @property
    def tiers(self) -> list[Tier]:
        """The live tiers, oldest first."""
        return list(self._tiers)

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
        """Ids of blocks dropped by the overflow rule, in increasing order (the order they were
        dropped in). A list made on each call: the policy holds them as runs (:class:`IdRuns`)."""
        return list(self._dropped)

    @property
    def dropped_runs(self) -> list[tuple[int, int]]:
        """:attr:`dropped` as runs ``(start, stop)`` of consecutive ids, in increasing order: one
        run in any video (blocks leave in the order they came), however many were dropped."""
        return self._dropped.runs

    @property
    def archive_store(self) -> TierStore | None:
        """The store the archived blocks are in (``None`` before the first is archived)."""
        return self._archive_store

    @property
    def last_block_id(self) -> int:
        """The id of the last block committed (``-1`` for an empty cache)."""
        return self._last_block_id

    def _origin(self, key: str, kind: str, component: Any) -> Origin:
        return self.origins.get(key) or Origin.of(kind, component)

    def _located(self, block_id: int) -> int | str | None:
        """Tier index, ``"archive"`` or ``"drop"`` of a committed block; ``None`` for another id."""
        where = self._where.get(block_id)
        if where is None and block_id in self._dropped:
            return DROP
        return where

    def location(self, block_id: int) -> int | str:
        """Tier name, ``"archive"`` or ``"drop"`` for a committed block."""
        where = self._located(block_id)
        if where is None:
            raise KeyError(block_id)
        return self._tiers[where].name if isinstance(where, int) else where

    def validate(self, env: Any) -> None:
        """Cross-checks once every component is built (called by the builder): a selector's
        ``k`` may not exceed the capacity of a ``select: true`` tier it picks from, and its
        ``budget(n)`` must be an int in ``[0, n]``, non-decreasing, for every ``n`` such a tier
        can hold (the planner and the contexts size themselves by it)."""
        self._check_budgets()
        spec = env.config.components.get("selector") if env.config is not None else None
        k = getattr(spec.params, "k", None) if spec is not None else None
        if self.selector is None or not isinstance(k, int):
            return
        for tier in self._tiers:
            if tier.spec.select and tier.capacity is not None and k > tier.capacity:
                raise ParamError(
                    "selector.k",
                    f"{k} is larger than the capacity of tier {tier.name!r} it selects from ({tier.capacity} blocks)",
                )

    def selector_budget(self, candidates: int) -> int:
        """The selector's ``budget(candidates)``, checked like at build time (a
        :class:`PluginError` naming the selector), for sizes past those checked then."""
        assert self.selector is not None
        return checked_budget(self._origin("selector", "selector", self.selector), self.selector, candidates)

    def _check_budgets(self, unbounded: int = 64) -> None:
        """A :class:`PluginError` naming the selector if ``budget(n)`` is not an int in
        ``[0, n]`` non-decreasing in ``n`` for ``n`` up to a ``select`` tier's capacity
        (``unbounded`` for a tier without one), or if it raises."""
        sizes = [t.capacity if t.capacity is not None else unbounded for t in self._tiers if t.spec.select]
        if self.selector is None or not sizes:
            return
        origin = self._origin("selector", "selector", self.selector)
        previous = 0
        for n in range(max(sizes) + 1):
            previous = checked_budget(origin, self.selector, n, previous=previous)

    def audit(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping disagrees with itself: each tier holds the
        layout's blocks in order, every store's live slots are exactly the slots its blocks hold
        (none leaked, none shared), and every block's location is where it is."""
        seen: set[int] = set()
        for i, (tier, members) in enumerate(zip(self._tiers, self.layout.members, strict=True)):
            ids = [b.block_id for b in tier.blocks]
            assert ids == list(members), f"tier {tier.name!r} holds {ids}, layout says {list(members)}"
            assert tier.store is not None
            held = [b.slot for b in tier.blocks if isinstance(b.slot, Slot)]
            assert len(held) == len(ids), f"tier {tier.name!r} holds a block outside its store"
            slots = {(s.page, s.index) for s in held}
            assert all(s.live and s._store is tier.store for s in held), f"tier {tier.name!r}"
            assert len(slots) == len(ids) == tier.store.live_blocks, (
                f"tier {tier.name!r}: {len(ids)} blocks, {len(slots)} distinct slots, "
                f"{tier.store.live_blocks} live slots in its store"
            )
            assert not slots & set(tier.store._free), f"tier {tier.name!r}: a held slot is also free"
            for block_id in ids:
                assert self._where.get(block_id) == i, f"block {block_id}: location {self._where.get(block_id)!r}"
            seen.update(ids)
        archived = [b.block_id for b in self._archive]
        live = self._archive_store.live_blocks if self._archive_store is not None else 0
        assert live == len(archived), f"archive: {len(archived)} blocks, {live} live slots"
        for block_id in archived:
            assert self._where.get(block_id) == ARCHIVE, f"block {block_id}: location {self._where.get(block_id)!r}"
        held_ids = seen | set(archived)
        assert len(held_ids) == len(seen) + len(archived), "a block is in two places"
        assert held_ids == set(self._where), f"locations {sorted(self._where)} vs blocks held {sorted(held_ids)}"
        dropped_and_held = sorted(b for b in held_ids if b in self._dropped)
        assert not dropped_and_held, f"blocks {dropped_and_held} are dropped and held"
        runs = self._dropped.runs
        assert not runs or runs[-1][1] - 1 <= self._last_block_id, f"dropped {runs} after the last block"

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        self._checks.clear()
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole cache as ``(tensors, meta)``: every tier's and the archive's blocks (K/V
        stacked per block ``[2, L, B, N, H, D]``, latents ``[B, C, F, H, W]`` where kept) and the
        JSON-able bookkeeping (block records with the ``(page, index)`` slot each block is stored
        in, each store's free slots in order, the dropped ids as runs ``[start, stop)`` of
        consecutive ids, last block). Safe to write with safetensors + JSON; :meth:`load_state_dict`
        restores it bit for bit, slots included (and reads the dropped ids' earlier form, a list
        of ids, as well)."""
        return cache_state(self)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Replace the cache with a :meth:`state_dict`, all or nothing: the blocks are put into
        new stores, checked on the way against this policy's tiers and geometry (every block's
        K/V ``[2, L, B, N, H, D]``: layers, tokens, heads, head size, one batch size and dtype for
        the whole cache, finite; latents where a tier keeps them), and the new stores replace the
        old ones only once all of it succeeded. On any error (``ValueError``,
        :class:`~packforcing.core.store.NonFiniteError`, an allocation) the cache is exactly as it
        was. While loading, the old cache and the new one are both held.

        Each block goes back to the slot it was saved in and every store gets its free slots in
        their saved order, so the layout is the saved one: a split context's runs of adjacent
        slots (the order it sums their parts in) and the slots the next blocks take, hence a
        bit-identical continuation. A checkpoint saved without slots is refilled in time order."""
        self._install(stage_cache(self, tensors, meta))

    def _install(self, loaded: LoadedCache) -> None:
        """Swap in a checkpoint :func:`~packforcing.policies.tiered_checkpoint.stage_cache`
        loaded (nothing here can fail); the old stores' memory goes back now."""
        old = [t.store for t in self._tiers] + [self._archive_store]
        self._checks.clear()
        self._where = {}
        for i, (tier, store, blocks) in enumerate(zip(self._tiers, loaded.stores, loaded.blocks, strict=True)):
            tier.store = store
            tier.blocks = blocks
            self.layout.members[i] = deque(b.block_id for b in blocks)
            self._where.update((b.block_id, i) for b in blocks)
        self._archive_store = loaded.archive_store
        self._archive = loaded.archive
        self._where.update((b.block_id, ARCHIVE) for b in self._archive)
        self._dropped = loaded.dropped  # a new IdRuns of each load
        self._last_block_id = loaded.last_block_id
        for old_store in old:
            if old_store is not None:
                old_store.clear()  # its memory goes back now, not when the last view of it is gone

    # ------------------------------------------------------------------ commit
    def _prepare_block(self, tier: Tier, source: BlockCommit | CachedBlock, committing: int) -> Put:
        """Everything that can fail about storing ``source`` in ``tier`` (compression, checks),
        without changing the cache. A compressor's output is checked on the host but for its
        finiteness, which is held with block ``committing``'s checks (read when it settles)."""
        assert tier.store is not None
        latents = source.latents if tier.keep_latents else None
        if tier.compressor is not None and not (
            isinstance(source, CachedBlock) and source.fidelity == tier.compressor.name and source.grid == tier.grid
        ):
            block = source if isinstance(source, CachedBlock) else self._transient(source)
            origin = self._origin(f"compressor:{tier.name}", "compressor", tier.compressor)
            ckv = origin.call(source.block_id, tier.compressor.compress, block, self.model)
            self._check_compressed(origin, ckv, tier, block, committing)
            put = Put(tier.store, ckv.keys, ckv.values, latents)
            put.record = dict(
                fidelity=tier.compressor.name,
                grid=tuple(ckv.grid),
                position=float(ckv.position),
                temporal_stride=float(ckv.temporal_stride),
                hw_stride=float(ckv.hw_stride),
            )
        elif isinstance(source, CachedBlock):
            put = Put(tier.store, source.keys, source.values, latents)
            put.record = dict(
                fidelity=source.fidelity,
                grid=source.grid,
                position=source.position,
                temporal_stride=source.temporal_stride,
                hw_stride=source.hw_stride,
            )
        else:
            put = Put(tier.store, list(source.keys), list(source.values), latents)
            put.record = dict(
                fidelity=FULL,
                grid=source.grid,
                position=source.position,
                temporal_stride=float(self.geometry.patch[0]),
                hw_stride=1.0,
            )
        put.record.update(
            block_id=source.block_id,
            start_frame=source.start_frame,
            num_frames=source.num_frames,
            condition=source.condition,
        )
        put.check()
        return put

    def _check_compressed(self, origin: Origin, ckv: Any, tier: Tier, block: CachedBlock, committing: int) -> None:
        """A compressor's output against what the tier stores: grid, layers, batch, dtype,
        device and the positions it reports, now; its finiteness held with block
        ``committing``'s checks (one host read for the whole commit, see :meth:`commit`)."""
        g = self.geometry
        if not isinstance(ckv, CompressedKV):
            raise origin.error(f"returned a {type(ckv).__name__}, expected a CompressedKV", block.block_id)
        if tuple(ckv.grid) != tuple(tier.grid):
            raise origin.error(f"produced grid {tuple(ckv.grid)}, planned {tier.grid}", block.block_id)
        like = block.keys[0]
        t, h, w = tier.grid

        def problem_of(finite: bool) -> str | None:
            return kv_problem(
                ckv.keys,
                ckv.values,
                num_layers=g.num_layers,
                shape=(like.shape[0], t * h * w, g.num_heads, g.head_dim),
                dtype=like.dtype,
                device=like.device,
                finite=finite,
            )

        problem = (
            problem_of(finite=False)
            or number_problem("position", ckv.position)
            or number_problem("temporal_stride", ckv.temporal_stride, positive=True)
            or number_problem("hw_stride", ckv.hw_stride, positive=True)
        )
        if problem:
            raise origin.error(f"tier {tier.name!r}: {problem}", block.block_id)

        def explain() -> None:
            if problem := problem_of(finite=True):
                raise origin.error(f"tier {tier.name!r}: {problem}", block.block_id)

        tensors = [x for x in (*ckv.keys, *ckv.values) if x.is_floating_point()]
        if tensors:
            self._checks.add(committing, all_finite(tensors), explain)

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

    def _archive_store_for(self, block: CachedBlock) -> TierStore:
        """The archive store ``block`` goes to (a new one if the archive is empty and sized
        for other blocks); not installed until the commit is applied."""
        current = self._archive_store
        if current is not None and current.slot_tokens == block.num_tokens:
            return current
        if current is not None and current.live_blocks:
            raise RuntimeError("archive holds blocks of another size")
        return self.new_archive_store(block.num_tokens, block.keys[0].device)

    def new_archive_store(self, slot_tokens: int, cache_device: torch.device) -> TierStore:
        """The archive's store for blocks of ``slot_tokens`` (pages are allocated on first use)."""
        g = self.geometry
        device, pinned = archive_placement(self.params.archive_device, cache_device)
        return TierStore(
            name=ARCHIVE,
            slot_tokens=slot_tokens,
            num_layers=g.num_layers,
            num_heads=g.num_heads,
            head_dim=g.head_dim,
            capacity=None,
            page_blocks=self.params.page_blocks,
            device=device,
            pin_memory=pinned,
        )

    def commit(self, commit: BlockCommit) -> None:
        """Admit a block, atomically: every plugin call and check runs first, and every page the
        moves need is allocated; only then are blocks moved. A failure (a compressor raising or
        returning something wrong, an allocation) leaves the cache exactly as it was.

        The checks left on the device — the block's passes, the finiteness of its K/V and of
        the compressors' output — are read together, in one host read, after the compressors
        ran and before anything moves. Their errors come in that order, and before any error
        the preparation raised (which is then their context)."""
        if commit.grid != self.geometry.block_grid:
            raise ValueError(f"commit grid {commit.grid} differs from the geometry's {self.geometry.block_grid}")
        if commit.block_id <= self._last_block_id:
            raise ValueError(f"block {commit.block_id} committed after block {self._last_block_id}")
        self._hold_finite(commit.block_id, commit.keys, commit.values)
        try:
            steps, archive_store, layout = self._prepare_commit(commit)
        except Exception:
            self.settle()  # an earlier bad check is the cause: raised first, this error its context
            raise
        self.settle()
        bound = self.params.archive_max_blocks
        incoming = sum(1 for step in steps if step.move.dst == ARCHIVE)
        evict = max(0, len(self._archive) + incoming - bound) if bound is not None else 0
        releases = {id(archive_store): evict} if evict else {}
        self._reserve(steps, releases)
        self._apply_commit(commit, steps, archive_store, layout, evict)

    def _prepare_commit(self, commit: BlockCommit) -> tuple[list[Step], TierStore | None, TierLayout]:
        """The moves of admitting ``commit``, each with what it stores prepared (compressed,
        checked), the archive store they go to, and the layout after them; nothing changed."""
        layout = self.layout.copy()
        steps: list[Step] = []
        popped = [0] * len(self._tiers)
        archive_store = self._archive_store
        for move in layout.commit(commit.block_id):
            if move.src is None:
                tier = self._tiers[move.tier]
                steps.append(Step(move, None, None, self._prepare_block(tier, commit, commit.block_id)))
                continue
            src = self._tiers[move.src]
            block = src.blocks[popped[move.src]]
            popped[move.src] += 1
            assert block.block_id == move.block_id
            put = None
            if move.dst == ARCHIVE and self.params.archive_max_blocks == 0:
                move = attrs.evolve(move, dst=DROP)  # a bound of 0: nothing is kept
            if move.dst == ARCHIVE:
                archive_store = self._archive_store_for(block)
                put = Put(archive_store, block.keys, block.values, None)
                put.record = {f.name: getattr(block, f.name) for f in attrs.fields(CachedBlock) if f.name != "slot"}
                put.check()
            elif move.dst != DROP:
                put = self._prepare_block(self._tiers[move.tier], block, commit.block_id)
            steps.append(Step(move, src, block, put))
        return steps, archive_store, layout

    def _apply_commit(
        self, commit: BlockCommit, steps: list[Step], archive_store: TierStore | None, layout: TierLayout, evict: int
    ) -> None:
        """Apply :meth:`_prepare_commit`'s moves, ``evict`` oldest archived blocks dropped first
        (nothing here can fail)."""
        for _ in range(evict):  # the archive is full: its oldest blocks are dropped
            old = self._archive.popleft()
            assert self._archive_store is not None
            self._archive_store.release(_slot_of(old))
            self._dropped.add(old.block_id)
            del self._where[old.block_id]
        if archive_store is not self._archive_store:
            self._archive_store = archive_store
        for step in steps:
            move = step.move
            stored = step.put.apply() if step.put is not None else None
            if step.src is not None:
                assert step.src.store is not None and step.block is not None
                step.src.blocks.popleft()
                step.src.store.release(_slot_of(step.block))
            if move.dst == DROP:
                self._dropped.add(move.block_id)
                self._where.pop(move.block_id, None)
            else:
                assert stored is not None, f"block {move.block_id} goes to {move.dst!r} with nothing to store"
                if move.dst == ARCHIVE:
                    self._archive.append(stored)
                else:
                    self._tiers[move.tier].blocks.append(stored)
                self._where[move.block_id] = move.dst
        self.layout.members = layout.members
        self._last_block_id = commit.block_id

    def full_resolution_blocks(self) -> list[CachedBlock]:
        """Blocks stored at full fidelity, oldest first: the sink's and recent's, and those of any
        tier without a compressor, but not the compressed blocks such a tier may have received
        from a compressed newer tier."""
        held = [b for t in self._tiers for b in t.blocks if b.fidelity == FULL]
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
        """Overwrite the per-layer K/V ``[B, N, H, D]`` of full-fidelity block ``block_id`` in
        place. They are checked as a commit's are (layers, shape, dtype, device, finite) before
        anything is written: ``ValueError`` (:class:`~packforcing.core.store.NonFiniteError`)
        and the cache unchanged otherwise."""
        where = self._located(block_id)
        tier = self._tiers[where] if isinstance(where, int) else None
        if tier is None:
            raise ValueError(f"block {block_id} is not held at full resolution (it is in {where or 'no tier'})")
        i = next(i for i, b in enumerate(tier.blocks) if b.block_id == block_id)
        block = tier.blocks[i]
        if block.fidelity != FULL:
            raise ValueError(
                f"block {block_id} is not held at full resolution (it is {block.fidelity} in tier {tier.name!r})"
            )
        like = block.keys[0]
        problem = kv_problem(
            keys,
            values,
            num_layers=block.num_layers,
            shape=tuple(like.shape),
            dtype=like.dtype,
            device=like.device,
            finite=False,
        )
        if problem:
            self.settle()  # a bad pass that came first is raised instead
            raise ValueError(f"block {block_id}: the new K/V do not fit the cached block: {problem}")
        self._hold_finite(block_id, keys, values)
        self.settle()
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):  # checked first
            k_slot, v_slot = block.layer_kv(layer)
            k_slot.copy_(k)
            v_slot.copy_(v)
        tier.blocks[i] = attrs.evolve(block, position=position, condition=condition)

    @staticmethod
    def _reserve(steps: Sequence[Step], releases: Mapping[int, int] | None = None) -> None:
        """Allocate the pages every store needs after the moves (releases come before puts in a
        tier; ``releases``: more slots freed first, by store id); if one allocation fails, the
        others are given back."""
        change: dict[int, list[Any]] = {}
        for step in steps:
            if step.put is not None:
                entry = change.setdefault(id(step.put.store), [step.put.store, 0, step.put])
                entry[1] += 1
            if step.src is not None:
                assert step.src.store is not None
                entry = change.setdefault(id(step.src.store), [step.src.store, 0, None])
                entry[1] -= 1
        for key, count in (releases or {}).items():
            if key in change:
                change[key][1] -= count
        done: list[Reservation] = []
        try:
            for store, delta, put in change.values():
                if put is not None and delta > 0:
                    done.append(store.reserve(store.live_blocks + delta, put.keys, put.latents))
        except BaseException:
            for reservation in reversed(done):
                reservation.undo()
            raise

    # ------------------------------------------------------------------ attention
    def settle(self) -> None:
        """Read the device-side checks of the current block's passes (one host read for all of
        them) and raise the first bad one's :class:`~packforcing.core.errors.PluginError`."""
        self._checks.settle()

    def _hold_finite(self, block_id: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Hold the finiteness of K/V about to be stored for ``block_id`` with its checks, read
        when it settles (its :class:`~packforcing.core.store.NonFiniteError` comes after any
        error of the block's passes)."""
        tensors = [*keys, *values]
        if tensors:
            where = f"block {block_id}"
            self._checks.add(block_id, all_finite(tensors), lambda: check_finite(keys, values, where))

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
            origins=(
                self._origin("selector", "selector", self.selector),
                self._origin("realigner", "realigner", self.realigner),
                self._origin("backend", "backend", self.backend),
            ),
            checks=self._checks,
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

    def plan(self, num_blocks: int, batch_size: int = 1) -> MemoryPlan:
        """Peak blocks, tokens and bytes per tier over ``num_blocks`` commits (see
        :func:`packforcing.policies.planner.plan_tiers`): the same layout the live cache runs, and
        the bytes of the very stores that hold the tiers."""
        return plan_tiers(self, num_blocks, batch_size)
