"""Host-to-device copies that do not synchronise.

An ordinary ``tensor.to("cuda")`` of a host tensor waits for every kernel queued on the stream
(PyTorch synchronises after a copy from pageable memory), so a small host-made tensor moved to
the GPU inside a loop stalls the GPU once per iteration. :func:`to_device` pins the host tensor
and copies it asynchronously instead; the caching host allocator keeps the pinned buffer alive
until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device`` (cast to ``dtype`` there), without a host sync on CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and host.device.type == "cpu":
        moved = host.pin_memory().to(device, non_blocking=True)
        return moved if dtype is None else moved.to(dtype)
    return host.to(device=device, dtype=dtype)
