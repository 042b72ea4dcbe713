"""The attention-matching objective of the ``dual_branch`` compressor.

A compressed block ``X`` is good if a later block ``Y`` reads the same thing from it as from its
full K/V; per layer ``l``::

    full_l = attn(q_Y, [K_X      | K_Y], [V_X      | V_Y])     # X at full resolution
    comp_l = attn(q_Y, [K_X^comp | K_Y], [V_X^comp | V_Y])     # X compressed
    drop_l = attn(q_Y,            K_Y ,             V_Y )      # X absent

    loss = Σ_l mean|comp_l − full_l|² / Σ_l mean|drop_l − full_l|²

(1.0: as bad as dropping the block; 0.0: perfect). :func:`dual_branch_kv` gives the network's
compressed K/V through the model's own projections, :func:`pool_kv` the training-free baseline's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from packforcing.compressors.dual_branch import (
    SPATIAL_REDUCTION,
    TEMPORAL_REDUCTION,
    DualBranchNet,
    compressed_grid,
)
from packforcing.compressors.pool import pool_tokens, pooled_grid
from packforcing.core.interfaces import BlockModel, keys_take_condition
from packforcing.training.data import Batch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_loss(
    model: BlockModel,
    batch: Batch,
    compressed: Callable[[Batch], tuple[list[torch.Tensor], list[torch.Tensor]]] | None,
) -> torch.Tensor:
    """The objective of the module docstring for ``compressed(batch) -> (keys, values)`` per
    layer ``[M, N', H, D]`` (keys rotated at ``batch.target``); ``None`` drops the block (1.0)."""
    rope = model.rope
    full_keys = rope.shift_temporal(batch.keys.flatten(1, 2), batch.target - batch.home).view_as(batch.keys)
    compressed_kv = compressed(batch) if compressed is not None else None
    num = torch.zeros((), dtype=torch.float32)
    den = torch.zeros((), dtype=torch.float32)
    for layer in range(batch.q.shape[1]):
        q, k, v = batch.q[:, layer], batch.k[:, layer], batch.v[:, layer]
        full = _attend(q, torch.cat([full_keys[:, layer], k], 1), torch.cat([batch.values[:, layer], v], 1))
        drop = _attend(q, k, v)
        den = den + (drop - full).pow(2).mean()
        if compressed_kv is None:
            num = num + (drop - full).pow(2).mean()
        else:
            ck, cv = compressed_kv
            comp = _attend(q, torch.cat([ck[layer], k], 1), torch.cat([cv[layer], v], 1))
            num = num + (comp - full).pow(2).mean()
    return num / den


def dual_branch_kv(
    net: DualBranchNet, model: BlockModel
) -> Callable[[Batch], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``batch -> per-layer (keys, values)`` of the network's compressed tokens at ``batch.target``."""
    g = model.geometry
    grid = compressed_grid(g.block_grid)
    t_stride = float(g.patch[0] * TEMPORAL_REDUCTION)

    def kv(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tokens = net(batch.latents, model.codec, grid).flatten(2).transpose(1, 2)
        extra = {"condition": batch.scene} if batch.scene is not None and keys_take_condition(model) else {}
        keys, values = model.project_kv(tokens, grid, 0.0, t_stride, float(SPATIAL_REDUCTION), **extra)
        return [model.rope.shift_temporal(k, batch.target) for k in keys], values

    return kv


def pool_kv(
    model: BlockModel, window: tuple[int, int, int] = (2, 4, 4)
) -> Callable[[Batch], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The training-free ``pool`` baseline on the same examples."""
    g = model.geometry
    rope = model.rope
    grid = g.block_grid
    out = pooled_grid(grid, window, "window")
    t_stride = float(g.patch[0])

    def kv(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in range(batch.keys.shape[1]):
            at_zero = rope.shift_temporal(batch.keys[:, layer], -batch.home)
            raw = rope.unapply_grid(at_zero, grid, 0.0, t_stride)
            pooled = rope.apply_grid(pool_tokens(raw, grid, window), out, 0.0, t_stride * window[0], window[1])
            keys.append(rope.shift_temporal(pooled, batch.target))
            values.append(pool_tokens(batch.values[:, layer], grid, window))
        return keys, values

    return kv
