"""Importing and loading with diffusers without output of its own.

diffusers imports xformers whenever it is installed (packforcing depends on it). Where
xformers' compiled kernels do not load — a CPU machine, or a torch other than the one the
wheel was built for — xformers logs a six-line warning at that import, although a Wan run on
the ``sdpa`` backend never calls it. :func:`diffusers_quietly` silences that one logger for the
import alone; choosing ``backend: xformers`` imports xformers itself, and its warning shows then.

``from_pretrained`` of a sharded checkpoint draws a ``Loading checkpoint shards`` progress bar
on stderr, where the CLI writes only its one-line errors: :func:`loading_quietly` turns diffusers'
progress bars off for the load alone.
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


@contextmanager
def loading_quietly() -> Iterator[None]:
    """Within: diffusers' progress bars (its ``utils.logging`` switch, which its
    ``Loading checkpoint shards`` bar obeys) are off; after, on again if they were on."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()
