"""Attention over a context in parts, merged exactly by the parts' log-sum-exp.

Softmax attention over keys ``K = K_1 ∪ … ∪ K_P`` is the average of the attention over each part
``K_i`` weighted by that part's share of the softmax denominator: with ``lse_i`` the log of part
``i``'s denominator, the weight is ``exp(lse_i − logsumexp_j lse_j)`` (as flash-decoding merges
its splits). A context can thus attend its history where it is stored, a part at a time, instead
of copying it into one tensor first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_by_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One attention output from the attention over each part of the keys.

    ``parts``: ``(out [B, Nq, H, D], lse [B, Nq, H])`` per part (what
    :meth:`~packforcing.core.interfaces.AttentionBackend.attend_lse` returns), for the same
    queries. Returns ``[B, Nq, H, D]`` in the first output's dtype, accumulated in float32 or the
    log-sum-exp's dtype if wider, and rounded once. One part is returned as it is.

    ``P`` parts take ``P`` elementwise kernels over the output (and two small ones for the
    weights): the last writes the output's dtype itself, so a bf16 merge reads and writes no
    float32 copy beyond its accumulator.
    """
    if not parts:
        raise ValueError("merge_by_lse needs at least one part")
    if len(parts) == 1:
        return parts[0][0]
    outs = [out for out, _ in parts]
    lses = torch.stack([lse for _, lse in parts])
    weights = torch.softmax(lses.to(torch.promote_types(lses.dtype, torch.float32)), dim=0)[..., None]
    merged = outs[0] * weights[0]  # [B, Nq, H, D], promoted to the weights' dtype (float32 or wider)
    for out, weight in zip(outs[1:-1], weights[1:-1], strict=True):
        merged.addcmul_(out, weight)
    if merged.dtype == outs[0].dtype:
        return merged.addcmul_(outs[-1], weights[-1])
    result = torch.empty(merged.shape, dtype=outs[0].dtype, device=merged.device)
    return torch.addcmul(merged, outs[-1], weights[-1], out=result)  # accumulated, then rounded once
