"""Attention contexts: what a forward pass attends besides the block itself."""

from __future__ import annotations

import torch

from packforcing.core.interfaces import AttentionBackend, AttentionContext


class EmptyContext(AttentionContext):
    """No history: the block attends only to itself (the first block, or a model probe)."""

    def __init__(self, backend: AttentionBackend, position: float = 0.0) -> None:
        self._backend = backend
        self._position = position

    @property
    def position(self) -> float:
        return self._position

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._backend.attend(q, k, v)


class MaskedContext(AttentionContext):
    """The whole sequence is the "block"; history is expressed by a token mask.

    Used by the cache-free oracle: the model runs once over every frame with ``mask
    [N, N]`` (``True`` = may attend), so no cache is involved.
    """

    def __init__(self, backend: AttentionBackend, mask: torch.Tensor, position: float = 0.0) -> None:
        self._backend = backend
        self._mask = mask
        self._position = position

    @property
    def position(self) -> float:
        return self._position

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._backend.attend(q, k, v, self._mask.to(q.device))
