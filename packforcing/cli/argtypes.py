"""Argument types of the command line: a bad value is argparse's one-line usage error naming
the option (``argument --seconds: expected a number > 0, got '0'``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, "a number > 0", lambda value: 0 < value < math.inf)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, "a number >= 0", lambda value: 0 <= value < math.inf)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def _integer(text: str, least: int) -> int:
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def _number(text: str, expected: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value
