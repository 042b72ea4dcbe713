"""A cache-free oracle for one layer of a tiered context, sharing no code with the policy.

What a tiered context attends, rebuilt from its definition: per batch item, every tier's blocks
in tier order, only the picks of a ``select: true`` tier; the blocks placed at the positions the
realigner's rule gives them (``identity``: where they were stored; ``temporal_rope_shift``:
packed contiguously, ending right before the block (``absolute``) or starting at ``origin``
(``window``)); each block's keys rotated by RoPE computed here from scratch, in float64 (the
rotation at the block's home grid undone, the one at its target applied), never through
:class:`~packforcing.core.rope.Rope3D`; then softmax attention in float64 over those keys and the
block's own. The picks are the context's own, checked against a brute-force selector first
(``topk``: the mean logit over sampled queries, heads and keys, loop by loop; ``recency``: the
newest ``k``), so a near tie that float rounding decides does not fail the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def _ladder(pairs: int, theta: float) -> torch.Tensor:
    """``theta ** (-2j / (2 * pairs))``, ``[pairs]`` float64."""
    return torch.tensor([theta ** (-2 * j / (2 * pairs)) for j in range(pairs)], dtype=torch.float64)


def token_angles(head_dim: int, theta: float, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Wan's 3D RoPE angles ``[N, D/2]`` (float64) of tokens at ``(t, h, w)`` (each ``[N]``): the
    temporal band first, with ``(D − 4·⌊D/6⌋)/2`` channel pairs, then height and width with
    ``⌊D/6⌋`` pairs each, every band its own ladder ``theta ** (−2j / band width)``."""
    spatial = head_dim // 6
    temporal = (head_dim - 4 * spatial) // 2
    ladders = (_ladder(temporal, theta), _ladder(spatial, theta), _ladder(spatial, theta))
    bands = [pos.double()[:, None] * ladder[None] for pos, ladder in zip((t, h, w), ladders, strict=True)]
    return torch.cat(bands, dim=1)


def rope_angles(
    head_dim: int, theta: float, grid: Sequence[int], t0: float, t_stride: float, hw_stride: float
) -> torch.Tensor:
    """:func:`token_angles` of a t-major token ``grid`` whose token ``(i, j, k)`` sits at
    ``(t0 + i·t_stride, j·hw_stride, k·hw_stride)``."""
    gt, gh, gw = grid
    t = torch.tensor([t0 + i * t_stride for i in range(gt) for _ in range(gh * gw)], dtype=torch.float64)
    h = torch.tensor([j * hw_stride for _ in range(gt) for j in range(gh) for _ in range(gw)], dtype=torch.float64)
    w = torch.tensor([k * hw_stride for _ in range(gt * gh) for k in range(gw)], dtype=torch.float64)
    return token_angles(head_dim, theta, t, h, w)


def rotate64(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``x [..., N, H, D]`` with each adjacent channel pair ``(2i, 2i+1)`` turned by ``angles [N, D/2]``, in float64."""
    pairs = x.double().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [N, 1, D/2]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).flatten(-2)


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[N, H, D]`` in float64."""
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def packed_targets(realigner: Any, blocks: Sequence[Any], query_start: float) -> tuple[list[float], float]:
    """Where each of ``blocks`` (in context order) sits by the realigner's rule, and where the
    block being generated sits."""
    frames = [b.num_frames for b in blocks]
    if realigner.name == "identity":
        return [b.position for b in blocks], query_start
    assert realigner.name == "temporal_rope_shift", realigner.name
    if realigner.params.anchor == "absolute":
        return [query_start - sum(frames[i:]) for i in range(len(frames))], query_start
    origin = realigner.params.origin
    return [origin + sum(frames[:i]) for i in range(len(frames))], origin + sum(frames)


def topk_samples(params: Any, nq: int, num_heads: int) -> tuple[list[int], list[int]]:
    """``topk``'s sampled queries and heads from their definitions (not from the selector's
    ``query_sample`` / ``head_sample``): ``n = min(Nq, max(min_queries, ⌈query_fraction·Nq⌉))``
    queries ``i·Nq // n``, and the explicit ``heads`` or ``⌈head_fraction·H⌉`` evenly spaced."""
    n = max(1, min(nq, max(params.min_queries, math.ceil(params.query_fraction * nq))))
    queries = [i * nq // n for i in range(n)]
    if params.heads is not None:
        return queries, sorted(set(params.heads))
    h = max(1, math.ceil(params.head_fraction * num_heads))
    return queries, [i * num_heads // h for i in range(h)]


def topk_scores(params: Any, q: torch.Tensor, blocks: Sequence[Any], layer: int, item: int) -> list[float]:
    """``topk``'s importance of each block for batch item ``item``'s queries ``q [B, Nq, H, D]``:
    the mean of every logit ``q·k/√D`` of the evenly spaced sampled queries, the chosen heads and
    the block's stored keys, in float64 (not factorised through the mean key, as the selector is)."""
    _, nq, num_heads, d = q.shape
    queries, heads = topk_samples(params, nq, num_heads)
    scores = []
    for block in blocks:
        keys = block.layer_kv(layer)[0][item][:, heads].double()  # [N, h', D]
        logits = torch.einsum("ihd,jhd->ihj", q[item, queries][:, heads].double(), keys) / math.sqrt(d)
        scores.append(float(logits.mean()))  # every (query, head, key) logit, averaged
    return scores


def check_picks(selector: Any, q: torch.Tensor, blocks: Sequence[Any], layer: int, item: int, picks: list[int]) -> None:
    """``picks`` (one batch item's) are what the selector must choose from ``blocks``: for
    ``recency`` the newest ``k``; for ``topk`` the ``k`` best by :func:`topk_scores`, in time
    order, ties to the newer block, up to a near tie (then any best ``k`` passes)."""
    count = min(selector.params.k, len(blocks))
    assert len(picks) == count and picks == sorted(set(picks)), picks
    assert all(0 <= i < len(blocks) for i in picks), picks
    if selector.name == "recency":
        assert picks == list(range(len(blocks) - count, len(blocks)))
        return
    assert selector.name == "topk", selector.name
    scores = topk_scores(selector.params, q, blocks, layer, item)
    best = sorted(sorted(range(len(blocks)), key=lambda c: (-scores[c], -c))[:count])
    if picks == best:
        return
    eps = 1e-5 * (1.0 + max(abs(s) for s in scores))
    left_out = [scores[c] for c in range(len(blocks)) if c not in picks]
    assert min(scores[c] for c in picks) >= max(left_out) - eps, (picks, best, scores)


def reference_context_attention(
    policy: Any,
    query: Any,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selections: Mapping[tuple[int, int], torch.Tensor],
    selected_with: tuple[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """The attention output ``[B, N, H, D]`` (float64) of ``policy``'s context for ``query`` at
    ``layer`` given the block's own ``q, k, v``, and the block's position; ``selections`` are the
    context's picks (``(layer, group) → [B, k]``), checked with :func:`check_picks` against the
    queries and layer they were made with (``selected_with``; default ``(layer, q)``)."""
    rope = policy.model.rope
    head_dim, theta = rope.head_dim, rope.theta
    sel_layer, sel_q = selected_with if selected_with is not None else (layer, q)
    groups = []
    for tier in policy.tiers:
        blocks = [b for b in tier.blocks if b.block_id < query.block_id]
        if blocks:
            groups.append((blocks, tier.spec.select))
    outs, positions = [], set()
    for item in range(q.shape[0]):
        context = []
        for g, (blocks, select) in enumerate(groups):
            if not select:
                context.extend(blocks)
                continue
            picks = selections[(layer, g)][item].tolist()
            check_picks(policy.selector, sel_q, blocks, sel_layer, item, picks)
            context.extend(blocks[i] for i in picks)
        targets, position = packed_targets(policy.realigner, context, query.start_frame)
        positions.add(position)
        keys, values = [], []
        for block, target in zip(context, targets, strict=True):
            stored, value = block.layer_kv(layer)
            strides = (block.temporal_stride, block.hw_stride)
            raw = rotate64(stored[item], -rope_angles(head_dim, theta, block.grid, block.position, *strides))
            keys.append(rotate64(raw, rope_angles(head_dim, theta, block.grid, float(target), *strides)))
            values.append(value[item])
        outs.append(attention64(q[item], torch.cat([*keys, k[item].double()]), torch.cat([*values, v[item]])))
    assert len(positions) == 1, positions  # every item's context has as many frames
    return torch.stack(outs), positions.pop()
