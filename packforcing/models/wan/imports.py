"""Importing diffusers without xformers' load warning.

diffusers imports xformers whenever it is installed (packforcing depends on it). Where
xformers' compiled kernels do not load — a CPU machine, or a torch other than the one the
wheel was built for — xformers logs a six-line warning at that import, although a Wan run on
the ``sdpa`` backend never calls it. :func:`diffusers_quietly` silences that one logger for the
import alone; choosing ``backend: xformers`` imports xformers itself, and its warning shows then.
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
