"""Paged K/V storage for one tier of the cache.

A tier stores fixed-size slots (one block each, ``slot_tokens`` tokens). Slots live in pages
of ``page_blocks`` slots allocated on demand, each page one tensor
``[2, L, B, P, N, H, D]`` (K and V for every layer), plus an optional latent page
``[B, P, C, F, H, W]`` when a downstream compressor needs the clean latents. Freed slots are
reused, so a bounded tier plateaus at ``ceil(capacity / page) * page`` slots and never copies
or concatenates existing entries. Dtype, device and batch size come lazily from the first
block written.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

from packforcing.core.finite import all_finite


class NonFiniteError(ValueError):
    """Raised when a block with NaN/Inf keys or values is offered to the cache."""


def check_finite(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` if any layer's keys or values hold NaN or Inf.

    One host read for all layers (each read waits for an accelerator); the layers are looked at
    one by one only to name the bad one."""
    pairs = list(zip(keys, values, strict=True))
    if pairs and bool(all_finite([t for pair in pairs for t in pair])):
        return
    for layer, (k, v) in enumerate(pairs):
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise NonFiniteError(f"{where}, layer {layer}: refusing non-finite keys/values")


class Slot:
    """Handle to one block's K/V inside a :class:`TierStore` page."""

    __slots__ = ("__weakref__", "_spans", "_store", "_views", "index", "live", "page")

    def __init__(self, store: TierStore, page: int, index: int) -> None:
        self._store = store
        self.page = page
        self.index = index
        self.live = True
        self._views: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * store.num_layers
        """Per-layer ``(K, V)`` views, made on first read: a context reads every layer of every
        block in each of a block's forward passes, and making the views costs more host time
        than the copy they feed."""
        self._spans: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """``(layer, count)`` → the :meth:`span_kv` views, made on first read (as ``_views``)."""

    @property
    def num_layers(self) -> int:
        return self._store.num_layers

    @property
    def store(self) -> TierStore:
        """The store whose page holds this slot."""
        return self._store

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` views ``[B, N, H, D]`` of ``layer``."""
        if not self.live:
            raise RuntimeError("slot was released")
        views = self._views[layer]
        if views is None:
            page = self._store.pages[self.page]
            views = self._views[layer] = (page[0, layer, :, self.index], page[1, layer, :, self.index])
        return views

    def span_kv(self, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` views ``[B, count·N, H, D]`` of ``layer`` over this slot and the ``count − 1``
        slots after it in its page (a run of adjacent slots: see :func:`adjacent_runs`)."""
        if not self.live:
            raise RuntimeError("slot was released")
        views = self._spans.get((layer, count))
        if views is None:
            if not 0 < count <= self._store.page_blocks - self.index:
                raise ValueError(f"slot {self.index} of a {self._store.page_blocks}-slot page has no run of {count}")
            page = self._store.pages[self.page]
            stop = self.index + count
            k, v = page[0, layer, :, self.index : stop], page[1, layer, :, self.index : stop]
            views = k.flatten(1, 2), v.flatten(1, 2)
            self._spans[(layer, count)] = views
        return views

    def forget_views(self) -> None:
        """Drop the memoised views (they would keep a freed page's memory alive)."""
        self._views = [None] * len(self._views)
        self._spans = {}

    def latents(self) -> torch.Tensor | None:
        if not self.live:
            raise RuntimeError("slot was released")
        if not self._store.keep_latents:
            return None
        return self._store.latent_pages[self.page][:, self.index]


def adjacent_runs(slots: Sequence[Slot]) -> list[tuple[Slot, int]]:
    """``slots`` as runs of adjacent slots of one page: ``(first slot, count)``, each a single
    ``[B, count·N, H, D]`` view per layer (:meth:`Slot.span_kv`). Runs follow the pages' order,
    not the order given: for attention without a mask, the order of the keys does not matter."""
    stores: dict[int, int] = {}  # each store's rank by first appearance (a stable order)
    for slot in slots:
        stores.setdefault(id(slot.store), len(stores))
    ordered = sorted(slots, key=lambda s: (stores[id(s.store)], s.page, s.index))
    runs: list[tuple[Slot, int]] = []
    for slot in ordered:
        if runs:
            first, count = runs[-1]
            if first.store is slot.store and first.page == slot.page and first.index + count == slot.index:
                runs[-1] = (first, count + 1)
                continue
        runs.append((slot, 1))
    return runs


class TierStore:
    """Paged slots of ``slot_tokens`` tokens for every layer.

    ``capacity`` bounds the number of live slots (``None``: unbounded, grows page by page).
    """

    def __init__(
        self,
        *,
        name: str,
        slot_tokens: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        capacity: int | None,
        page_blocks: int = 4,
        keep_latents: bool = False,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
    ) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"tier {name!r}: capacity must be >= 0")
        self.name = name
        self.slot_tokens = slot_tokens
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self.page_blocks = max(1, min(page_blocks, capacity) if capacity else page_blocks)
        self.keep_latents = keep_latents
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = pin_memory
        """Pages in page-locked host memory (fast, asynchronous copies to and from CUDA)."""
        self.pages: list[torch.Tensor] = []
        self.latent_pages: list[torch.Tensor] = []
        self._free: list[tuple[int, int]] = []
        self._slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        """Live slots handed out (so :meth:`clear` can drop their memoised views)."""
        self._live = 0
        self._batch: int | None = None
        self._dtype: torch.dtype | None = None
        self._latent_shape: tuple[int, ...] | None = None

    def fresh(self) -> TierStore:
        """A new, empty store made like this one (name, slot size, geometry, capacity, page
        size, latents, device, pinning): what :meth:`restore` fills before it replaces this one."""
        return TierStore(
            name=self.name,
            slot_tokens=self.slot_tokens,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            capacity=self.capacity,
            page_blocks=self.page_blocks,
            keep_latents=self.keep_latents,
            device=self.device,
            pin_memory=self.pin_memory,
        )

    # ------------------------------------------------------------------ sizing
    @staticmethod
    def planned_slots(live: int, page_blocks: int, capacity: int | None) -> int:
        """Slots a store of ``capacity`` (``None``: unbounded) allocates to hold ``live`` blocks."""
        if live <= 0:
            return 0
        page = max(1, min(page_blocks, capacity) if capacity else page_blocks)
        return math.ceil(live / page) * page

    @property
    def live_blocks(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this store holds (allocated pages, used or not)."""
        return sum(p.nbytes for p in self.pages) + sum(p.nbytes for p in self.latent_pages)

    # ------------------------------------------------------------------ writes
    def _init_from(self, keys: Sequence[torch.Tensor], latents: torch.Tensor | None) -> None:
        self._batch = keys[0].shape[0]
        self._dtype = keys[0].dtype
        if self.device is None:
            self.device = keys[0].device
        if self.keep_latents:
            if latents is None:
                raise ValueError(f"tier {self.name!r} keeps latents but none were given")
            self._latent_shape = tuple(latents.shape[1:])

    def page_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of one K/V page, ``[2, L, B, P, N, H, D]``."""
        return (2, self.num_layers, batch, self.page_blocks, self.slot_tokens, self.num_heads, self.head_dim)

    def latent_page_shape(self, batch: int, latent_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one latent page, ``[B, P, C, F, H, W]`` for one block's latents ``[C, F, H, W]``."""
        return (batch, self.page_blocks, *latent_shape)

    def planned_nbytes(self, live: int, batch: int, itemsize: int, latent_shape: Sequence[int] | None = None) -> int:
        """Bytes this store holds with ``live`` blocks of ``batch`` items, without allocating: the
        pages :meth:`put` allocates (the same page shapes), ``itemsize`` bytes per element, plus the
        latent pages when the store keeps latents (``latent_shape``: one block's ``[C, F, H, W]``)."""
        pages = self.planned_slots(live, self.page_blocks, self.capacity) // self.page_blocks
        nbytes = pages * math.prod(self.page_shape(batch)) * itemsize
        if self.keep_latents and latent_shape is not None:
            nbytes += pages * math.prod(self.latent_page_shape(batch, latent_shape)) * itemsize
        return nbytes

    def _new_page(self) -> None:
        """Append one page (K/V, and latents if kept); on an allocation failure nothing is added."""
        assert self._batch is not None and self._dtype is not None
        shape = self.page_shape(self._batch)
        page_kv = torch.empty(shape, dtype=self._dtype, device=self.device, pin_memory=self.pin_memory)
        page_latents = None
        if self.keep_latents:
            assert self._latent_shape is not None
            page_latents = torch.empty(
                self.latent_page_shape(self._batch, self._latent_shape), dtype=self._dtype, device=self.device
            )
        self.pages.append(page_kv)
        if page_latents is not None:
            self.latent_pages.append(page_latents)
        page = len(self.pages) - 1
        # LIFO free list: lowest index first
        self._free.extend((page, i) for i in reversed(range(self.page_blocks)))

    def check(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        latents: torch.Tensor | None = None,
        *,
        finite: bool = True,
    ) -> None:
        """Raise (``ValueError``, :class:`NonFiniteError`) if :meth:`put` would refuse the block;
        changes nothing. ``finite=False`` skips the finiteness check (a pass over every layer
        and a host read) for K/V the caller has already checked or that come from a store."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"tier {self.name!r}: expected {self.num_layers} layers, got {len(keys)}")
        expected = (self.slot_tokens, self.num_heads, self.head_dim)
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            if tuple(k.shape[1:]) != expected or k.shape != v.shape:
                raise ValueError(
                    f"tier {self.name!r}, layer {layer}: expected K/V [B, {expected[0]}, {expected[1]}, "
                    f"{expected[2]}], got {tuple(k.shape)} / {tuple(v.shape)}"
                )
            if self._dtype is not None and (k.dtype != self._dtype or v.dtype != self._dtype):
                raise ValueError(f"tier {self.name!r}, layer {layer}: dtype {k.dtype}/{v.dtype}, holds {self._dtype}")
        if finite:
            check_finite(keys, values, f"tier {self.name!r}")
        if self._batch is not None and keys[0].shape[0] != self._batch:
            raise ValueError(f"tier {self.name!r}: batch size changed from {self._batch} to {keys[0].shape[0]}")
        if self.keep_latents:
            if latents is None:
                raise ValueError(f"tier {self.name!r} keeps latents but none were given")
            if latents.ndim < 1 or latents.shape[0] != keys[0].shape[0]:
                raise ValueError(
                    f"tier {self.name!r}: latents {tuple(latents.shape)} for K/V of batch {keys[0].shape[0]}"
                )
            if self._latent_shape is not None and tuple(latents.shape[1:]) != self._latent_shape:
                raise ValueError(
                    f"tier {self.name!r}: latents {tuple(latents.shape)}, expected [B, *{self._latent_shape}]"
                )

    @property
    def allocated_slots(self) -> int:
        return len(self.pages) * self.page_blocks

    def reserve(self, live: int, keys: Sequence[torch.Tensor], latents: torch.Tensor | None = None) -> Reservation:
        """Allocate pages now so that ``live`` blocks fit (``keys``/``latents`` of one block give the
        dtype, device and batch of a fresh store). Undo it with :meth:`Reservation.undo`; if the
        allocation fails, nothing is left allocated."""
        reservation = Reservation(self, 0, self._batch is None, self.device)
        try:
            if self.allocated_slots < live and self._batch is None:
                self._init_from(keys, latents)
            while self.allocated_slots < live:
                self._new_page()
                reservation.pages += 1
        except BaseException:
            reservation.undo()
            raise
        return reservation

    def put(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        latents: torch.Tensor | None = None,
        *,
        checked: bool = False,
        at: tuple[int, int] | None = None,
    ) -> Slot:
        """Copy per-layer ``keys``/``values`` ``[B, N, H, D]`` into a free slot (``checked``: the
        caller already ran :meth:`check` on them). ``at``: the ``(page, index)`` of the free slot
        to take, in a page already allocated (:meth:`restore` places a checkpoint's blocks so);
        default: the next free slot, a new page if none is free."""
        if not checked:
            self.check(keys, values, latents)
        if self.capacity is not None and self._live >= self.capacity:
            raise RuntimeError(f"tier {self.name!r} is full ({self.capacity} blocks)")
        if at is not None:
            if at not in self._free:
                raise ValueError(f"tier {self.name!r}: slot {at} is not a free slot of an allocated page")
            self._free.remove(at)
            page, index = at
        else:
            if self._batch is None:
                self._init_from(keys, latents)
            if not self._free:
                self._new_page()
            page, index = self._free.pop()
        buf = self.pages[page]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            buf[0, layer, :, index].copy_(k)
            buf[1, layer, :, index].copy_(v)
        if self.keep_latents:
            assert latents is not None
            self.latent_pages[page][:, index].copy_(latents)
        self._live += 1
        slot = Slot(self, page, index)
        self._slots.add(slot)
        return slot

    def free_slots(self) -> list[tuple[int, int]]:
        """The free slots ``(page, index)`` in the order :meth:`put` takes them (last first)."""
        return list(self._free)

    def restore(
        self,
        blocks: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor | None]],
        placements: Sequence[tuple[int, int]] | None = None,
        free: Sequence[tuple[int, int]] | None = None,
    ) -> list[Slot]:
        """Fill this empty store with ``blocks`` (per-layer keys and values ``[B, N, H, D]`` and
        latents ``[B, C, F, H, W]`` or ``None``, each checked as by :meth:`put`) and return their
        slots, in order. The store ends with the pages a store that took them one by one holds
        (``ceil(len / page) * page`` slots).

        ``placements``: each block's ``(page, index)``, and ``free``: the free slots in their
        order, as the blocks' :class:`Slot` and :meth:`free_slots` gave them; with both the layout
        is exactly the saved one (a split context's runs of adjacent slots, so the order it sums
        their parts in, and the slots the next blocks take). Without them the blocks are put one
        by one, as if committed in order. On any error (``ValueError``, :class:`NonFiniteError`, an
        allocation) the store is left empty."""
        if self.pages or self._live:
            raise RuntimeError(f"tier {self.name!r}: restore needs an empty store")
        count = len(blocks)
        if self.capacity is not None and count > self.capacity:
            raise ValueError(f"tier {self.name!r}: {count} blocks, more than its capacity ({self.capacity})")
        pages = self.planned_slots(count, self.page_blocks, self.capacity) // self.page_blocks
        taken = [(p, i) for p, i in placements] if placements is not None else None
        if taken is not None:
            every = {(p, i) for p in range(pages) for i in range(self.page_blocks)}
            if len(taken) != count or not set(taken) <= every or len(set(taken)) != count:
                raise ValueError(
                    f"tier {self.name!r}: slots {taken} are not {count} distinct slots of {pages} "
                    f"page(s) of {self.page_blocks}"
                )
            if free is not None and sorted((p, i) for p, i in free) != sorted(every - set(taken)):
                raise ValueError(f"tier {self.name!r}: free slots {list(free)} are not the slots left over")
        try:
            if count and taken is not None:  # the pages first, then each block into its slot
                keys, values, latents = blocks[0]
                self.check(keys, values, latents, finite=False)
                self.reserve(pages * self.page_blocks, keys, latents)
            slots = [
                self.put(keys, values, latents, at=None if taken is None else taken[n])
                for n, (keys, values, latents) in enumerate(blocks)
            ]
            if taken is not None and free is not None:
                self._free = [(p, i) for p, i in free]
        except BaseException:
            self.clear()
            raise
        return slots

    def release(self, slot: Slot) -> None:
        """Return ``slot`` to the free list (its memory stays in the page for reuse)."""
        if not slot.live:
            raise RuntimeError("slot released twice")
        slot.live = False
        slot.forget_views()
        self._slots.discard(slot)
        self._free.append((slot.page, slot.index))
        self._live -= 1

    def clear(self) -> None:
        """Drop every page (memory is returned to the allocator)."""
        for slot in list(self._slots):
            slot.forget_views()
        self._slots = weakref.WeakSet()
        self.pages.clear()
        self.latent_pages.clear()
        self._free.clear()
        self._live = 0
        self._batch = None
        self._dtype = None
        self._latent_shape = None


class Reservation:
    """Pages :meth:`TierStore.reserve` allocated, so a failed commit can give them back."""

    __slots__ = ("device", "fresh", "pages", "store")

    def __init__(self, store: TierStore, pages: int, fresh: bool, device: torch.device | None) -> None:
        self.store = store
        self.pages = pages
        self.fresh = fresh
        self.device = device

    def undo(self) -> None:
        """Free the reserved pages (all their slots are free) and, for a store that was empty,
        forget the dtype/batch it took."""
        store = self.store
        for _ in range(self.pages):
            page = len(store.pages) - 1
            store.pages.pop()
            if store.keep_latents:
                store.latent_pages.pop()
            store._free = [(p, i) for p, i in store._free if p != page]
        self.pages = 0
        if self.fresh and not store.pages:
            store._batch = None
            store._dtype = None
            store._latent_shape = None
            store.device = self.device
