"""Finiteness checks at one reduction per tensor.

``torch.isfinite(x).all()`` launches five kernels per tensor on a GPU (an absolute value, two
comparisons, a product and a reduction) and writes a boolean copy of ``x``. The largest
magnitude of ``x`` (``torch.linalg.vector_norm(x, inf)``: one reduction that reads ``x`` once,
with the absolute value fused in) is finite exactly when every element is: NaN propagates
through the maximum, ±Inf becomes +Inf, and the maximum of finite magnitudes is one of them, so
it cannot overflow whatever the dtype. (A float64 sum would also be exact, but on a GPU it
first copies the tensor to float64: measured slower than ``isfinite``.) Many tensors' probes
are then tested together, in one host read.

Tensors read from a file and cast to a run's narrower dtype (float32 or bfloat16 weights run in
float16) are checked by :func:`cast_problem`: a value beyond the dtype's range would become ±Inf
and the run NaN, so the load is refused in one line naming the tensor and its largest magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch


def finite_probe(x: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor on ``x``'s device, finite exactly when every element of the floating-point
    ``x`` is: its largest magnitude (0 for an empty tensor; for complex ``x``, 0 or NaN from an
    element-wise test, since a complex magnitude can overflow)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if x.is_complex():
        return torch.where(torch.isfinite(x).all(), 0.0, math.nan)
    return torch.linalg.vector_norm(x, math.inf)


def finite_flags(probes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[n]`` bool on the probes' device: which :func:`finite_probe` results are finite (one
    stack; probes of different dtypes are widened to float64 first, exactly)."""
    probes = list(probes)
    if len({p.dtype for p in probes}) > 1:
        probes = [p.to(torch.float64) for p in probes]
    return torch.isfinite(torch.stack(probes))


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every floating-point tensor in ``tensors`` is finite
    (one reduction per tensor; read it once with ``bool()``)."""
    if not tensors:
        return torch.tensor(True)
    return finite_flags([finite_probe(t) for t in tensors]).all()


# ---------------------------------------------------------------------- casts of loaded tensors

SUGGESTED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
"""The run dtypes an out-of-range refusal suggests, narrowest first."""


def narrows(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting ``source`` to ``target`` can turn a finite value into ±Inf: both are
    floating-point and ``target``'s range is the smaller (``float32`` → ``bfloat16`` narrows too:
    bfloat16's largest value is a little below float32's)."""
    return source.is_floating_point and target.is_floating_point and torch.finfo(source).max > torch.finfo(target).max


def narrowest(*dtypes: torch.dtype) -> torch.dtype:
    """The floating-point dtype of ``dtypes`` with the smallest range: what values that are cast
    through each of them in turn must fit."""
    return min(dtypes, key=lambda dtype: torch.finfo(dtype).max)


def largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor in ``x``'s dtype and device: the largest ``|x|`` of the floating-point ``x``
    (NaN if it holds a NaN, Inf if an Inf; 0 if empty). One ``aminmax`` pass: on the CPU,
    where weights are loaded and cast, it is vectorised for float16, bfloat16, float32 and
    float64 and ~5x faster than ``vector_norm(x, inf)`` (:func:`finite_probe`, chosen for the
    GPU) or ``isfinite(x).all()``. ``aminmax`` has no float8 kernel: a float8 ``x`` is read in
    float32 (which holds its every value exactly) and so is its result."""
    if x.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    if x.is_floating_point() and x.element_size() == 1:
        x = x.float()
    low, high = torch.aminmax(x)
    return torch.maximum(low.abs(), high.abs())


class CastProblem(NamedTuple):
    """What :func:`find_cast_problem` found: the tensor's ``name`` (as given) and the ``issue``
    after it, so that a caller that knows the tensor by another name (the one in its file) can
    say it in :meth:`line`."""

    name: str
    issue: str
    """``"holds 7.1e+04, beyond float16's ±65504; run in bfloat16 or float32"`` or ``"holds NaN or Inf"``."""

    def line(self, name: str | None = None) -> str:
        """``"NAME ISSUE"``, naming the tensor ``name`` when given, else as it was given."""
        return f"{self.name if name is None else name} {self.issue}"


def cast_problem(
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | Mapping[str, torch.dtype],
    *,
    finite: bool = False,
    suggest: bool = True,
) -> str | None:
    """One line about the first tensor of ``tensors`` (``(name, tensor read from a file)``) that a
    cast to ``dtype`` (one for all, or per name) turns from finite to ±Inf:
    ``"NAME holds 7.1e+04, beyond float16's ±65504; run in bfloat16 or float32"``; ``None`` if
    every one fits. Only the floating-point tensors whose cast :func:`narrows` are read (one
    :func:`largest_magnitude` each, one host read for all), so a load in a dtype as wide as the
    file's costs nothing. A tensor that holds NaN or Inf itself is not the cast's doing and passes,
    unless ``finite``: then every floating-point tensor is read and such a one is
    ``"NAME holds NaN or Inf"``. ``suggest=False`` leaves out the dtypes to run in, for a load
    whose dtype the user cannot choose (a resumed run's state, which must resume unchanged)."""
    found = find_cast_problem(tensors, dtype, finite=finite, suggest=suggest)
    return None if found is None else found.line()


def find_cast_problem(
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | Mapping[str, torch.dtype],
    *,
    finite: bool = False,
    suggest: bool = True,
) -> CastProblem | None:
    """:func:`cast_problem` as a :class:`CastProblem`, whose ``name`` tells the caller which
    tensor it is (to find the file holding it, say)."""
    names: list[str] = []
    targets: list[torch.dtype] = []
    probes: list[torch.Tensor] = []
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        target = dtype if isinstance(dtype, torch.dtype) else dtype.get(name, tensor.dtype)
        if finite or narrows(tensor.dtype, target):
            names.append(name)
            targets.append(target)
            probes.append(largest_magnitude(tensor).to(torch.float64))  # exact: every float fits float64
    if not probes:
        return None
    for name, target, largest in zip(names, targets, torch.stack(probes).tolist(), strict=True):
        if not math.isfinite(largest):
            if finite:
                return CastProblem(name, "holds NaN or Inf")
        elif not math.isfinite(torch.tensor(largest, dtype=torch.float64).to(target).item()):
            return CastProblem(name, _beyond(largest, target, suggest=suggest))
    return None


def out_of_range(name: str, largest: float, dtype: torch.dtype, *, suggest: bool = True) -> str:
    """The line of :func:`cast_problem` for tensor ``name`` whose largest magnitude ``largest``
    is beyond ``dtype``'s range, suggesting (``suggest``) the run dtypes that hold it."""
    return f"{name} {_beyond(largest, dtype, suggest=suggest)}"


def _beyond(largest: float, dtype: torch.dtype, *, suggest: bool) -> str:
    fits = [d for d in SUGGESTED_DTYPES if narrows(d, dtype) and torch.finfo(d).max >= largest][:2]
    hint = f"; run in {' or '.join(_name(d) for d in fits)}" if fits and suggest else ""
    return f"holds {largest:.2g}, beyond {_name(dtype)}'s ±{torch.finfo(dtype).max:g}{hint}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
