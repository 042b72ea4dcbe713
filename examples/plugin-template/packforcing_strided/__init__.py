"""``strided``: keep every ``stride``-th cached token along (time, height, width).

A packforcing plugin in one module. packforcing finds it through the ``packforcing`` entry
point in ``pyproject.toml``, calls :func:`packforcing_compressors` and registers the class it
returns; YAML then selects it with ``compressor: {name: strided, stride: [1, 2, 2]}``.

Subsampling keeps real tokens, so their keys are already rotated (RoPE) at exactly the
positions of the coarse grid: temporal token ``i`` of the output sits at
``position + i * temporal_stride`` with ``temporal_stride = stride_t * block.temporal_stride``,
and spatial token ``j`` at ``j * hw_stride``. Nothing is re-rotated and nothing is averaged.
"""

from __future__ import annotations

import math

import attrs
import torch

from packforcing.api import BlockModel, CachedBlock, CompressedKV, Compressor, Grid, ParamError, hookimpl, int_tuple

__version__ = "0.1.0"


def _stride(instance: object, attribute: attrs.Attribute, value: tuple[int, int, int]) -> None:
    # A ParamError carries the parameter's key path: packforcing reports it as
    # "<file>: compressor.stride: ..." on one line.
    if len(value) != 3 or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ParamError(attribute.name, f"expected three integers >= 1, got {list(value)}")
    if value[1] != value[2]:
        raise ParamError(attribute.name, f"height and width strides must be equal, got {list(value)}")


@attrs.frozen
class StridedCompressor(Compressor):
    """Keep every n-th K/V token along time/height/width (plugin template).

    An attrs class is its own parameters: the YAML block is ``name: strided`` plus its fields,
    here ``stride: [t, h, w]`` in tokens (``h == w``).
    """

    stride: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=int_tuple, validator=_stride)

    needs_latents = False  # works on K/V alone: tiers feeding it need not keep latents

    def output_grid(self, grid: Grid) -> Grid:
        t, h, w = (math.ceil(g / s) for g, s in zip(grid, self.stride, strict=True))
        return t, h, w

    def compress(self, block: CachedBlock, model: BlockModel) -> CompressedKV:
        st, sh, _ = self.stride
        return CompressedKV(
            grid=self.output_grid(block.grid),
            temporal_stride=block.temporal_stride * st,
            position=block.position,
            # block.keys / block.values: per-layer [B, N, H, D] views into the cache; never write to them
            keys=[self._subsample(k, block.grid) for k in block.keys],
            values=[self._subsample(v, block.grid) for v in block.values],
            hw_stride=block.hw_stride * sh,
        )

    def _subsample(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        st, sh, sw = self.stride
        b, _, heads, dim = x.shape
        kept = x.reshape(b, *grid, heads, dim)[:, ::st, ::sh, ::sw]
        return kept.reshape(b, -1, heads, dim).clone()  # a copy, never a view of the cache


@hookimpl
def packforcing_compressors():
    """``name -> component class``: the registry names it, reads its parameters and description."""
    return {"strided": StridedCompressor}
