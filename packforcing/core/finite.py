"""Finiteness checks at one reduction per tensor.

``torch.isfinite(x).all()`` launches five kernels per tensor on a GPU (an absolute value, two
comparisons, a product and a reduction) and writes a boolean copy of ``x``. The float64 sum of
``x`` is finite exactly when every element is: NaN and ±Inf propagate through addition, and a
float64 accumulator cannot overflow on float32, bfloat16 or float16 data (``N · 3.4e38`` stays
far below ``1.8e308``). Many tensors' sums are then tested together, in one host read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_WIDE = (torch.float64, torch.complex64, torch.complex128)
"""Dtypes whose sum could overflow (or is not real): checked element by element instead."""


def finite_sum(x: torch.Tensor) -> torch.Tensor:
    """A 0-d float64 tensor on ``x``'s device, finite exactly when every element of the
    floating-point ``x`` is (its sum; for float64 or complex ``x``, 0 or NaN from an exact
    element-wise test)."""
    if x.dtype in _WIDE:
        return torch.where(torch.isfinite(x).all(), 0.0, math.nan).to(torch.float64)
    return x.sum(dtype=torch.float64)


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every floating-point tensor in ``tensors`` is finite
    (one reduction per tensor; read it once with ``bool()``)."""
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.stack([finite_sum(t) for t in tensors])).all()
