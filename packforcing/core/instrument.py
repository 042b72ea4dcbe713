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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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


def _adopt_capabilities(wrapper: Any, inner: Any, capabilities: Sequence[str]) -> None:
    """Give ``wrapper`` the capability flags ``inner`` has (``capabilities``: its interface's
    ``CAPABILITIES``), so that wrapping a component never changes which path a context takes."""
    for flag in capabilities:
        setattr(wrapper, flag, getattr(inner, flag))


class TimedBackend(AttentionBackend):
    def __init__(self, inner: AttentionBackend, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name
        _adopt_capabilities(self, inner, AttentionBackend.CAPABILITIES)

    def attend(self, q, k, v, mask=None):
        with self.timer.section("backend"):
            return self.inner.attend(q, k, v, mask)

    def attend_lse(self, q, k, v):
        with self.timer.section("backend"):
            return self.inner.attend_lse(q, k, v)


class TimedSelector(Selector):
    def __init__(self, inner: Selector, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name
        _adopt_capabilities(self, inner, Selector.CAPABILITIES)

    def budget(self, num_candidates: int) -> int:
        return self.inner.budget(num_candidates)

    def select(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        with self.timer.section("selection"):
            return self.inner.select(queries, candidates, layer)


class TimedRealigner(PositionalRealigner):
    def __init__(self, inner: PositionalRealigner, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name
        _adopt_capabilities(self, inner, PositionalRealigner.CAPABILITIES)

    def assign(self, spans, query: BlockQuery):
        with self.timer.section("realign"):
            return self.inner.assign(spans, query)

    def realign(self, keys, block, target, rope):
        with self.timer.section("realign"):
            return self.inner.realign(keys, block, target, rope)

    def gather(self, keys, blocks, targets, rope, tail):
        with self.timer.section("realign"):
            return self.inner.gather(keys, blocks, targets, rope, tail)

    def gather_shifted(self, keys, deltas, rope, tail):
        with self.timer.section("realign"):
            return self.inner.gather_shifted(keys, deltas, rope, tail)

    def query_shifter(self, delta, rope):
        with self.timer.section("realign"):
            shifter = self.inner.query_shifter(delta, rope)

        def timed(q):
            with self.timer.section("realign"):
                return shifter(q)

        return timed


class TimedCompressor(Compressor):
    def __init__(self, inner: Compressor, timer: SectionTimer) -> None:
        self.inner, self.timer, self.name = inner, timer, inner.name
        _adopt_capabilities(self, inner, Compressor.CAPABILITIES)

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

    def settle(self) -> None:
        with self.timer.section("commit"):
            self.inner.settle()

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
    "backend": TimedBackend,
    "selector": TimedSelector,
    "realigner": TimedRealigner,
    "compressor": TimedCompressor,
    "policy": TimedPolicy,
}


def timing_wrapper(timer: SectionTimer) -> Callable[[str, Any], Any]:
    """A ``wrap`` for :func:`packforcing.build_engine` that times every component into ``timer``."""

    def wrap(kind: str, component: Any) -> Any:
        cls = _WRAPPERS.get(kind)
        return cls(component, timer) if cls is not None else component

    return wrap


_HOST_READS = frozenset({"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu"})
"""Tensor methods that read a tensor's data on the host: on an accelerator each one waits for
the device (a host-device synchronisation)."""
_HOST_MADE = frozenset({"tensor", "as_tensor", "from_numpy", "pin_memory"})
"""Functions that make a tensor from host data (it must then be copied to the device)."""
_MOVES = frozenset({"to", "cuda"})


def _names_device(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether a ``to`` call names a device or takes a CPU tensor's device (a possible
    host-to-device copy), rather than only changing the dtype."""
    if "device" in kwargs:
        return True
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)) or (isinstance(arg, torch.Tensor) and arg.device.type == "cpu"):
            return True
    return False


class HostSyncCounter(TorchFunctionMode):
    """Counts the tensor operations that synchronise the host with an accelerator, on any device.

    On a GPU, reading a tensor on the host (``bool(t)``, ``.item()``, ``.tolist()``, ``.cpu()``,
    ...) waits for every queued kernel, and so does an ordinary copy of host-made data to the
    device (``torch.tensor(...)``, ``.to(device)`` of a CPU tensor): the GPU then idles while
    Python catches up. This mode counts such calls where they happen, so a CPU test can assert
    that a code path has none (``reads`` / ``writes`` by call name; ``.to(dtype)`` is not
    counted). It counts conservatively: on the CPU every ``.to(device)`` is counted even though
    it moves nothing. Use as ``with HostSyncCounter() as counter: ...``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, int] = defaultdict(int)
        self.writes: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.reads[name] += 1
        elif name in _HOST_MADE:
            self.writes[name] += 1
        elif name in _MOVES and _names_device(args, kwargs):
            self.writes[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """All counted calls."""
        return sum(self.reads.values()) + sum(self.writes.values())

    def reset(self) -> None:
        self.reads.clear()
        self.writes.clear()
