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

from packforcing.core.boundary import Origin, kv_problem, number_problem, selection_problem, tensor_problem
from packforcing.core.errors import ConfigError, ParamError
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
    CompressedKV,
    MemoryPlan,
    TierStats,
)
from packforcing.core.store import Reservation, TierStore, check_finite
from packforcing.core.transfer import to_device
from packforcing.core.validators import one_of, optional_non_negative, positive
from packforcing.policies.layout import ARCHIVE, DROP, TierLayout, TierSlotSpec

MAX_PLAN_BLOCKS = 10_000_000
"""Runs longer than this are refused (at 4 frames a block and 16 fps, 79 years of video)."""


def _fidelity(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return dict(value)
    raise ParamError("fidelity", f"expected 'full', 'compressed' or a compressor mapping with a name, got {value!r}")


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
            raise ParamError(f"tiers.{self.name}", "give frames or blocks, not both")
        if self.name == ARCHIVE:
            raise ParamError("tiers", "'archive' is reserved for overflow")

    def capacity(self, geometry: Geometry) -> int | None:
        """Capacity in blocks (whole blocks that fit in ``frames``)."""
        if self.frames is not None:
            if not self.pinned and 0 < self.frames < geometry.frames_per_block:
                raise ParamError(
                    f"tiers.{self.name}.frames",
                    f"{self.frames} frames is smaller than one block ({geometry.frames_per_block} frames)",
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
            raise ParamError(f"tiers[{i}]", f"expected a mapping, got {t!r}")
    names = [t.name for t in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ParamError("tiers", f"duplicate tier names {sorted(dup)}")
    return tuple(out)


def _archive_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise ParamError(attribute.name, f"expected auto, pinned, cpu or a device name, got {value!r}")
    if value not in ("auto", "pinned"):
        try:
            torch.device(value)
        except RuntimeError:
            raise ParamError(
                attribute.name, f"expected auto, pinned, cpu or a device name such as cuda:0, got {value!r}"
            ) from None


def archive_placement(setting: str, cache_device: torch.device) -> tuple[torch.device, bool]:
    """``(device, pinned)`` of the archive for ``archive_device: setting`` when the cache lives
    on ``cache_device``."""
    if setting == "auto":
        return (torch.device("cpu"), True) if cache_device.type == "cuda" else (cache_device, False)
    if setting == "pinned":
        return torch.device("cpu"), torch.cuda.is_available()
    return torch.device(setting), False


@attrs.frozen
class TieredParams:
    """Parameters of the ``tiered`` policy."""

    tiers: tuple[TierSpec, ...] = attrs.field(converter=_tiers)
    overflow: str = attrs.field(default=DROP, validator=one_of(ARCHIVE, DROP))
    archive_device: str = attrs.field(default="auto", validator=_archive_device)
    """Where archived blocks live: ``auto`` (pinned host memory when the cache is on CUDA, else
    beside the cache), ``pinned`` (pinned host memory), ``cpu``, or a torch device (``cuda:1``)."""
    archive_max_blocks: int | None = attrs.field(default=None, validator=optional_non_negative)
    """At most this many archived blocks (the oldest is dropped beyond it); ``None``: unbounded."""
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


class _Put:
    """A block checked and ready to be copied into ``store`` (phase two of a commit)."""

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
        self.store.check(self.keys, self.values, self.latents)

    def apply(self) -> CachedBlock:
        slot = self.store.put(self.keys, self.values, self.latents, checked=True)
        return CachedBlock(slot=slot, **self.record)


@attrs.frozen
class _Step:
    """One move of a commit with the block it moves and what will be stored where."""

    move: Any
    src: _Tier | None
    block: CachedBlock | None
    put: _Put | None


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
        """Which plugin each part is, for error messages: keys ``selector``, ``positional``,
        ``attention`` and ``compressor:<tier name>``."""
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
        self._tiers: list[_Tier] = []
        for spec in params.tiers:
            comp = None
            if spec.fidelity != FULL:
                if spec.name not in compressors:
                    raise ParamError(f"tiers.{spec.name}", f"fidelity {spec.fidelity!r} needs a compressor")
                comp = compressors[spec.name]
            if spec.select and selector is None:
                raise ParamError(f"tiers.{spec.name}", "select: true needs a selector")
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
            try:
                tier.grid = tier.compressor.output_grid(source) if tier.compressor else source
            except ConfigError as exc:  # a compressor parameter (e.g. a window larger than the block)
                path = self._compressor_paths.get(tier.name)
                raise exc.under(path) if path else exc from None
            needs_latents = tier.compressor is not None and tier.compressor.needs_latents
            if needs_latents and not tier.spec.pinned and i < n - 1:
                # blocks arrive from the next newer tier: it must keep their latents,
                # and only full-fidelity blocks carry them
                feeder = self._tiers[i + 1]
                if feeder.compressor is not None:
                    raise ParamError(
                        f"tiers.{tier.name}",
                        f"compressor {tier.compressor.name!r} needs latents, "
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

    @property
    def last_block_id(self) -> int:
        """The id of the last block committed (``-1`` for an empty cache)."""
        return self._last_block_id

    def _origin(self, key: str, kind: str, component: Any) -> Origin:
        return self.origins.get(key) or Origin.of(kind, component)

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
                raise ParamError(
                    "selector.k",
                    f"{k} is larger than the capacity of tier {tier.name!r} it selects from ({tier.capacity} blocks)",
                )

    def audit(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping disagrees with itself: each tier holds the
        layout's blocks in order, every store's live slots are exactly the slots its blocks hold
        (none leaked, none shared), and every block's location is where it is."""
        seen: set[int] = set()
        for i, (tier, members) in enumerate(zip(self._tiers, self.layout.members, strict=True)):
            ids = [b.block_id for b in tier.blocks]
            assert ids == list(members), f"tier {tier.name!r} holds {ids}, layout says {list(members)}"
            assert tier.store is not None
            slots = {(b.slot.page, b.slot.index) for b in tier.blocks}
            assert all(b.slot.live and b.slot._store is tier.store for b in tier.blocks), f"tier {tier.name!r}"
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
        for block_id in self._dropped:
            assert self._where.get(block_id) == DROP, f"block {block_id}: location {self._where.get(block_id)!r}"
        every = seen | set(archived) | set(self._dropped)
        assert len(every) == len(seen) + len(archived) + len(self._dropped), "a block is in two places"
        assert every == set(self._where), f"locations {sorted(self._where)} vs blocks held {sorted(every)}"

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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole cache as ``(tensors, meta)``: every tier's and the archive's blocks (K/V
        stacked per block ``[2, L, B, N, H, D]``, latents ``[B, C, F, H, W]`` where kept) and the
        JSON-able bookkeeping (block records, dropped ids, last block). Safe to write with
        safetensors + JSON; :meth:`load_state_dict` restores it bit for bit."""
        tensors: dict[str, torch.Tensor] = {}

        def records(prefix: str, blocks: Sequence[CachedBlock]) -> list[dict[str, Any]]:
            out = []
            for i, block in enumerate(blocks):
                key = f"{prefix}.{i}"
                tensors[f"{key}.kv"] = torch.stack([torch.stack(block.keys), torch.stack(block.values)]).contiguous()
                latents = block.latents
                if latents is not None:
                    tensors[f"{key}.latents"] = latents.contiguous()
                out.append(
                    {
                        "key": key,
                        "block_id": block.block_id,
                        "start_frame": block.start_frame,
                        "num_frames": block.num_frames,
                        "fidelity": block.fidelity,
                        "grid": list(block.grid),
                        "position": block.position,
                        "temporal_stride": block.temporal_stride,
                        "hw_stride": block.hw_stride,
                        "condition": block.condition,
                    }
                )
            return out

        meta = {
            "policy": self.name,
            "tiers": {t.name: records(f"tier.{t.name}", t.blocks) for t in self._tiers},
            "archive": records("archive", self._archive),
            "dropped": list(self._dropped),
            "last_block_id": self._last_block_id,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Replace the cache with a :meth:`state_dict` (checked against this policy's tiers and
        geometry first: on a mismatch ``ValueError`` and the cache is left as it was)."""
        names = [t.name for t in self._tiers]
        if meta.get("policy") != self.name or sorted(meta.get("tiers", {})) != sorted(names):
            raise ValueError(
                f"checkpoint: the cache was saved by policy {meta.get('policy')!r} with tiers "
                f"{sorted(meta.get('tiers', {}))}, this policy is {self.name!r} with tiers {sorted(names)}"
            )
        g = self.geometry

        def unpack(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor], Any]:
            kv = tensors.get(f"{record['key']}.kv")
            grid = tuple(int(x) for x in record["grid"])
            tokens = grid[0] * grid[1] * grid[2]
            if kv is None or kv.ndim != 6 or tuple(kv.shape[:2]) != (2, g.num_layers) or kv.shape[3] != tokens:
                raise ValueError(f"checkpoint: block {record.get('block_id')}: K/V missing or of the wrong shape")
            fields = {k: record[k] for k in ("block_id", "start_frame", "num_frames", "fidelity", "position")}
            fields.update(
                grid=grid,
                temporal_stride=float(record["temporal_stride"]),
                hw_stride=float(record["hw_stride"]),
                condition=record.get("condition"),
            )
            return fields, list(kv[0]), list(kv[1]), tensors.get(f"{record['key']}.latents")

        staged = {t.name: [unpack(r) for r in meta["tiers"][t.name]] for t in self._tiers}
        archived = [unpack(r) for r in meta.get("archive", [])]
        for tier in self._tiers:
            if tier.capacity is not None and len(staged[tier.name]) > tier.capacity:
                raise ValueError(f"checkpoint: tier {tier.name!r} holds more blocks than its capacity")
            for fields, _, _, latents in staged[tier.name]:
                if tuple(fields["grid"]) != tuple(tier.grid) or (tier.keep_latents and latents is None):
                    raise ValueError(f"checkpoint: block {fields['block_id']} does not fit tier {tier.name!r}")
        self.reset()
        for i, tier in enumerate(self._tiers):
            assert tier.store is not None
            for fields, keys, values, latents in staged[tier.name]:
                slot = tier.store.put(keys, values, latents if tier.keep_latents else None)
                tier.blocks.append(CachedBlock(slot=slot, **fields))
                self.layout.members[i].append(fields["block_id"])
                self._where[fields["block_id"]] = i
        for fields, keys, values, _ in archived:
            block_tokens = fields["grid"][0] * fields["grid"][1] * fields["grid"][2]
            if self._archive_store is None or self._archive_store.slot_tokens != block_tokens:
                self._archive_store = self._new_archive_store(block_tokens, keys[0].device)
            slot = self._archive_store.put(keys, values)
            self._archive.append(CachedBlock(slot=slot, **fields))
            self._where[fields["block_id"]] = ARCHIVE
        self._dropped = [int(b) for b in meta.get("dropped", [])]
        for block_id in self._dropped:
            self._where[block_id] = DROP
        self._last_block_id = int(meta.get("last_block_id", -1))

    # ------------------------------------------------------------------ commit
    def _prepare_block(self, tier: _Tier, source: BlockCommit | CachedBlock) -> _Put:
        """Everything that can fail about storing ``source`` in ``tier`` (compression, checks),
        without changing the cache."""
        assert tier.store is not None
        latents = source.latents if tier.keep_latents else None
        if tier.compressor is not None and not (
            isinstance(source, CachedBlock) and source.fidelity == tier.compressor.name and source.grid == tier.grid
        ):
            block = source if isinstance(source, CachedBlock) else self._transient(source)
            origin = self._origin(f"compressor:{tier.name}", "compressor", tier.compressor)
            ckv = origin.call(source.block_id, tier.compressor.compress, block, self.model)
            self._check_compressed(origin, ckv, tier, block)
            put = _Put(tier.store, ckv.keys, ckv.values, latents)
            put.record = dict(
                fidelity=tier.compressor.name,
                grid=tuple(ckv.grid),
                position=float(ckv.position),
                temporal_stride=float(ckv.temporal_stride),
                hw_stride=float(ckv.hw_stride),
            )
        elif isinstance(source, CachedBlock):
            put = _Put(tier.store, source.keys, source.values, latents)
            put.record = dict(
                fidelity=source.fidelity,
                grid=source.grid,
                position=source.position,
                temporal_stride=source.temporal_stride,
                hw_stride=source.hw_stride,
            )
        else:
            put = _Put(tier.store, list(source.keys), list(source.values), latents)
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

    def _check_compressed(self, origin: Origin, ckv: Any, tier: _Tier, block: CachedBlock) -> None:
        """A compressor's output against what the tier stores: grid, layers, batch, dtype,
        device, finiteness and the positions it reports."""
        g = self.geometry
        if not isinstance(ckv, CompressedKV):
            raise origin.error(f"returned a {type(ckv).__name__}, expected a CompressedKV", block.block_id)
        if tuple(ckv.grid) != tuple(tier.grid):
            raise origin.error(f"produced grid {tuple(ckv.grid)}, planned {tier.grid}", block.block_id)
        like = block.keys[0]
        t, h, w = tier.grid
        problem = (
            kv_problem(
                ckv.keys,
                ckv.values,
                num_layers=g.num_layers,
                shape=(like.shape[0], t * h * w, g.num_heads, g.head_dim),
                dtype=like.dtype,
                device=like.device,
            )
            or number_problem("position", ckv.position)
            or number_problem("temporal_stride", ckv.temporal_stride, positive=True)
            or number_problem("hw_stride", ckv.hw_stride, positive=True)
        )
        if problem:
            raise origin.error(f"tier {tier.name!r}: {problem}", block.block_id)

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
        return self._new_archive_store(block.num_tokens, block.keys[0].device)

    def _new_archive_store(self, slot_tokens: int, cache_device: torch.device) -> TierStore:
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
        returning something wrong, an allocation) leaves the cache exactly as it was."""
        if commit.grid != self.geometry.block_grid:
            raise ValueError(f"commit grid {commit.grid} differs from the geometry's {self.geometry.block_grid}")
        if commit.block_id <= self._last_block_id:
            raise ValueError(f"block {commit.block_id} committed after block {self._last_block_id}")
        check_finite(commit.keys, commit.values, f"block {commit.block_id}")
        layout = self.layout.copy()
        steps: list[_Step] = []
        popped = [0] * len(self._tiers)
        archive_store = self._archive_store
        for move in layout.commit(commit.block_id):
            if move.src is None:
                tier = self._tiers[move.dst]  # type: ignore[index]
                steps.append(_Step(move, None, None, self._prepare_block(tier, commit)))
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
                put = _Put(archive_store, block.keys, block.values, None)
                put.record = {f.name: getattr(block, f.name) for f in attrs.fields(CachedBlock) if f.name != "slot"}
                put.check()
            elif move.dst != DROP:
                put = self._prepare_block(self._tiers[move.dst], block)  # type: ignore[index]
            steps.append(_Step(move, src, block, put))
        bound = self.params.archive_max_blocks
        incoming = sum(1 for step in steps if step.move.dst == ARCHIVE)
        evict = max(0, len(self._archive) + incoming - bound) if bound is not None else 0
        releases = {id(archive_store): evict} if evict else {}
        self._reserve(steps, releases)
        # nothing below can fail: apply the moves
        for _ in range(evict):  # the archive is full: its oldest blocks are dropped
            old = self._archive.popleft()
            assert self._archive_store is not None
            self._archive_store.release(old.slot)
            self._dropped.append(old.block_id)
            self._where[old.block_id] = DROP
        if archive_store is not self._archive_store:
            self._archive_store = archive_store
        for step in steps:
            move = step.move
            stored = step.put.apply() if step.put is not None else None
            if step.src is not None:
                assert step.src.store is not None and step.block is not None
                step.src.blocks.popleft()
                step.src.store.release(step.block.slot)
            if move.dst == ARCHIVE:
                self._archive.append(stored)
            elif move.dst == DROP:
                self._dropped.append(move.block_id)
            else:
                self._tiers[move.dst].blocks.append(stored)  # type: ignore[index]
            self._where[move.block_id] = move.dst
        self.layout.members = layout.members
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

    @staticmethod
    def _reserve(steps: Sequence[_Step], releases: Mapping[int, int] | None = None) -> None:
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
                self._origin("positional", "positional", self.realigner),
                self._origin("attention", "attention", self.backend),
            ),
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
        if num_blocks > MAX_PLAN_BLOCKS:
            raise ParamError("run.blocks", f"{num_blocks} blocks is more than the {MAX_PLAN_BLOCKS} a run may plan")
        layout = TierLayout(self.layout.specs, self.layout.overflow)
        peak = [0] * len(self._tiers)
        archived = 0
        bound = self.params.archive_max_blocks
        context_tokens = 0
        for block_id in range(num_blocks):
            context_tokens = max(context_tokens, self._planned_context(layout))
            for move in layout.commit(block_id):
                if move.dst == ARCHIVE:
                    archived += 1
            if bound is not None:
                archived = min(archived, bound)
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
            archive_device=self.params.archive_device if self.params.overflow == ARCHIVE else None,
            archive_max_blocks=self.params.archive_max_blocks,
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


def _on_device(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 tensor on ``device``, copied without a host sync."""
    return to_device(torch.tensor(values, dtype=torch.float64), device)


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


@attrs.define
class _DeviceLayout:
    """What a context needs to gather on the device, made once per forward pass."""

    pieces: list[_Piece]
    moved_pieces: int
    """Leading pieces whose tokens may move (0: nothing moves)."""
    batch_rows: torch.Tensor
    """``[B, 1]`` batch indices (to gather each item's picks)."""


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
    cannot fault the gather, and read once, at the pass's last layer (which raises the same
    :class:`~packforcing.core.errors.PluginError`, naming the first bad layer). Otherwise picks
    and checks are read on the host at every layer.
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
    ) -> None:
        self._groups = groups
        self._query = query
        self._selector = selector
        self._realigner = realigner
        self._backend = backend
        self._rope = rope
        self._origins = origins or (
            Origin.of("selector", selector),
            Origin.of("positional", realigner),
            Origin.of("attention", backend),
        )
        self._shared: dict[int, torch.Tensor] = {}
        self._context_tokens = 0
        self._layout: _DeviceLayout | None = None
        self._pending: list[tuple[int, int | None, torch.Tensor, Any]] = []
        """Device-side checks not read yet: ``(layer, group or None for the output, ok flag, what)``."""
        self.selections: dict[tuple[int, int], torch.Tensor] = {}
        """(layer, group index) → ``[B, k']`` indices chosen by the selector (for inspection)."""
        # Query position depends on how many blocks enter, not on which: use the first k'.
        spans: list[tuple[float, float]] = []
        for blocks, select in groups:
            count = selector.budget(len(blocks)) if select and selector is not None else len(blocks)
            spans.extend((b.position, b.num_frames) for b in blocks[:count])
        self._targets, self._position = self._assign(spans)
        self._on_device = (realigner.targets_from_frames or not realigner.rotates) and all(
            len({(b.num_tokens, b.num_frames) for b in blocks}) == 1 for blocks, select in groups if select
        )
        self._last_layer = groups[0][0][0].num_layers - 1 if groups else -1

    @property
    def position(self) -> float:
        return self._position

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    def _assign(self, spans: list[tuple[float, float]]) -> tuple[list[float], float]:
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
                    budget=self._selector.budget(len(blocks)),
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
            budget = self._selector.budget(len(blocks))
            problem = selection_problem(
                idx, batch=q.shape[0], budget=budget, candidates=len(blocks), device=q.device, read=False
            )
            if problem:
                raise origin.error(f"layer {layer}: {problem}", self._query.block_id)
            if budget:
                ok = ((idx >= 0) & (idx < len(blocks))).all() & (idx[:, 1:] > idx[:, :-1]).all()
                self._pending.append((layer, g, ok, idx))
                idx = idx.clamp(0, len(blocks) - 1)
            if self._selector.shared_across_layers:
                self._shared[g] = idx
        self.selections[(layer, g)] = idx
        return idx

    def _device_layout(self, q: torch.Tensor) -> _DeviceLayout:
        """Pieces in packed order with their shifts on ``q``'s device: one asynchronous
        host-to-device copy per forward pass."""
        pieces: list[_Piece] = []
        parts: list[list[float] | None] = []
        """Per piece, what it needs on the device: per-token shifts of fixed blocks, or a group's
        candidates' homes followed by its picks' targets; ``None`` when the piece cannot move."""
        rotates = self._realigner.rotates
        targets = iter(self._targets)
        for g, (blocks, select) in enumerate(self._groups):
            if select:
                assert self._selector is not None
                count = self._selector.budget(len(blocks))
                picked = [float(next(targets)) for _ in range(count)]
                pieces.append(_Piece(blocks, g, count, blocks[0].num_tokens))
                parts.append([b.position for b in blocks] + picked if rotates and count else None)
            else:
                deltas = [float(next(targets)) - b.position for b in blocks]
                pieces.append(_Piece(blocks, count=len(blocks)))
                moves = rotates and any(d != 0 for d in deltas)
                per_token = [d for b, d in zip(blocks, deltas, strict=True) for _ in range(b.num_tokens)]
                parts.append(per_token if moves else None)
        moved = max((i + 1 for i, part in enumerate(parts) if part is not None), default=0)
        flat: list[float] = []
        for piece, part in zip(pieces[:moved], parts[:moved], strict=True):
            if part is None:  # inside the moved prefix but not moving itself: zero shifts
                part = [] if piece.group is not None else [0.0] * sum(b.num_tokens for b in piece.blocks)
            flat.extend(part)
        values = _on_device(flat, q.device) if flat else None
        offset = 0
        for piece in pieces[:moved]:
            assert values is not None
            if piece.group is None:
                n = sum(b.num_tokens for b in piece.blocks)
                piece.deltas = values[offset : offset + n]
                offset += n
            elif piece.count:
                c = len(piece.blocks)
                piece.deltas = values[offset : offset + c]
                piece.targets = values[offset + c : offset + c + piece.count]
                offset += c + piece.count
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        return _DeviceLayout(pieces, moved, rows)

    def _verify(self) -> None:
        """Read the pass's device-side checks (one host read); raise for the first bad one."""
        pending, self._pending = self._pending, []
        if not pending or bool(torch.stack([ok for _, _, ok, _ in pending]).all()):
            return
        block = self._query.block_id
        for layer, g, ok, what in pending:
            if bool(ok):
                continue
            if g is not None:
                problem = selection_problem(
                    what,
                    batch=what.shape[0],
                    budget=what.shape[1],
                    candidates=len(self._groups[g][0]),
                    device=what.device,
                )
                raise self._origins[0].error(f"layer {layer}: {problem}", block)
            if not bool(what):  # the keys the realigner gathered for that layer were non-finite
                raise self._origins[1].error(f"layer {layer}: gather() keys hold non-finite values (NaN/Inf)", block)
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
                for block in piece.blocks:
                    kb, vb = block.layer_kv(layer)
                    keys.append(kb)
                    values.append(vb)
                if i < layout.moved_pieces:
                    assert piece.deltas is not None
                    shifts.append(piece.deltas[None].expand(batch, -1))
                continue
            if piece.count == 0:
                continue
            idx = self._pick(layer, piece.group, q)  # [B, k]
            kv = [block.layer_kv(layer) for block in piece.blocks]
            stacked_k = torch.stack([kb for kb, _ in kv], dim=1)  # [B, C, n, H, D]
            stacked_v = torch.stack([vb for _, vb in kv], dim=1)
            keys.append(stacked_k[layout.batch_rows, idx].flatten(1, 2))  # [B, k·n, H, D]
            values.append(stacked_v[layout.batch_rows, idx].flatten(1, 2))
            if piece.targets is not None:
                assert piece.deltas is not None
                picked = piece.targets[None] - piece.deltas[idx]  # [B, k]: target − home of each pick
                shifts.append(picked[:, :, None].expand(-1, -1, piece.tokens).flatten(1, 2))
        deltas = torch.cat(shifts, dim=1) if shifts else None
        origin = self._origins[1]
        block = self._query.block_id
        gathered = origin.call(block, self._realigner.gather_shifted, keys, deltas, self._rope, k)
        shape = (k.shape[0], sum(x.shape[1] for x in keys) + k.shape[1], *k.shape[2:])
        problem = tensor_problem("gather_shifted() keys", gathered, shape, k.dtype, k.device, finite=False)
        if problem:
            raise origin.error(f"layer {layer}: {problem}", block)
        values_all = torch.cat([*values, v], dim=1)
        self._context_tokens = gathered.shape[1] - k.shape[1]
        backend = self._origins[2]
        out = backend.call(block, self._backend.attend, q, gathered, values_all)
        problem = tensor_problem("output", out, tuple(q.shape), q.dtype, q.device, finite=False)
        if problem:
            raise backend.error(f"layer {layer}: {problem}", block)
        if out.is_floating_point():
            # flags only (holding the tensors would keep every layer's context alive)
            self._pending.append((layer, None, torch.isfinite(out).all(), torch.isfinite(gathered).all()))
        if layer >= self._last_layer:
            self._verify()
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._groups:
            self._context_tokens = 0
            return self._attend(layer, q, k, v)
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
