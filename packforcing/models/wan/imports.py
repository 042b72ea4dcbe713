"""Importing and loading with diffusers (and transformers) without output of their own.

diffusers imports xformers whenever it is installed (packforcing depends on it). Where
xformers' compiled kernels do not load — a CPU machine, or a torch other than the one the
wheel was built for — xformers logs a six-line warning at that import, although a Wan run on
the ``sdpa`` backend never calls it. :func:`diffusers_quietly` silences that one logger for the
import alone; choosing ``backend: xformers`` imports xformers itself, and its warning shows then.

``from_pretrained`` of a sharded checkpoint (diffusers' or transformers') draws a ``Loading
checkpoint shards`` progress bar on stderr, where the CLI writes only its one-line errors, and
logs weights it found missing or unused as multi-line warnings before packforcing refuses that
load in one line: :func:`loading_quietly` turns the library's progress bars and its model
loader's warnings off for the load alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def diffusers_quietly() -> Iterator[None]:
    """Within: warnings of the ``xformers`` logger are dropped (its level is restored after)."""
    log = logging.getLogger("xformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


LOADERS = {
    "diffusers": ("diffusers.utils.logging", "diffusers.models.modeling_utils"),
    "transformers": ("transformers.utils.logging", "transformers.modeling_utils"),
}
"""Per library: the module of its progress-bar switch, and the logger of its ``from_pretrained``,
whose warnings name weights missing from a checkpoint or not used (transformers' "LOAD REPORT"):
what the caller checks itself (``output_loading_info``) and refuses in one line, or accepts (a
whole UMT5's unused decoder)."""


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextmanager
def loading_quietly(library: str = "diffusers") -> Iterator[None]:
    """Within: the progress bars of ``library`` (a key of :data:`LOADERS`: its ``utils.logging``
    switch, which its ``Loading checkpoint shards`` bar obeys) are off and its loader's logger
    passes errors only; after, the switch is on again if it was on and the logger as it was. The
    logger is filtered, its level left alone: transformers reads that level as a switch (at
    WARNING or above it checks the model's tensor-parallel plan and warns about the layers the
    plan leaves out, a line per load of a UMT5)."""
    import importlib

    module, logger = LOADERS[library]
    switch = importlib.import_module(module)
    enabled = switch.is_progress_bar_enabled()
    log = logging.getLogger(logger)
    switch.disable_progress_bar()
    log.addFilter(_errors_only)
    try:
        yield
    finally:
        log.removeFilter(_errors_only)
        if enabled:
            switch.enable_progress_bar()
