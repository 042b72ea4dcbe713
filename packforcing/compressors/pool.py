"""``pool``: training-free average pooling of a block's K/V (the baseline compressor).

Keys carry RoPE, so they are not averaged as stored: the rotation is undone at the block's
home grid positions, the keys and values are average-pooled over a ``(t, h, w)`` token window
(the grid is floor-divided; trailing tokens that do not fill a window are dropped), and the
pooled keys are rotated again on the coarse grid at the block's temporal position. A pooled
temporal token spans ``window_t × temporal_stride`` latent frames and a pooled spatial token
``window_h × hw_stride`` full-grid tokens, so the coarse tokens keep the extent of what they
replace. It works on any block, full or already compressed (e.g. a far tier pooling a mid
tier's dual-branch tokens with ``window: [1, 2, 2]``).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from packforcing.core.errors import ParamError
from packforcing.core.geometry import Grid, as_grid
from packforcing.core.interfaces import BlockModel, Compressor
from packforcing.core.records import CachedBlock, CompressedKV
from packforcing.core.validators import int_tuple, positive_triple


def _square(instance: object, attribute: attrs.Attribute, value: tuple[int, int, int]) -> None:
    if value[1] != value[2]:
        raise ParamError(
            attribute.name, f"height and width windows must be equal (RoPE uses one spatial stride), got {value!r}"
        )


@attrs.frozen
class PoolParams:
    """Parameters of ``pool``: the pooling ``window`` in tokens ``[t, h, w]`` (``h == w``)."""

    window: tuple[int, int, int] = attrs.field(
        default=(2, 4, 4), converter=int_tuple, validator=[positive_triple, _square]
    )


def pooled_grid(grid: Grid, window: tuple[int, int, int], name: str) -> Grid:
    """``floor(grid / window)``; a window larger than the grid is a configuration error."""
    out = as_grid(g // w for g, w in zip(grid, window, strict=True))
    if min(out) < 1:
        raise ParamError(name, f"window {list(window)} is larger than the block's token grid {list(grid)}")
    return out


def pool_tokens(x: torch.Tensor, grid: Grid, window: tuple[int, int, int]) -> torch.Tensor:
    """Average ``x [B, N, H, D]`` (t-major ``grid``) over ``window``, floor-cropping the grid."""
    b, _n, h, d = x.shape
    gt, gh, gw = grid
    ot, oh, ow = (g // w for g, w in zip(grid, window, strict=True))
    wt, wh, ww = window
    vol = x.reshape(b, gt, gh, gw, h * d).permute(0, 4, 1, 2, 3)  # [B, H*D, t, h, w]
    vol = vol[:, :, : ot * wt, : oh * wh, : ow * ww]
    pooled = F.avg_pool3d(vol.float(), kernel_size=window, stride=window)
    return pooled.permute(0, 2, 3, 4, 1).reshape(b, ot * oh * ow, h, d).to(x.dtype)


class PoolCompressor(Compressor):
    """Training-free, RoPE-aware average pooling of K/V over a token window.

    See the module docstring."""

    name = "pool"
    needs_latents = False

    def __init__(self, params: PoolParams | None = None) -> None:
        self.params = params or PoolParams()

    @property
    def ratio(self) -> int:
        """Nominal token reduction (the window volume); floor cropping only reduces further."""
        t, h, w = self.params.window
        return t * h * w

    def output_grid(self, grid: Grid) -> Grid:
        return pooled_grid(grid, self.params.window, "window")

    def compress(self, block: CachedBlock, model: BlockModel) -> CompressedKV:
        window = self.params.window
        grid = self.output_grid(block.grid)
        rope = model.rope
        t_stride = block.temporal_stride * window[0]
        hw_stride = block.hw_stride * window[1]
        keys, values = [], []
        device = block.layer_kv(0)[0].device
        # one rotation table each way, shared by every layer (the grids and positions are the same)
        home = rope.grid_positions(block.grid, block.position, block.temporal_stride, block.hw_stride, device=device)
        undo = rope.rotation(-rope.angles(*home))
        redo = rope.rotation(
            rope.angles(*rope.grid_positions(grid, block.position, t_stride, hw_stride, device=device))
        )
        for layer in range(block.num_layers):
            k, v = block.layer_kv(layer)
            raw = rope.rotate(k.float(), undo)
            pooled = pool_tokens(raw, block.grid, window)
            keys.append(rope.rotate(pooled, redo).to(k.dtype))
            values.append(pool_tokens(v, block.grid, window))
        return CompressedKV(
            grid=grid,
            temporal_stride=t_stride,
            position=block.position,
            keys=keys,
            values=values,
            hw_stride=hw_stride,
        )
