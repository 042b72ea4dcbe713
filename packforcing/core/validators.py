"""attrs validators shared by config and record classes.

A failing validator raises :class:`~packforcing.core.errors.ParamError` with the attribute's
name as the key path; structuring places it under the section's key.
"""

from __future__ import annotations

from typing import Any

import attrs

from packforcing.core.errors import ParamError


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamError(attribute.name, f"expected an integer >= 1, got {value!r}")


def non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParamError(attribute.name, f"expected an integer >= 0, got {value!r}")


def optional_non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        non_negative(instance, attribute, value)


def optional_positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        positive(instance, attribute, value)


def positive_triple(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ParamError(attribute.name, f"expected three integers >= 1, got {value!r}")


def fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ParamError(attribute.name, f"expected a number in (0, 1], got {value!r}")


def one_of(*choices: str):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ParamError(attribute.name, f"expected one of {', '.join(choices)}, got {value!r}")

    return check
