"""``topk``: PackForcing's dynamic context selection.

Importance of a candidate block (Deep Forcing's Eq. 7 lineage) is the mean attention logit
``qᵀk / √d`` over a sample of the current block's queries, a subset of heads and all of the
block's keys. The ``k`` most important blocks enter attention, returned in time order; the
others stay in their tier (the bank). Selection is per batch item, and per layer unless
``shared_across_layers`` (then the first layer's queries choose for every layer).

Because the score is a mean of dot products it factorises exactly:
``mean_{i,h,j} q_{ih}·k_{jh} = mean_h (mean_i q_{ih})·(mean_j k_{jh})``, so scoring costs one
pass over the candidates' keys, not ``Nq × Nk`` products. Candidates are scored with their
stored keys (at their home positions): the packed positions depend on the selection itself.

Ties (equal scores) go to the newer block, so the choice is deterministic.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import attrs
import torch
from attrs import validators as v

from packforcing.core.errors import ParamError
from packforcing.core.interfaces import Selector
from packforcing.core.records import CachedBlock
from packforcing.core.validators import explained, fraction, int_tuple, integer, non_negative, positive

_heads = v.optional(
    explained(
        "a non-empty list of head indices >= 0",
        v.instance_of(tuple),
        v.min_len(1),
        v.deep_iterable(v.and_(*integer(v.ge(0)))),
    )
)


@attrs.frozen
class TopKParams:
    """Parameters of ``topk``.

    ``k``: blocks selected. ``query_fraction`` / ``min_queries``: how many of the block's
    queries are sampled (evenly spaced over the t-major token grid: ``max(min_queries,
    ceil(fraction · Nq))``, at most ``Nq``). ``heads``: explicit head indices, or ``None`` for
    ``ceil(head_fraction · H)`` evenly spaced heads. ``shared_across_layers``: select once
    per forward pass (with the first layer's queries) instead of per layer.
    """

    k: int = attrs.field(default=16, validator=positive)
    query_fraction: float = attrs.field(default=0.125, validator=fraction)
    min_queries: int = attrs.field(default=32, validator=non_negative)
    head_fraction: float = attrs.field(default=1.0, validator=fraction)
    heads: tuple[int, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(int_tuple), validator=_heads
    )
    shared_across_layers: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


def query_sample(
    num_queries: int, fraction: float, minimum: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Evenly spaced query indices ``[n]`` (strictly increasing), ``n = max(minimum, ceil(fraction · N))``
    capped at ``N``; made on ``device`` (no host-to-device copy)."""
    n = min(num_queries, max(minimum, math.ceil(fraction * num_queries)))
    n = max(n, 1)
    return torch.arange(n, dtype=torch.int64, device=device) * num_queries // n


def head_sample(num_heads: int, params: TopKParams) -> torch.Tensor:
    """Head indices ``[h]`` the score averages over."""
    if params.heads is not None:
        bad = [h for h in params.heads if h >= num_heads]
        if bad:
            raise ParamError("heads", f"{bad} out of range for {num_heads} heads")
        return torch.tensor(sorted(set(params.heads)), dtype=torch.int64)
    n = max(1, math.ceil(params.head_fraction * num_heads))
    return torch.arange(n, dtype=torch.int64) * num_heads // n


def top_k_in_time_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` largest ``scores [B, C]`` per row, ascending; ties go to
    the larger index (the newer block)."""
    num = scores.shape[-1]
    k = min(k, num)
    # stable sort of the reversed row: among equal scores the newer block comes first
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    chosen = (num - 1) - order[:, :k]
    return torch.sort(chosen, dim=-1).values


class TopKSelector(Selector):
    """Top-``k`` blocks by mean attention logit of sampled queries.

    See the module docstring."""

    name = "topk"

    def __init__(self, params: TopKParams | None = None) -> None:
        self.params = params or TopKParams()
        self.shared_across_layers = self.params.shared_across_layers
        self._means: weakref.WeakKeyDictionary[CachedBlock, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()
        self._samples: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._banks: dict[int, tuple[list[weakref.ref[CachedBlock]], torch.Tensor]] = {}
        """Per layer, the last candidates (weakly) and their stacked key means ``[B, C, h'·D]``:
        a block's forward passes ask about the same candidates at every layer."""
        self.last_scores: torch.Tensor | None = None
        """``[B, C]`` scores of the last :meth:`select` call (for inspection)."""

    def _key_mean(self, block: CachedBlock, layer: int) -> torch.Tensor:
        """Mean stored key ``[B, H, D]`` (float32) of ``block`` at ``layer``, memoised.

        Stored keys never change, so the mean is computed once per block and layer and dropped
        with the block (weak reference): ``H·D`` floats per block and layer, ``1/N`` of its keys.
        """
        per_layer = self._means.get(block)
        if per_layer is None:
            per_layer = self._means[block] = {}
        mean = per_layer.get(layer)
        if mean is None:
            mean = per_layer[layer] = block.layer_kv(layer)[0].float().mean(dim=1)
        return mean

    def _bank(self, candidates: Sequence[CachedBlock], layer: int, heads: torch.Tensor) -> torch.Tensor:
        """Stacked key means ``[B, C, h'·D]`` of ``candidates`` at ``layer`` over ``heads``, scaled
        by the score's ``1 / (h'·√D)`` (one kernel less per call), memoised while the candidates
        stay the same blocks (compared by identity, held weakly)."""
        found = self._banks.get(layer)
        if found is not None:
            refs, bank = found
            if len(refs) == len(candidates) and all(r() is c for r, c in zip(refs, candidates, strict=True)):
                return bank
        bank = torch.stack([self._key_mean(c, layer) for c in candidates], dim=1)  # [B, C, H, D]
        if heads.numel() != bank.shape[2]:  # a subset of heads
            bank = bank.index_select(2, heads)
        bank = bank.flatten(2) / (heads.numel() * math.sqrt(bank.shape[-1]))  # [B, C, h'·D]
        self._banks[layer] = ([weakref.ref(c) for c in candidates], bank)
        return bank

    def _sample(self, num_queries: int, num_heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and head indices on ``device``, made once per shape: a host-made index copied to
        an accelerator on every call would synchronise the two (once per layer and pass)."""
        key = (num_queries, num_heads, device)
        found = self._samples.get(key)
        if found is None:
            qi = query_sample(num_queries, self.params.query_fraction, self.params.min_queries, device)
            found = self._samples[key] = (qi, head_sample(num_heads, self.params).to(device))
        return found

    def budget(self, num_candidates: int) -> int:
        return min(self.params.k, num_candidates)

    def scores(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        """Importance ``[B, C]`` (float32) of each candidate for ``queries [B, Nq, H, D]``."""
        _, nq, h, _ = queries.shape
        qi, hi = self._sample(nq, h, queries.device)
        sampled = queries.index_select(1, qi)
        if hi.numel() != h:  # a subset of heads
            sampled = sampled.index_select(2, hi)
        q_mean = sampled.mean(dim=1, dtype=torch.float32)  # [B, h', D]
        k_mean = self._bank(candidates, layer, hi)  # [B, C, h'·D], scaled
        # Σ_{h,d} q̄_{bhd} k̄_{bchd} / (h'·√d) as one batched matrix-vector product
        return torch.bmm(k_mean, q_mean.flatten(1)[:, :, None])[..., 0]

    def select(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        if not candidates:
            return torch.empty((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
        scores = self.scores(queries, candidates, layer)
        self.last_scores = scores
        return top_k_in_time_order(scores, self.params.k)
