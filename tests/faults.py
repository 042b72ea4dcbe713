"""Plugins that fail on demand: wrappers that delegate to a real component until armed.

Each wrapper takes the inner component and, while ``fault`` is set, corrupts what the inner
component returns (or raises) in the way ``fault`` names. They compose through
``build_engine(config, wrap=faulty(...))``, the same hook the timing wrappers use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from packforcing.core.interfaces import AttentionBackend, Compressor, PositionalRealigner, Selector
from packforcing.core.records import CachedBlock, CompressedKV


class Boom(RuntimeError):
    """What a faulty plugin raises."""


class _Delegating:
    """Anything the wrapper does not define (a compressor's ``ratio`` ...) comes from ``inner``."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


COMPRESSOR_FAULTS = ("raise", "nan", "inf", "tokens", "grid", "layers", "batch", "int64", "float64", "device", "type")


def _each(tensors: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    return [fn(t) for t in tensors]


class FaultyCompressor(_Delegating, Compressor):
    """A compressor that returns ``inner``'s output, corrupted by ``fault`` when one is set."""

    def __init__(self, inner: Compressor, fault: str | None = None) -> None:
        self.inner, self.fault, self.name = inner, fault, inner.name
        self.needs_latents = inner.needs_latents
        self.calls = 0

    def output_grid(self, grid):
        return self.inner.output_grid(grid)

    def compress(self, block: CachedBlock, model: Any) -> CompressedKV:
        self.calls += 1
        if self.fault == "raise":
            raise Boom(f"compressor exploded on block {block.block_id}")
        ckv = self.inner.compress(block, model)
        fault = self.fault
        if fault == "grid":
            t, h, w = ckv.grid
            return attrs.evolve(ckv, grid=(t + 1, h, w))
        if fault == "type":
            return list(ckv.keys)  # type: ignore[return-value]
        keys, values = spoil_kv(ckv.keys, ckv.values, fault)
        return attrs.evolve(ckv, keys=keys, values=values)


KV_FAULTS = ("nan", "inf", "tokens", "layers", "batch", "int64", "float64", "device")
"""What :func:`spoil_kv` does to per-layer K/V (the compressor faults that are about the tensors)."""


def spoil_kv(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], fault: str | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``keys``/``values`` ``[B, N, H, D]`` spoiled as ``fault`` (one of
    :data:`KV_FAULTS`, or ``None`` for unchanged) names: a NaN or Inf token, a token short, a
    layer short, the batch doubled, int64 or float64 keys, keys on the meta device."""
    keys, values = list(keys), list(values)
    if fault in ("nan", "inf"):
        bad = float(fault)
        keys = _each(keys, lambda k: k.clone().index_fill_(1, torch.tensor([0]), bad))
    elif fault == "tokens":
        keys, values = _each(keys, lambda k: k[:, :-1]), _each(values, lambda v: v[:, :-1])
    elif fault == "layers":
        keys, values = keys[:-1], values[:-1]
    elif fault == "batch":
        keys, values = _each(keys, lambda k: torch.cat([k, k])), _each(values, lambda v: torch.cat([v, v]))
    elif fault == "int64":
        keys = _each(keys, lambda k: k.round().to(torch.int64))
    elif fault == "float64":
        keys, values = _each(keys, lambda k: k.double()), _each(values, lambda v: v.double())
    elif fault == "device":
        keys = _each(keys, lambda k: torch.empty(k.shape, dtype=k.dtype, device="meta"))
    return keys, values


SELECTOR_FAULTS = ("raise", "out_of_range", "negative", "duplicate", "reversed", "float", "shape")


class FaultySelector(_Delegating, Selector):
    def __init__(self, inner: Selector, fault: str | None = None) -> None:
        self.inner, self.fault, self.name = inner, fault, inner.name
        self.shared_across_layers = inner.shared_across_layers

    def budget(self, num_candidates: int) -> int:
        return self.inner.budget(num_candidates)

    def select(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        if self.fault == "raise":
            raise Boom("selector exploded")
        idx = self.inner.select(queries, candidates, layer)
        n = len(candidates)
        if self.fault == "out_of_range":
            idx = idx.clone()
            idx[:, -1] = n
        elif self.fault == "negative":
            idx = idx.clone()
            idx[:, 0] = -1
        elif self.fault == "duplicate":
            idx = idx.clone()
            idx[:, -1] = idx[:, 0]
        elif self.fault == "reversed":
            idx = idx.flip(1)
        elif self.fault == "float":
            idx = idx.float()
        elif self.fault == "shape":
            idx = idx[:, :-1]
        return idx


REALIGNER_FAULTS = ("raise", "targets", "nan_target", "shape", "dtype", "nan_keys")


class FaultyRealigner(_Delegating, PositionalRealigner):
    def __init__(self, inner: PositionalRealigner, fault: str | None = None) -> None:
        self.inner, self.fault, self.name = inner, fault, inner.name

    def assign(self, spans, query):
        if self.fault == "raise":
            raise Boom("realigner exploded")
        targets, position = self.inner.assign(spans, query)
        if self.fault == "targets" and spans:
            targets = targets[:-1]
        elif self.fault == "nan_target" and spans:
            targets = [*targets[:-1], float("nan")]
        return targets, position

    def gather(self, keys, blocks, targets, rope, tail):
        out = self.inner.gather(keys, blocks, targets, rope, tail)
        if self.fault == "shape":
            return out[:, 1:]
        if self.fault == "dtype":
            return out.double()
        if self.fault == "nan_keys":
            return out.clone().fill_(float("nan"))
        return out


BACKEND_FAULTS = ("raise", "nan", "shape", "dtype")


class FaultyBackend(_Delegating, AttentionBackend):
    def __init__(self, inner: AttentionBackend, fault: str | None = None) -> None:
        self.inner, self.fault, self.name = inner, fault, inner.name

    def attend(self, q, k, v, mask=None):
        if self.fault == "raise":
            raise Boom("backend exploded")
        out = self.inner.attend(q, k, v, mask)
        if self.fault == "nan":
            return out.clone().fill_(float("nan"))
        if self.fault == "shape":
            return out[:, :-1]
        if self.fault == "dtype":
            return out.double()
        return out


WRAPPERS = {
    "compressor": FaultyCompressor,
    "selector": FaultySelector,
    "realigner": FaultyRealigner,
    "backend": FaultyBackend,
}


def faulty(made: dict[str, Any]) -> Callable[[str, Any], Any]:
    """A ``wrap`` for ``build_engine`` putting a faulty twin around each plugin kind it knows;
    the wrappers are recorded in ``made`` by kind (arm one with ``made[kind].fault = ...``)."""

    def wrap(kind: str, component: Any) -> Any:
        cls = WRAPPERS.get(kind)
        if cls is None:
            return component
        made[kind] = cls(component)
        return made[kind]

    return wrap
