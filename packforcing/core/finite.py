"""Finiteness checks at one reduction per tensor.

``torch.isfinite(x).all()`` launches five kernels per tensor on a GPU (an absolute value, two
comparisons, a product and a reduction) and writes a boolean copy of ``x``. The largest
magnitude of ``x`` (``torch.linalg.vector_norm(x, inf)``: one reduction that reads ``x`` once,
with the absolute value fused in) is finite exactly when every element is: NaN propagates
through the maximum, ±Inf becomes +Inf, and the maximum of finite magnitudes is one of them, so
it cannot overflow whatever the dtype. (A float64 sum would also be exact, but on a GPU it
first copies the tensor to float64: measured slower than ``isfinite``.) Many tensors' probes
are then tested together, in one host read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
