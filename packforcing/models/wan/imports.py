"""Importing and loading with diffusers without output of its own.

diffusers imports xformers whenever it is installed (packforcing depends on it). Where
xformers' compiled kernels do not load — a CPU machine, or a torch other than the one the
wheel was built for — xformers logs a six-line warning at that import, although a Wan run on
the ``sdpa`` backend never calls it. :func:`diffusers_quietly` silences that one logger for the
import alone; choosing ``backend: xformers`` imports xformers itself, and its warning shows then.

``from_pretrained`` of a sharded checkpoint draws a ``Loading checkpoint shards`` progress bar
on stderr, where the CLI writes only its one-line errors, and logs weights it found missing or
unused as multi-line warnings before packforcing refuses that load in one line:
:func:`loading_quietly` turns diffusers' progress bars and its model loader's warnings off for
the load alone.
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


LOADER_LOGGER = "diffusers.models.modeling_utils"
"""The logger of diffusers' ``from_pretrained``: its warnings name weights missing from a
checkpoint or not used, which the caller checks itself (``output_loading_info``) and refuses."""


@contextmanager
def loading_quietly() -> Iterator[None]:
    """Within: diffusers' progress bars (its ``utils.logging`` switch, which its
    ``Loading checkpoint shards`` bar obeys) and warnings of :data:`LOADER_LOGGER` are off; after,
    the switch is on again if it was on and the logger's level is restored."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    log = logging.getLogger(LOADER_LOGGER)
    level = log.level
    diffusers_logging.disable_progress_bar()
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        if enabled:
            diffusers_logging.enable_progress_bar()
