"""Timing wrappers: measure where a block's time goes without touching the components.

:func:`timing_wrapper` is passed as ``build_engine(config, wrap=...)``; it wraps each built
component (model, backend, realigner, selector, compressor, policy) in a delegating twin that
records wall time per section in a :class:`SectionTimer`. Sections nest as they run:
``model`` ⊃ ``attend`` ⊃ {``backend``, ``selection``, ``realign``}; ``commit`` ⊃
``compression``. ``realign`` covers the realigner's ``assign`` and ``gather``, i.e. the copy of
the context into one tensor *and* the RoPE rotation of moved keys (the two are one pass).
:meth:`SectionTimer.breakdown` turns them into exclusive shares. On CUDA the timer synchronises
at every boundary, which slows the run: use it for shares, not totals.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from packforcing.core.interfaces import (
    AttentionBackend,
    AttentionContext,
    CachePolicy,
    Compressor,
    PositionalRealigner,
    Selector,
)
from packforcing.core.records import BlockCommit, BlockQuery, CachedBlock, CacheStats, CompressedKV, MemoryPlan


class SectionTimer:
    """Accumulated wall seconds per named section."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def breakdown(self, total: float) -> dict[str, float]:
        """Exclusive seconds: model forward, compression, selection, realignment, bookkeeping, other."""
        s = self.seconds
        attend_overhead = s["attend"] - s["backend"] - s["selection"] - s["realign"]
        parts = {
            "model_forward": s["model"] - s["attend"] + s["backend"],
            "compression": s["compression"],
            "selection": s["selection"],
            "realignment": s["realign"],
            "bookkeeping": (s["commit"] - s["compression"]) + attend_overhead + s["context"],
        }
        parts["other"] = max(0.0, total - sum(parts.values()))
        return parts


class _Delegate:
    def __init__(self, inner: Any, timer: SectionTimer) -> None:
        self._inner = inner
        self._timer = timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class TimedModel(_Delegate):
    def denoise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: AttentionContext, condition: Any = None
    ) -> torch.Tensor:
        with self._timer.section("model"):
            return self._inner.denoise(latents, timesteps, context, condition=condition)

    def clean_kv(self, latents: torch.Tensor, context: AttentionContext, condition: Any = None):
        with self._timer.section("model"):
            return self._inner.clean_kv(latents, context, condition=condition)


class TimedBackend(AttentionBackend):
    def __init__(self, inner: AttentionBackend, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name

    def attend(self, q, k, v, mask=None):
        with self.timer.section("backend"):
            return self.inner.attend(q, k, v, mask)


class TimedSelector(Selector):
    def __init__(self, inner: Selector, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name
        self.shared_across_layers = inner.shared_across_layers

    def budget(self, num_candidates: int) -> int:
        return self.inner.budget(num_candidates)

    def select(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        with self.timer.section("selection"):
            return self.inner.select(queries, candidates, layer)


class TimedRealigner(PositionalRealigner):
    def __init__(self, inner: PositionalRealigner, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name

    def assign(self, spans, query: BlockQuery):
        with self.timer.section("realign"):
            return self.inner.assign(spans, query)

    def realign(self, keys, block, target, rope):
        with self.timer.section("realign"):
            return self.inner.realign(keys, block, target, rope)

    def gather(self, keys, blocks, targets, rope, tail):
        with self.timer.section("realign"):
            return self.inner.gather(keys, blocks, targets, rope, tail)


class TimedCompressor(Compressor):
    def __init__(self, inner: Compressor, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name
        self.needs_latents = inner.needs_latents

    def output_grid(self, grid):
        return self.inner.output_grid(grid)

    def compress(self, block: CachedBlock, model: Any) -> CompressedKV:
        with self.timer.section("compression"):
            return self.inner.compress(block, model)


class TimedContext(AttentionContext):
    def __init__(self, inner: AttentionContext, timer: SectionTimer) -> None:
        self.inner, self.timer = inner, timer

    @property
    def position(self) -> float:
        return self.inner.position

    @property
    def context_tokens(self) -> int:
        return self.inner.context_tokens

    def attend(self, layer, q, k, v):
        with self.timer.section("attend"):
            return self.inner.attend(layer, q, k, v)


class TimedPolicy(CachePolicy):
    def __init__(self, inner: CachePolicy, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.inner.reset()

    def commit(self, commit: BlockCommit) -> None:
        with self.timer.section("commit"):
            self.inner.commit(commit)

    def context(self, query: BlockQuery) -> AttentionContext:
        with self.timer.section("context"):
            inner = self.inner.context(query)
        return TimedContext(inner, self.timer)

    def plan(self, num_blocks: int, batch_size: int = 1) -> MemoryPlan:
        return self.inner.plan(num_blocks, batch_size)

    def full_resolution_blocks(self) -> list[CachedBlock]:
        return self.inner.full_resolution_blocks()

    def replace_kv(self, block_id, keys, values, *, position, condition=None) -> None:
        with self.timer.section("commit"):
            self.inner.replace_kv(block_id, keys, values, position=position, condition=condition)

    def stats(self) -> CacheStats:
        return self.inner.stats()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, tensors, meta) -> None:
        self.inner.load_state_dict(tensors, meta)


_WRAPPERS: dict[str, type] = {  # by kind (packforcing.plugins.kinds); samplers are timed as the model calls they make
    "model": TimedModel,
    "attention": TimedBackend,
    "selector": TimedSelector,
    "positional": TimedRealigner,
    "compressor": TimedCompressor,
    "policy": TimedPolicy,
}


def timing_wrapper(timer: SectionTimer) -> Callable[[str, Any], Any]:
    """A ``wrap`` for :func:`packforcing.build_engine` that times every component into ``timer``."""

    def wrap(kind: str, component: Any) -> Any:
        cls = _WRAPPERS.get(kind)
        return cls(component, timer) if cls is not None else component

    return wrap
