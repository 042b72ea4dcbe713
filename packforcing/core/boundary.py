"""Checks on what plugins return, at the boundary where the cache takes it (every call).

The checks are cheap: shapes, dtypes and devices are metadata; finiteness is one reduction
over the plugin's *output* (a compressed block, ``[B, Nq, H, D]`` attention output), never
over the whole cache. Each violation becomes a :class:`~packforcing.core.errors.PluginError`
naming the plugin (kind, name, distribution), the block and what was wrong, in one line.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import attrs
import torch

from packforcing.core.errors import PluginError
from packforcing.core.finite import all_finite, finite_probe

T = TypeVar("T")


@attrs.frozen
class Origin:
    """Which plugin a component is: its kind (config key), registered name and distribution."""

    kind: str
    name: str
    distribution: str | None = None

    @classmethod
    def of(cls, kind: str, component: Any, distribution: str | None = None) -> Origin:
        """The origin of ``component`` as far as it tells (its ``name`` attribute)."""
        return cls(kind, str(getattr(component, "name", type(component).__name__)), distribution)

    def error(self, problem: str, block: int | None = None) -> PluginError:
        return PluginError(problem, kind=self.kind, name=self.name, distribution=self.distribution, block=block)

    def call(self, block: int | None, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``; an exception from the plugin becomes a :class:`PluginError` (chained)."""
        with self.calling(block):
            return fn(*args)

    def raised(self, exc: BaseException, block: int | None = None) -> PluginError:
        """The :class:`PluginError` for ``exc``, raised by this plugin: ``raised KeyError: 'x'``."""
        detail = " ".join(str(exc).split())
        return self.error(f"raised {type(exc).__name__}" + (f": {detail}" if detail else ""), block)

    @contextmanager
    def calling(self, block: int | None) -> Iterator[None]:
        try:
            yield
        except PluginError:
            raise
        except Exception as exc:  # a plugin may raise anything; KeyboardInterrupt passes through
            raise self.raised(exc, block) from exc


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def tensor_problem(
    what: str, x: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, finite: bool = True
) -> str | None:
    """What is wrong with tensor ``x`` against the expected ``shape``/``dtype``/``device``
    (and finiteness), or ``None``."""
    if not isinstance(x, torch.Tensor):
        return f"{what} is a {type(x).__name__}, expected a tensor"
    if tuple(x.shape) != tuple(shape):
        return f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}"
    if x.dtype != dtype:
        return f"{what} is {x.dtype}, expected {dtype}"
    if x.device != device:
        return f"{what} is on {x.device}, expected {device}"
    if finite and x.is_floating_point() and not bool(torch.isfinite(finite_probe(x))):
        return f"{what} contains non-finite values (NaN/Inf)"
    return None


def kv_problem(
    keys: Sequence[Any],
    values: Sequence[Any],
    *,
    num_layers: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    finite: bool = True,
) -> str | None:
    """What is wrong with per-layer ``keys``/``values`` ``[B, N, H, D]``, or ``None``.
    ``finite=False``: everything but their finiteness (which takes a host read)."""
    if len(keys) != num_layers or len(values) != num_layers:
        return f"returned {len(keys)} layers of keys and {len(values)} of values, expected {num_layers}"
    for what, tensors in (("keys", keys), ("values", values)):
        for layer, x in enumerate(tensors):
            if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] != shape[0] and x.shape[1:] == shape[1:]:
                return f"{what} of layer {layer} have batch {x.shape[0]}, expected {shape[0]}"
            problem = tensor_problem(f"{what} of layer {layer}", x, shape, dtype, device, finite=False)
            if problem:
                return problem
    # finiteness of every layer in one host read (each read waits for an accelerator)
    tensors = [x for x in (*keys, *values) if x.is_floating_point()]
    if not finite or not tensors or bool(all_finite(tensors)):
        return None
    for what, group in (("keys", keys), ("values", values)):
        for layer, x in enumerate(group):
            problem = tensor_problem(f"{what} of layer {layer}", x, shape, dtype, device)
            if problem:
                return problem
    return None


def number_problem(what: str, value: Any, *, positive: bool = False) -> str | None:
    """What is wrong with a plain finite number (``> 0`` if ``positive``), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{what} must be a finite number, got {value!r}"
    if positive and value <= 0:
        return f"{what} must be > 0, got {value!r}"
    return None


def checked_budget(
    origin: Origin, selector: Any, candidates: int, *, previous: int = 0, block: int | None = None
) -> int:
    """The selector's ``budget(candidates)``, or a :class:`PluginError` from ``origin`` (at
    ``block``) if it raises or is not an int in ``[previous, candidates]`` (``previous``: the
    budget of one candidate fewer, as it is non-decreasing)."""
    budget = origin.call(block, selector.budget, candidates)
    if isinstance(budget, bool) or not isinstance(budget, int) or not previous <= budget <= candidates:
        floor = f", at least budget({candidates - 1}) = {previous}" if previous else ""
        raise origin.error(f"budget({candidates}) must be an int in [0, {candidates}]{floor}; got {budget!r}", block)
    return budget


def selection_problem(
    idx: Any, *, batch: int, budget: int, candidates: int, device: torch.device, read: bool = True
) -> str | None:
    """What is wrong with a selector's indices ``[B, k']``: integers on the queries' device,
    shape ``(batch, budget)``, in ``[0, candidates)``, strictly increasing (unique, time order).
    ``read=False`` checks only what the host knows without reading the indices (a caller that
    keeps them on the device checks their values there)."""
    if not isinstance(idx, torch.Tensor):
        return f"returned a {type(idx).__name__}, expected an int64 tensor [B, k']"
    if idx.dtype not in (torch.int64, torch.int32):
        return f"returned {idx.dtype} indices, expected int64"
    if tuple(idx.shape) != (batch, budget):
        return f"returned indices of shape {tuple(idx.shape)}, expected ({batch}, {budget}) [B, k']"
    if idx.device != device:
        return f"returned indices on {idx.device}, expected {device}"
    if budget == 0 or not read:
        return None
    # k' is small: check the rows as Python ints (one transfer, which the caller needs anyway)
    rows = idx.tolist()
    if any(i < 0 or i >= candidates for row in rows for i in row):
        return f"returned indices outside [0, {candidates}): {rows}"
    if any(len(set(row)) < len(row) for row in rows):
        return f"returned duplicate indices: {rows}"
    if any(a >= b for row in rows for a, b in itertools.pairwise(row)):
        return f"returned indices not in increasing (time) order: {rows}"
    return None


class DeferredChecks:
    """Device-side checks of plugin output, held until one host read for a whole block.

    A forward pass checks what stays on the device (a selector's indices, each layer's finite
    output) as flags on the device; reading them on the host waits for every queued kernel, and
    the device then idles while Python prepares the next pass. A policy that holds its passes'
    flags here reads all of a block's at once, before the block is committed
    (:meth:`settle`), so the sampler's passes run back to back on the device. The cache is
    unchanged until then, so a bad pass is still refused before anything is stored.
    """

    def __init__(self) -> None:
        self.block: int | None = None
        """The block whose passes' checks are held (``None``: none held)."""
        self._held: list[tuple[torch.Tensor, Callable[[], None]]] = []

    def add(self, block: int, flags: torch.Tensor, explain: Callable[[], None]) -> None:
        """Hold one check's ``flags`` (bool on the device, all true when it passed) for ``block``:
        a pass's, or what its commit adds (its K/V's finiteness, the compressors' output's);
        ``explain()`` raises its precise error (it may read on the host). Checks held for another
        block (one abandoned by an error before its commit) are dropped."""
        if self.block != block:
            self._held.clear()
            self.block = block
        self._held.append((flags.reshape(-1), explain))

    def clear(self) -> None:
        """Drop what is held, unread."""
        self._held.clear()
        self.block = None

    def settle(self) -> None:
        """Read every held flag in one host read; if one is false, raise the first failing check's
        error (in the order they were added: the passes as they ran, then the commit's). Nothing
        is held afterwards, either way."""
        held = self._held
        self._held, self.block = [], None
        if not held or bool(torch.cat([flags for flags, _ in held]).all()):
            return
        for flags, explain in held:
            if not bool(flags.all()):
                explain()
