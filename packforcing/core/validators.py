"""attrs validators shared by config and record classes.

Each is a composition of :mod:`attrs.validators` (``instance_of``, ``ge``, ``gt``, ``in_``,
``deep_iterable``, …) whose failure is reported as
:class:`~packforcing.core.errors.ParamError` with the attribute's name as the key path and one
line saying what was expected (``expected an integer >= 0, got -3``); structuring places it
under the section's key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from attrs import validators as v

from packforcing.core.errors import ParamError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def explained(expected: str, *checks: Validator, shown: Callable[[Any], str] = repr) -> Validator:
    """A validator passing when every one of ``checks`` passes (attrs validators, in order), else
    raising ``ParamError(<attribute>, "expected <expected>, got <shown(value)>")``."""
    check = v.and_(*checks)

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        try:
            check(instance, attribute, value)
        except (TypeError, ValueError):
            raise ParamError(attribute.name, f"expected {expected}, got {shown(value)}") from None

    validate.__doc__ = f"Expects {expected}."
    return validate


def integer(*bounds: Validator) -> tuple[Validator, ...]:
    """An ``int`` that is not a ``bool``, within ``bounds`` (e.g. ``v.ge(0)``)."""
    return (v.instance_of(int), v.not_(v.instance_of(bool)), *bounds)


def number(*bounds: Validator) -> tuple[Validator, ...]:
    """An ``int`` or ``float`` that is not a ``bool``, within ``bounds``."""
    return (v.instance_of((int, float)), v.not_(v.instance_of(bool)), *bounds)


positive = explained("an integer >= 1", *integer(v.ge(1)))
non_negative = explained("an integer >= 0", *integer(v.ge(0)))
SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, SEED_LIMIT)``: what a torch generator takes as a signed 64-bit seed."""
SEED_EXPECTED = "an integer >= 0 and < 2**63 (a torch generator seed)"
"""What a seed is, in errors (a config key's and a command-line option's alike)."""
seed_in_range = explained(SEED_EXPECTED, *integer(v.ge(0), v.lt(SEED_LIMIT)))


def wrap_seed(value: int) -> int:
    """A seed derived from another by arithmetic (``seed * K + c``), wrapped into
    ``[0, SEED_LIMIT)`` so every valid seed gives a valid generator seed."""
    return value % SEED_LIMIT


def int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    """Converter: ``value`` (a list from YAML, or a tuple) as a tuple of ints. Typed so that a
    class using it takes any iterable of ints (attrs' ``converter=tuple`` would type the
    argument ``Iterable[_T_co]``, which no argument matches)."""
    return tuple(value)


def str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    """Converter: ``value`` as a tuple of strings (see :func:`int_tuple`)."""
    return tuple(value)


optional_positive = v.optional(positive)
optional_non_negative = v.optional(non_negative)
positive_triple = explained(
    "three integers >= 1", v.instance_of(tuple), v.min_len(3), v.max_len(3), v.deep_iterable(positive)
)
fraction = explained("a number in (0, 1]", *number(v.gt(0), v.le(1)))


def one_of(*choices: str) -> Validator:
    """One of ``choices`` (``expected one of a, b, got 'c'``)."""
    return explained(f"one of {', '.join(choices)}", v.in_(choices))
