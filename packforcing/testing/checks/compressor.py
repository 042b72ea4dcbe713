"""The compressor contracts, one function each, and :func:`check_compressor` that runs them all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from packforcing.core.geometry import Geometry, Grid
from packforcing.core.interfaces import BlockModel, Compressor
from packforcing.core.records import CachedBlock, CompressedKV
from packforcing.testing.blocks import build_component, make_block, make_env
from packforcing.testing.checks._common import (
    block_tensors,
    contract,
    describe,
    fail,
    geometries_strategy,
    run_examples,
    snapshot,
    unchanged,
)

KIND = "compressor"


@contract
def is_a_compressor(comp: Any) -> None:
    """An instance of :class:`Compressor` with a usable name and a bool ``needs_latents``."""
    if not isinstance(comp, Compressor):
        fail(KIND, comp, f"is a {type(comp).__name__}, not a packforcing.core.interfaces.Compressor")
    if not isinstance(comp.name, str) or not comp.name or comp.name == "full":
        fail(KIND, comp, f"name must be a non-empty string other than 'full', got {comp.name!r}")
    if not isinstance(comp.needs_latents, bool):
        fail(KIND, comp, f"needs_latents must be a bool, got {comp.needs_latents!r}")


@contract
def output_grid_is_valid(comp: Compressor, grid: Grid, out: Any) -> None:
    """``output_grid(grid)``: three ints >= 1, deterministic, no more tokens than ``grid``."""
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(v, int) and v >= 1 for v in out)):
        fail(KIND, comp, f"output_grid({grid}) must be a tuple of three ints >= 1, got {out!r}")
    if comp.output_grid(grid) != out:
        fail(KIND, comp, f"output_grid({grid}) is not deterministic")
    if math.prod(out) > math.prod(grid):
        fail(KIND, comp, f"output_grid({grid}) = {out} has more tokens than its input")


@contract
def works_without_latents(comp: Compressor, block: CachedBlock, model: BlockModel) -> CompressedKV:
    """``compress`` works on a block without latents unless the compressor sets ``needs_latents``."""
    try:
        return comp.compress(block, model)
    except Exception as exc:
        if comp.needs_latents:
            raise
        fail(
            KIND,
            comp,
            "compress() failed on a block without latents (blocks carry latents only when the compressor "
            f"sets needs_latents = True): {describe(exc)}",
        )
        raise  # unreachable: fail() raises


@contract
def returns_the_declared_kv(
    comp: Compressor, ckv: Any, block: CachedBlock, grid: Grid, g: Geometry, batch: int
) -> None:
    """A :class:`CompressedKV` on exactly ``output_grid``'s grid: one finite ``[B, N', H, D]`` key and
    value per layer in the block's dtype and device, fresh (not views of the block's tensors),
    positive strides, every temporal token inside the block's time span and every spatial one
    inside its height and width."""
    if not isinstance(ckv, CompressedKV):
        fail(KIND, comp, f"compress() must return a CompressedKV, got {type(ckv).__name__}")
    if tuple(ckv.grid) != tuple(grid):
        fail(KIND, comp, f"compress() produced grid {ckv.grid}, but output_grid() said {grid}")
    if len(ckv.keys) != g.num_layers or len(ckv.values) != g.num_layers:
        fail(KIND, comp, f"expected {g.num_layers} layers of keys and values, got {len(ckv.keys)}/{len(ckv.values)}")
    shape = (batch, math.prod(grid), g.num_heads, g.head_dim)
    dtype, device = block.keys[0].dtype, block.keys[0].device
    for what, tensors in (("keys", ckv.keys), ("values", ckv.values)):
        for layer, x in enumerate(tensors):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                fail(KIND, comp, f"{what} of layer {layer}: expected shape {shape} [B, N', H, D], got {got}")
            if x.dtype != dtype:
                fail(KIND, comp, f"{what} of layer {layer}: dtype {x.dtype}, expected the block's {dtype}")
            if x.device != device:
                fail(KIND, comp, f"{what} of layer {layer}: on {x.device}, expected the block's device {device}")
            if not bool(torch.isfinite(x).all()):
                fail(KIND, comp, f"{what} of layer {layer}: non-finite values")
    stride, position = ckv.temporal_stride, ckv.position
    if not (isinstance(stride, (int, float)) and math.isfinite(stride) and stride > 0):
        fail(KIND, comp, f"temporal_stride must be a finite number > 0, got {stride!r}")
    hw_stride = ckv.hw_stride
    if not (isinstance(hw_stride, (int, float)) and math.isfinite(hw_stride) and hw_stride > 0):
        fail(KIND, comp, f"hw_stride must be a finite number > 0, got {hw_stride!r}")
    if not (isinstance(position, (int, float)) and math.isfinite(position)):
        fail(KIND, comp, f"position must be a finite number, got {position!r}")
    for axis, size, tokens in (("height", g.block_grid[1], grid[1]), ("width", g.block_grid[2], grid[2])):
        if (tokens - 1) * hw_stride >= size * block.hw_stride - 1e-9:  # spatial positions j * hw_stride
            fail(
                KIND,
                comp,
                f"{tokens} tokens {hw_stride:g} apart along the {axis} reach past the block's "
                f"{size} tokens {block.hw_stride:g} apart: hw_stride does not match the grid",
            )
    held = {t.untyped_storage().data_ptr() for t in (*block.keys, *block.values)}
    for what, tensors in (("keys", ckv.keys), ("values", ckv.values)):
        if any(x.untyped_storage().data_ptr() in held for x in tensors):
            fail(KIND, comp, f"{what}: compress() returned views of the block's own tensors (return fresh tensors)")
    first, last = position, position + (grid[0] - 1) * stride
    start, end = block.position, block.position + block.num_frames
    if first < start - 1e-9 or last >= end - 1e-9:
        fail(
            KIND,
            comp,
            f"temporal tokens at positions {first:g}..{last:g} fall outside the block's span [{start:g}, {end:g})",
        )


@contract
def leaves_the_block_untouched(comp: Compressor, before: Sequence[torch.Tensor | None], block: CachedBlock) -> None:
    """``compress`` never writes to the block's keys, values or latents."""
    if not unchanged(before, block_tensors(block)):
        fail(KIND, comp, "compress() modified the block it was given (keys, values or latents)")


def same_kv(a: CompressedKV, b: Any) -> bool:
    return (
        isinstance(b, CompressedKV)
        and tuple(a.grid) == tuple(b.grid)
        and a.position == b.position
        and a.temporal_stride == b.temporal_stride
        and all(torch.equal(x, y) for x, y in zip(a.keys, b.keys, strict=True))
        and all(torch.equal(x, y) for x, y in zip(a.values, b.values, strict=True))
    )


@contract
def is_deterministic(comp: Compressor, ckv: CompressedKV, block: CachedBlock, model: BlockModel) -> None:
    """Two calls on the same block give identical K/V."""
    if not same_kv(ckv, comp.compress(block, model)):
        fail(KIND, comp, "compress() is not deterministic: two calls on the same block differ")


@contract
def rebuilds_identically(
    comp: Compressor, other: Compressor, ckv: CompressedKV, block: CachedBlock, model: Any
) -> None:
    """Two fresh builds with the same parameters compress identically (seeded initialisation)."""
    if not same_kv(ckv, other.compress(block, model)):
        fail(KIND, comp, "two fresh builds with the same parameters compress differently (unseeded init?)")


@contract
def treats_batch_items_independently(
    comp: Compressor, ckv: CompressedKV, block: CachedBlock, g: Geometry, model: BlockModel, atol: float
) -> None:
    """Each batch item compresses as it would alone."""
    for item in range(block.keys[0].shape[0]):
        single = make_block(
            g,
            block_id=block.block_id,
            keys=[k[item : item + 1].clone() for k in block.keys],
            values=[v[item : item + 1].clone() for v in block.values],
            latents=block.latents[item : item + 1].clone() if block.latents is not None else False,
        )
        alone = comp.compress(single, model)
        for what, batched, single_kv in (("keys", ckv.keys, alone.keys), ("values", ckv.values, alone.values)):
            for layer, (a, b) in enumerate(zip(batched, single_kv, strict=True)):
                if not torch.allclose(a[item : item + 1].float(), b.float(), atol=atol, rtol=1e-4):
                    fail(KIND, comp, f"batch item {item} depends on the other items ({what}, layer {layer})")


def check_compressor(
    factory: Any,
    params: Any = None,
    *,
    geometries: Any = None,
    max_examples: int | None = None,
    batch_sizes: Sequence[int] = (1, 2),
    rebuild: bool = True,
    atol: float = 1e-5,
    hypothesis_settings: Any = None,
) -> None:
    """Check a compressor against every compressor contract of this module.

    ``geometries``: a :class:`Geometry` or a strategy of them, for compressors that need a
    minimum size (default: latents 8–16 wide, 1–2 layers and heads). Examples whose full block
    grid ``output_grid`` refuses with ``ValueError`` (too small) are skipped. ``rebuild``:
    also require two fresh builds to compress identically (seeded initialisation).
    """
    from hypothesis import assume, given
    from hypothesis import strategies as st

    @given(
        g=geometries_strategy(geometries, latent_sizes=(8, 12, 16)),
        batch=st.sampled_from(list(batch_sizes)),
        seed=st.integers(0, 2**31 - 1),
    )
    def run(g: Geometry, batch: int, seed: int) -> None:
        env = make_env(g)
        model = env.model
        assert model is not None
        comp = build_component(factory, params, env, KIND, Compressor)
        is_a_compressor(comp)
        grid = g.block_grid
        try:
            out = comp.output_grid(grid)
        except ValueError:
            assume(False)  # this compressor cannot compress a block this small
            return
        output_grid_is_valid(comp, grid, out)
        block = make_block(g, block_id=3, batch_size=batch, latents=comp.needs_latents, seed=seed)
        before = snapshot(block_tensors(block))
        ckv = works_without_latents(comp, block, model)
        returns_the_declared_kv(comp, ckv, block, out, g, batch)
        leaves_the_block_untouched(comp, before, block)
        is_deterministic(comp, ckv, block, model)
        if rebuild:
            rebuilds_identically(
                comp, build_component(factory, params, make_env(g), KIND, Compressor), ckv, block, model
            )
        if batch > 1:
            treats_batch_items_independently(comp, ckv, block, g, model, atol)

    run_examples(run, max_examples, hypothesis_settings)
