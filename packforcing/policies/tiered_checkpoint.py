"""Checkpoints of the tiered policy: the whole cache as ``(tensors, meta)`` and back.

:func:`cache_state` writes every tier's and the archive's blocks with the slot each is stored in;
:func:`stage_cache` reads them back into new stores, checked against the policy's tiers and
geometry, without touching the live cache. :meth:`TieredPolicy.load_state_dict
<packforcing.policies.tiered.TieredPolicy.load_state_dict>` installs what it staged only once all
of it succeeded, so a bad checkpoint leaves the cache as it was.
"""

from __future__ import annotations

import reprlib
from collections import deque
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import TYPE_CHECKING, Any

import attrs
import torch

from packforcing.core.finite import cast_problem
from packforcing.core.geometry import Geometry
from packforcing.core.records import CachedBlock
from packforcing.core.store import NonFiniteError, Slot, TierStore
from packforcing.policies.layout import IdRuns

if TYPE_CHECKING:
    from packforcing.policies.tiered import TieredPolicy


@attrs.frozen(eq=False)
class LoadedCache:
    """A checkpoint put into new stores and checked, not yet installed: per tier (the policy's
    order) its store and blocks, the archive's store and blocks, the dropped ids (as runs: a few
    integers however many blocks were dropped) and the last block committed."""

    stores: list[TierStore]
    blocks: list[deque[CachedBlock]]
    archive_store: TierStore | None
    archive: deque[CachedBlock]
    dropped: IdRuns
    last_block_id: int


@attrs.frozen(eq=False)
class _Staged:
    """A checkpoint's block about to be loaded: its record's fields, per-layer keys and values
    ``[B, N, H, D]``, latents ``[B, C, F, H, W]`` (or ``None``) and saved ``(page, index)`` slot."""

    fields: dict[str, Any]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    latents: torch.Tensor | None
    at: tuple[int, int] | None
    tokens: int

    @property
    def block_id(self) -> int:
        return int(self.fields["block_id"])


def cache_state(policy: TieredPolicy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``policy``'s cache as ``(tensors, meta)``; see :meth:`TieredPolicy.state_dict
    <packforcing.policies.tiered.TieredPolicy.state_dict>` for the format."""
    tensors: dict[str, torch.Tensor] = {}

    def records(prefix: str, blocks: Sequence[CachedBlock]) -> list[dict[str, Any]]:
        out = []
        for i, block in enumerate(blocks):
            key = f"{prefix}.{i}"
            tensors[f"{key}.kv"] = torch.stack([torch.stack(block.keys), torch.stack(block.values)]).contiguous()
            latents = block.latents
            if latents is not None:  # a copy: the block's latents are a view of a slot a later block reuses
                tensors[f"{key}.latents"] = latents.clone(memory_format=torch.contiguous_format)
            record = {
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
            if isinstance(block.slot, Slot):
                record["slot"] = [block.slot.page, block.slot.index]
            out.append(record)
        return out

    def free(store: TierStore | None) -> list[list[int]]:
        return [list(at) for at in store.free_slots()] if store is not None else []

    tiers = policy.tiers
    archived = policy.archived
    meta = {
        "policy": policy.name,
        "tiers": {t.name: records(f"tier.{t.name}", t.blocks) for t in tiers},
        "archive": records("archive", archived),
        "free": {t.name: free(t.store) for t in tiers},
        "archive_free": free(policy.archive_store) if archived else [],
        # runs [start, stop) of consecutive ids: one run in any video, where a list of the ids
        # (what earlier versions saved, still read) grew by one per block dropped
        "dropped": [[start, stop] for start, stop in policy.dropped_runs],
        "last_block_id": policy.last_block_id,
    }
    return tensors, meta


def stage_cache(policy: TieredPolicy, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> LoadedCache:
    """A :func:`cache_state` loaded into new stores for ``policy``, every block checked on the way
    (see :meth:`TieredPolicy.load_state_dict <packforcing.policies.tiered.TieredPolicy.load_state_dict>`);
    ``policy`` is not changed. ``ValueError`` (:class:`~packforcing.core.store.NonFiniteError`) for
    a checkpoint that does not fit it."""
    tiers = policy.tiers
    names = [t.name for t in tiers]
    saved_tiers = meta.get("tiers")
    if (
        meta.get("policy") != policy.name
        or not isinstance(saved_tiers, Mapping)
        or sorted(saved_tiers) != sorted(names)
    ):
        raise ValueError(
            f"checkpoint: the cache was saved by policy {meta.get('policy')!r} with tiers "
            f"{sorted(saved_tiers) if isinstance(saved_tiers, Mapping) else saved_tiers!r}, "
            f"this policy is {policy.name!r} with tiers {sorted(names)}"
        )
    g = policy.geometry
    staged = {t.name: [_unpack(r, tensors, g) for r in saved_tiers[t.name]] for t in tiers}
    archived = [_unpack(r, tensors, g) for r in meta.get("archive", [])]
    dropped = _dropped_ids(meta.get("dropped", []))
    try:
        last = int(meta.get("last_block_id", -1))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint: malformed last block ({exc})") from None
    _check_staged(policy, staged, archived, dropped, last)
    free = meta.get("free")
    saved_free = free if isinstance(free, Mapping) else {}  # a checkpoint saved without slots has none
    stores: list[TierStore] = []
    held: list[deque[CachedBlock]] = []
    for tier in tiers:
        assert tier.store is not None
        store = tier.store.fresh()
        blocks = staged[tier.name]
        slots = _restore(store, blocks, saved_free.get(tier.name), latents=tier.keep_latents)
        stores.append(store)
        held.append(deque(CachedBlock(slot=slot, **b.fields) for b, slot in zip(blocks, slots, strict=True)))
    archive_store = None
    archive: deque[CachedBlock] = deque()
    if archived:
        tokens = {b.tokens for b in archived}
        if len(tokens) > 1:
            raise ValueError(f"checkpoint: the archive holds blocks of {sorted(tokens)} tokens (one size only)")
        archive_store = policy.new_archive_store(archived[0].tokens, archived[0].keys[0].device)
        slots = _restore(archive_store, archived, meta.get("archive_free"), latents=False)
        archive.extend(CachedBlock(slot=slot, **b.fields) for b, slot in zip(archived, slots, strict=True))
    return LoadedCache(
        stores=stores,
        blocks=held,
        archive_store=archive_store,
        archive=archive,
        dropped=dropped,
        last_block_id=last,
    )


def _unpack(record: Any, tensors: Mapping[str, torch.Tensor], g: Geometry) -> _Staged:
    """One saved block record and its tensors, checked against the geometry (its K/V's layers,
    tokens for its grid, heads and head size; latents its dtype can hold)."""
    try:
        key = str(record["key"])
        grid = tuple(int(x) for x in record["grid"])
        fields = {k: record[k] for k in ("block_id", "start_frame", "num_frames", "fidelity", "position")}
        fields.update(
            block_id=int(record["block_id"]),
            grid=grid,
            temporal_stride=float(record["temporal_stride"]),
            hw_stride=float(record["hw_stride"]),
            condition=record.get("condition"),
        )
        slot = record.get("slot")
        at = None if slot is None else (int(slot[0]), int(slot[1]))
        if len(grid) != 3 or (slot is not None and len(slot) != 2):
            raise ValueError("a grid of 3 sizes and a slot of 2 numbers")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"checkpoint: a malformed block record ({type(exc).__name__}: {exc})") from None
    kv = tensors.get(f"{key}.kv")
    tokens = grid[0] * grid[1] * grid[2]
    expected = f"[2, {g.num_layers}, B, {tokens}, {g.num_heads}, {g.head_dim}]"
    if not isinstance(kv, torch.Tensor):
        raise ValueError(f"checkpoint: block {fields['block_id']}: K/V missing")
    if (
        kv.ndim != 6
        or tuple(kv.shape[:2]) != (2, g.num_layers)
        or tuple(kv.shape[3:]) != (tokens, g.num_heads, g.head_dim)
    ):
        raise ValueError(f"checkpoint: block {fields['block_id']}: K/V {tuple(kv.shape)}, expected {expected}")
    latents = tensors.get(f"{key}.latents")
    # latents are copied into the cache's pages, of the geometry's dtype: their values must fit it
    # (no dtype to run in is suggested: a run resumes in the dtype it was saved from)
    problem = cast_problem([(f"{key}.latents", latents)], g.torch_dtype, suggest=False) if latents is not None else None
    if problem is not None:
        raise ValueError(f"checkpoint: {problem}")
    return _Staged(fields, list(kv[0]), list(kv[1]), latents, at, tokens)


def _is_id(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _dropped_ids(saved: Any) -> IdRuns:
    """A checkpoint's ``"dropped"``: runs ``[start, stop)`` of consecutive ids, sorted, disjoint
    and none empty (``[[1, 38]]``), or the form earlier versions saved, a list of the ids
    (``[1, 2, ..., 37]``), each once. A one-line ``ValueError`` naming what is malformed."""
    problem = "checkpoint: malformed dropped blocks:"
    if not isinstance(saved, (list, tuple)):
        raise ValueError(f"{problem} {reprlib.repr(saved)} is not a list of runs [start, stop)")
    ids = [i for i, entry in enumerate(saved) if _is_id(entry)]
    if ids and len(ids) < len(saved):  # one form or the other (an empty list is both)
        other = next(i for i, entry in enumerate(saved) if not _is_id(entry))
        raise ValueError(
            f"{problem} a list of block ids (entry {ids[0]}: {saved[ids[0]]!r}) and of runs [start, stop) "
            f"(entry {other}: {reprlib.repr(saved[other])}) at once"
        )
    if ids:  # the earlier form: one id per block dropped
        seen: set[int] = set()
        for block_id in map(int, saved):
            if block_id < 0 or block_id in seen:
                raise ValueError(f"{problem} block id {block_id} is {'negative' if block_id < 0 else 'listed twice'}")
            seen.add(block_id)
        return IdRuns(sorted(seen))
    runs: list[tuple[int, int]] = []
    for i, run in enumerate(saved):
        if not (isinstance(run, (list, tuple)) and len(run) == 2 and all(_is_id(x) for x in run)):
            raise ValueError(f"{problem} entry {i} {reprlib.repr(run)} is not a run [start, stop) of two ints")
        start, stop = int(run[0]), int(run[1])
        if not 0 <= start < stop:
            raise ValueError(f"{problem} run {i} [{start}, {stop}) is empty or starts below 0")
        if runs and start < runs[-1][1]:
            raise ValueError(
                f"{problem} run {i} [{start}, {stop}) overlaps or comes before run {i - 1} "
                f"[{runs[-1][0]}, {runs[-1][1]}) (runs are sorted and disjoint)"
            )
        runs.append((start, stop))
    return IdRuns.from_runs(runs)


def _check_staged(
    policy: TieredPolicy,
    staged: Mapping[str, list[_Staged]],
    archived: list[_Staged],
    dropped: IdRuns,
    last: int,
) -> None:
    """What no single store can see: every block fits its tier, the whole cache has one batch
    size and the geometry's dtype, and no block id is held twice, held and dropped, nor after
    the last block."""
    every = [block for blocks in (*staged.values(), archived) for block in blocks]
    for tier in policy.tiers:
        if tier.capacity is not None and len(staged[tier.name]) > tier.capacity:
            raise ValueError(f"checkpoint: tier {tier.name!r} holds more blocks than its capacity")
        for block in staged[tier.name]:
            if tuple(block.fields["grid"]) != tuple(tier.grid) or (tier.keep_latents and block.latents is None):
                raise ValueError(f"checkpoint: block {block.block_id} does not fit tier {tier.name!r}")
    dtype = policy.geometry.torch_dtype  # what the plan counts bytes of
    batch = every[0].keys[0].shape[0] if every else 0
    for block in every:
        k = block.keys[0]
        if k.dtype != dtype:
            raise ValueError(f"checkpoint: block {block.block_id}: K/V are {k.dtype}, the cache holds {dtype}")
        if k.shape[0] != batch:
            raise ValueError(
                f"checkpoint: block {block.block_id}: K/V of batch {k.shape[0]}, "
                f"block {every[0].block_id}'s of batch {batch}"
            )
    for blocks in (*staged.values(), archived):
        ids = [b.block_id for b in blocks]
        if ids != sorted(set(ids)):
            raise ValueError(f"checkpoint: block ids {ids} held by one tier are not in time order")
    ids = [b.block_id for b in every]
    if len(set(ids)) != len(ids) or (ids and max(ids) > last):
        raise ValueError(f"checkpoint: block ids {sorted(ids)} repeat or come after the last block {last}")
    runs = dropped.runs  # checked against the held ids without listing the dropped ones
    if runs and runs[-1][1] - 1 > last:
        start, stop = runs[-1]
        raise ValueError(f"checkpoint: dropped blocks [{start}, {stop}) come after the last block {last}")
    both = sorted(b for b in ids if b in dropped)
    if both:
        raise ValueError(f"checkpoint: blocks {both} are both held and dropped")


def _restore(store: TierStore, blocks: list[_Staged], free: Any, *, latents: bool) -> list[Slot]:
    """``blocks`` put into the new, empty ``store`` at their saved slots (in time order for a
    checkpoint without them), its free slots in their saved order."""
    placements = [b.at for b in blocks if b.at is not None]
    if placements and len(placements) < len(blocks):
        raise ValueError(f"checkpoint: tier {store.name!r}: some blocks have a saved slot, some not")
    try:
        order = None if free is None else [(int(p), int(i)) for p, i in free]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint: tier {store.name!r}: malformed free slots ({exc})") from None
    entries = [(b.keys, b.values, b.latents if latents else None) for b in blocks]
    try:
        return store.restore(entries, placements or None, order)
    except NonFiniteError as exc:
        raise NonFiniteError(f"checkpoint: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"checkpoint: {exc}") from None
