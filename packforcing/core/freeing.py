"""Memory a failed load or build leaves behind: freed before its error reaches the caller.

An error keeps its traceback, and the traceback keeps every frame it passes through with their
locals: a refusal raised after a model is loaded (a weight out of the run's range, a VAE that
does not fit, a component's parameters, a cross-check) would keep the model — GBs of weights, on
the GPU — alive for as long as the error lives, and an interactive session keeps the last one.
:func:`freed_on_error` wraps a loader or builder so that, on any exception, the locals of the
frames the exception passed through are cleared (the traceback still shows every file, line and
function: only a post-mortem debugger finds them gone) and, with CUDA in use, the memory goes
back to the device (:func:`return_memory`); the exception itself is raised unchanged.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


def return_memory(on_cuda: bool) -> None:
    """Return the memory of what was just dropped to a CUDA device it was on: a collection, for
    what reference cycles hold, then the caching allocator's unused blocks. On the CPU, nothing:
    dropping the last reference frees a model at once (the Wan transformer, VAE and UMT5 and
    ``tiny_dit`` hold no reference cycles), and a collection would cost every refusal ~0.1 s
    with torch loaded."""
    if not on_cuda:
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def clear_frames(exc: BaseException, outer: BaseException | None) -> None:
    """Clear the locals of the finished frames in the traceback of ``exc`` and of every exception
    chained to it (``__cause__``, and ``__context__``, kept even when raised ``from None``),
    stopping at ``outer``: the exception the caller was handling when the call began, whose
    frames are not the call's. The tracebacks keep their files, lines and functions; a frame
    still running (the caller's) is left as it is."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if current is outer or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        todo.extend(chained for chained in (current.__cause__, current.__context__) if chained is not None)


def freed_on_error(call: Callable[_P, _R]) -> Callable[_P, _R]:
    """``call``, which on any exception first drops what it had loaded or built (:func:`clear_frames`,
    then :func:`return_memory` when CUDA is in use), then raises the exception unchanged (type,
    message, chaining)."""

    @functools.wraps(call)
    def freeing(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        outer = sys.exc_info()[1]
        try:
            return call(*args, **kwargs)
        except BaseException as exc:
            clear_frames(exc, outer)
            import torch

            return_memory(torch.cuda.is_initialized())
            raise

    return freeing
