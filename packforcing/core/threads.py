"""CPU intra-op threads for a run: ``run.threads`` (an integer, or ``auto``).

PyTorch starts one intra-op thread per core. For small blocks that is slower, not faster: the
threads synchronise on every small kernel, and on a loaded machine spinning OpenMP threads
compete with each other (``benchmarks/threads.py``; on a 2-core machine the tiny model
generates 14-18x faster on one thread at the sizes measured). ``auto`` therefore gives one thread per
:data:`WORK_PER_THREAD` of per-block work, at least one and at most the available cores.
Non-CPU devices leave PyTorch's setting alone.
"""

from __future__ import annotations

import os

import torch

from packforcing.core.geometry import Geometry

AUTO = "auto"

WORK_PER_THREAD = 2e9
"""Per-block work (:func:`block_work`) worth one more CPU thread, from ``benchmarks/threads.py``."""


def block_work(geometry: Geometry) -> float:
    """A size measure of one block's forward pass: tokens × hidden² × layers."""
    hidden = geometry.num_heads * geometry.head_dim
    return float(geometry.tokens_per_block * hidden * hidden * geometry.num_layers)


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_threads(geometry: Geometry, device: torch.device, *, cores: int | None = None) -> int:
    """The ``auto`` thread count for ``geometry`` on ``device`` (PyTorch's current one off the CPU)."""
    if device.type != "cpu":
        return torch.get_num_threads()
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, int(block_work(geometry) // WORK_PER_THREAD)))


def apply_threads(setting: int | str, geometry: Geometry, device: torch.device) -> int:
    """Set PyTorch's intra-op threads from ``run.threads`` and return the count in use."""
    count = auto_threads(geometry, device) if setting == AUTO else int(setting)
    if device.type == "cpu" or setting != AUTO:
        torch.set_num_threads(count)
    return count
