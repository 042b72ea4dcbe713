"""Argument types of the command line: a bad value is argparse's one-line usage error naming
the option (``argument --seconds: expected a number > 0, got '0'``), exit status 2, before
anything is loaded. Checks that need more than the option's own value (a config, the file
system) are made where that is known."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from packforcing.core.validators import SEED_EXPECTED, SEED_LIMIT


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, "a number > 0", lambda value: 0 < value < math.inf)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, "a number >= 0", lambda value: 0 <= value < math.inf)


def unit_interval(text: str) -> float:
    """A number in ``[0, 1]`` (a fraction, a probability)."""
    return _number(text, "a number in [0, 1]", lambda value: 0 <= value <= 1)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def int_at_least(least: int, why: str = "") -> Callable[[str], int]:
    """The type of an integer >= ``least``; ``why`` (``"a block and a later one"``) is said in
    the error, in parentheses."""

    def parse(text: str) -> int:
        return _integer(text, least, why)

    parse.__name__ = f"int_at_least_{least}"
    return parse


def non_empty_text(text: str) -> str:
    """A text with something besides white space in it (a prompt)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty text, got {text!r}")
    return text


def generator_seed(text: str) -> int:
    """A torch generator seed: an integer in ``[0, 2**63)`` (``core.validators.SEED_LIMIT``)."""
    value = _int_or_none(text)
    if value is None or not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected {SEED_EXPECTED}, got {text!r}")
    return value


class OrderedPair(argparse.Action):
    """``nargs=2`` values ``MIN MAX`` (each of the option's ``type``) with ``MIN <= MAX``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, list) and len(values) == 2, "OrderedPair takes nargs=2"
        low, high = values
        if low > high:
            raise argparse.ArgumentError(self, f"expected MIN <= MAX, got {low} {high}")
        setattr(namespace, self.dest, [low, high])


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _integer(text: str, least: int, why: str = "") -> int:
    value = _int_or_none(text)
    if value is None or value < least:
        because = f" ({why})" if why else ""
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}{because}, got {text!r}")
    return value


def _number(text: str, expected: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value
