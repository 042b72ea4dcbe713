"""Hypothesis strategies for packforcing components: geometries, blocks with K/V, configs.

Everything is small enough to run on a CPU in milliseconds; draw sizes stay within what the
built-in ``tiny_dit`` model supports (even head dims >= 6, latent sizes divisible by the patch).
Use them in your own property tests::

    from hypothesis import given
    from packforcing.testing import strategies as pst

    @given(pst.cached_blocks())
    def test_my_compressor_keeps_batch(block):
        ...

Requires ``hypothesis`` (a test dependency, not a runtime one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from hypothesis import strategies as st

from packforcing.core.geometry import Geometry, Grid
from packforcing.core.records import CachedBlock
from packforcing.testing.blocks import make_block

__all__ = [
    "block_grids",
    "cached_blocks",
    "configs",
    "geometries",
    "spans",
    "tiered_policies",
]


@st.composite
def geometries(
    draw: st.DrawFn,
    *,
    latent_sizes: Sequence[int] = (4, 6, 8),
    max_layers: int = 2,
    max_heads: int = 2,
    head_dims: Sequence[int] = (8, 12, 16),
    patches: Sequence[Grid] = ((1, 2, 2), (2, 2, 2)),
    frames_per_block: Sequence[int] = (2, 3, 4),
    latent_channels: Sequence[int] = (4, 8),
    dtypes: Sequence[str] = ("float32",),
) -> Geometry:
    """Small, valid :class:`Geometry` objects (latent sizes are rounded to the patch)."""
    patch = tuple(draw(st.sampled_from(list(patches))))
    frames = [f for f in frames_per_block if f % patch[0] == 0]
    if not frames:
        frames = [patch[0]]
    ph, pw = patch[1], patch[2]
    height = draw(st.sampled_from([s for s in latent_sizes if s % ph == 0] or [ph * 2]))
    width = draw(st.sampled_from([s for s in latent_sizes if s % pw == 0] or [pw * 2]))
    return Geometry(
        latent_height=height,
        latent_width=width,
        num_layers=draw(st.integers(1, max_layers)),
        num_heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(list(head_dims))),
        latent_channels=draw(st.sampled_from(list(latent_channels))),
        patch=patch,
        frames_per_block=draw(st.sampled_from(frames)),
        dtype=draw(st.sampled_from(list(dtypes))),
    )


def block_grids(geometry: Geometry) -> st.SearchStrategy[Grid]:
    """The full block grid of ``geometry`` or a smaller one (as a compressed tier would hold)."""
    t, h, w = geometry.block_grid
    return st.one_of(
        st.just((t, h, w)),
        st.tuples(st.integers(1, t), st.integers(1, h), st.integers(1, w)),
    )


@st.composite
def cached_blocks(
    draw: st.DrawFn,
    geometry: Geometry | st.SearchStrategy[Geometry] | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 2),
    compressed: bool | None = False,
    latents: bool = True,
    block_id: int | None = None,
) -> CachedBlock:
    """A :class:`CachedBlock` holding seeded random K/V (and clean latents when ``latents``).

    ``compressed``: ``False`` for a full-fidelity block, ``True`` for a block on a smaller grid
    (fidelity ``"compressed"``), ``None`` for either.
    """
    if geometry is None:
        geometry = geometries()
    g = draw(geometry) if isinstance(geometry, st.SearchStrategy) else geometry
    if compressed is None:
        compressed = draw(st.booleans())
    index = draw(st.integers(0, 40)) if block_id is None else block_id
    grid = draw(block_grids(g)) if compressed else g.block_grid
    t_stride = float(g.patch[0]) * (g.block_grid[0] / grid[0] if compressed else 1.0)
    return make_block(
        g,
        block_id=index,
        batch_size=draw(st.sampled_from(list(batch_sizes))),
        grid=grid,
        temporal_stride=t_stride,
        hw_stride=float(g.block_grid[1] // grid[1]) if compressed else 1.0,
        fidelity="compressed" if compressed else "full",
        latents=latents,
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([1.0, 0.01, 30.0])),
    )


@st.composite
def spans(
    draw: st.DrawFn, frames_per_block: int = 4, *, max_blocks: int = 10, gaps: bool = True
) -> tuple[list[tuple[float, float]], int]:
    """``(spans, query_start)``: time-ordered ``(home position, num_frames)`` of context blocks
    (whole blocks at their absolute positions, possibly with gaps where blocks were skipped)
    and the first frame of the block being generated."""
    total = draw(st.integers(0, max_blocks))
    if gaps:
        kept = draw(st.lists(st.booleans(), min_size=total, max_size=total))
    else:
        kept = [True] * total
    out = [(float(i * frames_per_block), float(frames_per_block)) for i, keep in enumerate(kept) if keep]
    return out, total * frames_per_block


@st.composite
def tiered_policies(
    draw: st.DrawFn,
    frames_per_block: int = 4,
    *,
    compressed: bool = False,
    select: bool = False,
    max_blocks: int = 4,
) -> dict[str, Any]:
    """A valid ``policy: {name: tiered, ...}`` block: an optional pinned sink, an optional mid
    tier (``fidelity: compressed`` when ``compressed``; ``select: true`` sometimes when
    ``select``) and a full-fidelity recent tier."""
    f = frames_per_block
    tiers: list[dict[str, Any]] = []
    if draw(st.booleans()):
        tiers.append({"name": "sink", "frames": f * draw(st.integers(0, max_blocks)), "pinned": True})
    if compressed or draw(st.booleans()):
        mid: dict[str, Any] = {"name": "mid", "blocks": draw(st.integers(1, max_blocks))}
        if compressed:
            mid["fidelity"] = "compressed"
        if select and draw(st.booleans()):
            mid["select"] = True
        tiers.append(mid)
    recent_frames = f * draw(st.integers(1, max_blocks)) + draw(st.integers(0, f - 1))
    tiers.append({"name": "recent", "frames": recent_frames})
    return {
        "name": "tiered",
        "tiers": tiers,
        "overflow": draw(st.sampled_from(["drop", "archive"])),
        "page_blocks": draw(st.integers(1, 4)),
    }


@st.composite
def configs(
    draw: st.DrawFn,
    *,
    compressor: dict[str, Any] | None = None,
    selector: dict[str, Any] | None = None,
    realigner: dict[str, Any] | None = None,
    geometry: st.SearchStrategy[Geometry] | None = None,
    max_blocks: int = 6,
) -> dict[str, Any]:
    """A valid config mapping for :func:`packforcing.load_config` on the CPU: a small
    ``tiny_dit``, one of the policies ``full``, ``sliding_window``, ``sink_recent`` or ``tiered``
    (with ``fidelity: compressed`` tiers using ``compressor`` when given, and ``select: true``
    tiers using ``selector`` when given, and the ``realigner`` when given), the ``sdpa`` backend and
    a short run."""
    g = draw(geometry if geometry is not None else geometries())
    f = g.frames_per_block
    kind = draw(st.sampled_from(["full", "sliding_window", "sink_recent", "tiered"]))
    if compressor is not None:
        kind = "tiered"
    policy: dict[str, Any]
    if kind == "full":
        policy = {"name": "full"}
    elif kind == "sliding_window":
        policy = {"name": "sliding_window", "window_frames": draw(st.integers(f, 4 * f))}
    elif kind == "sink_recent":
        policy = {
            "name": "sink_recent",
            "sink_frames": draw(st.integers(0, 3 * f)),
            "window_frames": draw(st.integers(f, 4 * f)),
        }
    else:
        policy = draw(tiered_policies(f, compressed=compressor is not None, select=selector is not None))
    config: dict[str, Any] = {
        "model": {
            "name": "tiny_dit",
            **{k: v for k, v in attrs.asdict(g).items() if k not in ("num_heads", "head_dim", "dtype")},
            "hidden_size": g.num_heads * g.head_dim,
            "num_heads": g.num_heads,
            "seed": draw(st.integers(0, 3)),
        },
        "policy": policy,
        "backend": "sdpa",
        "sampler": {"steps": draw(st.integers(1, 2))},
        "run": {
            "device": "cpu",
            "dtype": g.dtype,
            "blocks": draw(st.integers(1, max_blocks)),
            "seed": draw(st.integers(0, 1000)),
            "batch_size": draw(st.integers(1, 2)),
        },
    }
    if compressor is not None:
        config["compressor"] = dict(compressor)
    if selector is not None:
        config["selector"] = dict(selector)
    if realigner is not None:
        config["realigner"] = dict(realigner)
    config["model"]["patch"] = list(g.patch)
    return config
