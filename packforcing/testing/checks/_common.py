"""What every conformance check shares: the error, contract naming, snapshots, the Hypothesis runner."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, ParamSpec, TypeVar

import torch

from packforcing.core.geometry import Geometry

P = ParamSpec("P")
R = TypeVar("R")


class ConformanceError(AssertionError):
    """A component breaks one of the contracts of its kind; :attr:`contract` names the contract
    (the function in ``packforcing.testing.checks.<kind>`` that checks it)."""

    def __init__(self, message: str, contract: str | None = None) -> None:
        super().__init__(message)
        self.contract = contract


def contract(function: Callable[P, R]) -> Callable[P, R]:
    """Mark ``function`` as one named contract: a violation it finds is reported with its name."""

    @functools.wraps(function)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except ConformanceError as exc:
            if exc.contract is not None:
                raise
            raise ConformanceError(f"{exc} [contract: {function.__name__}]", function.__name__) from None

    return checked


def fail(kind: str, component: Any, message: str) -> NoReturn:
    name = getattr(component, "name", type(component).__name__)
    raise ConformanceError(f"{kind} {name!r}: {message}")


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def snapshot(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone() for t in tensors]


def unchanged(before: Sequence[torch.Tensor | None], after: Sequence[torch.Tensor | None]) -> bool:
    return all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before, after, strict=True)
    )


def block_tensors(block: Any) -> list[torch.Tensor | None]:
    return [*block.keys, *block.values, block.latents]


def run_examples(test: Callable[..., None], max_examples: int | None, hypothesis_settings: Any = None) -> None:
    """Run a ``@given`` test with a fifth of the active profile's examples (at least 5) by default."""
    from hypothesis import HealthCheck, settings

    current = hypothesis_settings if hypothesis_settings is not None else settings()
    examples = max_examples if max_examples is not None else max(5, current.max_examples // 5)
    configured = settings(
        current,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. an untrained compressor's notice
        configured(test)()


def geometries_strategy(geometries: Any, **defaults: Any) -> Any:
    """``geometries`` as a strategy: the default strategy, one :class:`Geometry`, or as given."""
    from packforcing.testing import strategies as pst

    if geometries is None:
        return pst.geometries(**defaults)
    if isinstance(geometries, Geometry):
        from hypothesis import strategies as st

        return st.just(geometries)
    return geometries
