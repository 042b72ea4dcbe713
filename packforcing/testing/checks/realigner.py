"""The positional realigner contracts, one function each, and :func:`check_realigner` that runs them all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import PositionalRealigner
from packforcing.core.records import BlockQuery, CachedBlock
from packforcing.testing.blocks import build_component, make_block, make_env, make_query
from packforcing.testing.checks._common import contract, fail, geometries_strategy, run_examples

KIND = "realigner"

Span = tuple[float, float]


@contract
def is_a_realigner(realigner: Any) -> None:
    """An instance of :class:`PositionalRealigner`."""
    if not isinstance(realigner, PositionalRealigner):
        fail(KIND, realigner, f"is a {type(realigner).__name__}, not a PositionalRealigner")


@contract
def assigns_ordered_positions(
    realigner: PositionalRealigner, spans: Sequence[Span], query: BlockQuery
) -> tuple[list[float], float]:
    """``assign`` leaves the spans alone and returns one finite position per span, in time order
    without overlaps, all before the query's position; deterministically."""
    given_spans = list(spans)
    result = realigner.assign(given_spans, query)
    if given_spans != list(spans):
        fail(KIND, realigner, "assign() modified the spans it was given")
    if not (isinstance(result, tuple) and len(result) == 2):
        fail(KIND, realigner, f"assign() must return (targets, query position), got {result!r}")
    targets, qpos = result
    if len(targets) != len(spans):
        fail(KIND, realigner, f"assign() returned {len(targets)} targets for {len(spans)} spans")
    if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in [*targets, qpos]):
        fail(KIND, realigner, f"assign() returned non-finite or non-numeric positions: {targets}, {qpos!r}")
    ends = [t + n for t, (_, n) in zip(targets, spans, strict=True)]
    for i in range(len(targets) - 1):
        if ends[i] > targets[i + 1] + 1e-6:
            fail(KIND, realigner, f"blocks {i} and {i + 1} overlap or are out of time order: {targets}")
    if ends and ends[-1] > qpos + 1e-6:
        fail(KIND, realigner, f"the context ends at {ends[-1]:g}, after the query position {qpos:g}")
    again_targets, again_qpos = realigner.assign(list(spans), query)
    if (list(again_targets), again_qpos) != (list(targets), qpos):
        fail(KIND, realigner, "assign() is not deterministic")
    return list(targets), qpos


@contract
def query_position_depends_only_on_the_count(
    realigner: PositionalRealigner, subset_a: Sequence[Span], subset_b: Sequence[Span], query: BlockQuery
) -> None:
    """Two contexts with as many blocks put the query at the same position (selection may not move it)."""
    qa = realigner.assign(list(subset_a), query)[1]
    qb = realigner.assign(list(subset_b), query)[1]
    if qa != qb:
        fail(
            KIND,
            realigner,
            f"the query position depends on which blocks are selected ({qa} vs {qb} for {len(subset_a)} blocks); "
            "it may depend only on how many",
        )


@contract
def realign_is_a_rotation(
    realigner: PositionalRealigner, block: CachedBlock, shift: float, rope: Any, exact_rope: bool
) -> None:
    """``realign`` keeps shape, dtype, device and per-head norms, does not write to its input,
    leaves keys at their home unchanged and (``exact_rope``) equals the model's temporal RoPE shift."""
    keys = block.keys[0]
    before = keys.clone()
    home = block.position
    moved = realigner.realign(keys, block, home + shift, rope)
    if not torch.equal(keys, before):
        fail(KIND, realigner, "realign() modified the keys it was given")
    if not isinstance(moved, torch.Tensor) or moved.shape != keys.shape:
        fail(KIND, realigner, "realign() must return keys of the input's shape")
    if moved.dtype != keys.dtype or moved.device != keys.device:
        fail(KIND, realigner, f"realign() changed dtype/device to {moved.dtype}/{moved.device}")
    if not torch.allclose(moved.float().norm(dim=-1), keys.float().norm(dim=-1), rtol=1e-4, atol=1e-5):
        fail(KIND, realigner, "realign() changed per-head key norms: it must be a rotation")
    if not torch.allclose(realigner.realign(keys, block, home, rope), keys):
        fail(KIND, realigner, "realign() to the block's own position must leave keys unchanged")
    if exact_rope and not torch.allclose(moved, rope.shift_temporal(keys, shift), rtol=1e-5, atol=1e-5):
        fail(KIND, realigner, f"realign() by {shift:g} differs from the temporal RoPE shift")


@contract
def accepts_per_item_targets(realigner: PositionalRealigner, block: CachedBlock, shift: float, rope: Any) -> None:
    """A ``[B]`` tensor of targets equals per-item float targets."""
    keys = block.keys[0]
    batch = keys.shape[0]
    home = block.position
    per_item = torch.tensor([home + shift + i for i in range(batch)], dtype=torch.float64)
    batched = realigner.realign(keys, block, per_item, rope)
    for i in range(batch):
        alone = realigner.realign(keys[i : i + 1], block, home + shift + i, rope)
        if not torch.allclose(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6):
            fail(KIND, realigner, "realign() with a [B] tensor target differs from per-item float targets")


@contract
def capability_flags_hold(realigner: PositionalRealigner, spans: Sequence[Span], query: BlockQuery) -> None:
    """``targets_from_frames``: moving the spans' home positions (same frame counts) does not
    change the targets. ``rotates = False``: the targets are the home positions. (Contexts rely on
    either to keep a selector's picks on the device.)"""
    targets, _ = realigner.assign(list(spans), query)
    if realigner.targets_from_frames:
        moved = [(home - 5.0 + 7.0 * i, n) for i, (home, n) in enumerate(spans)]  # other homes and gaps, same order
        if list(realigner.assign(moved, query)[0]) != list(targets):
            fail(KIND, realigner, "declares targets_from_frames, but assign() depends on the home positions")
    if not realigner.rotates and [float(t) for t in targets] != [float(home) for home, _ in spans]:
        fail(KIND, realigner, f"declares rotates = False, but assign() moves blocks: {targets}")


@contract
def gather_shifted_moves_like_realign(
    realigner: PositionalRealigner, block: CachedBlock, shift: float, rope: Any, tail: torch.Tensor
) -> None:
    """``gather_shifted`` with one shift per token equals realigning the block (one
    rotation from its home position) followed by ``tail``; ``None`` shifts concatenate only."""
    keys = block.keys[0]
    before = keys.clone()
    n = keys.shape[1]
    deltas = torch.full((1, n), float(shift), dtype=torch.float64, device=keys.device)
    got = realigner.gather_shifted([keys], deltas, rope, tail)
    want = torch.cat([realigner.realign(keys, block, block.position + shift, rope), tail], dim=1)
    if not torch.equal(keys, before):
        fail(KIND, realigner, "gather_shifted() modified the keys it was given")
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        fail(KIND, realigner, f"gather_shifted() by {shift:g} differs from realign() followed by the tail")
    if not torch.equal(realigner.gather_shifted([keys], None, rope, tail), torch.cat([keys, tail], dim=1)):
        fail(KIND, realigner, "gather_shifted() without shifts must only concatenate")


@contract
def query_shifter_scores_like_moved_keys(
    realigner: PositionalRealigner, block: CachedBlock, shift: float, rope: Any, q: torch.Tensor
) -> None:
    """``shifts_query``: the query moved by ``−shift`` (:meth:`~PositionalRealigner.query_shifter`)
    scores the stored keys as the query scores them moved by ``+shift`` (``gather_shifted``), and
    the query it was given is not modified. (A split context relies on it to attend a moved run
    of keys where it is stored.)"""
    if not realigner.shifts_query:
        return
    keys = block.keys[0]
    before = q.clone()
    delta = torch.tensor([float(shift)], dtype=torch.float64, device=q.device)
    moved_q = realigner.query_shifter(delta, rope)(q)
    if not torch.equal(q, before):
        fail(KIND, realigner, "query_shifter()'s function modified the query it was given")
    if not isinstance(moved_q, torch.Tensor) or moved_q.shape != q.shape or moved_q.dtype != q.dtype:
        fail(KIND, realigner, "query_shifter()'s function must return a query of the input's shape and dtype")
    deltas = torch.full((1, keys.shape[1]), float(shift), dtype=torch.float64, device=keys.device)
    moved_k = realigner.gather_shifted([keys], deltas, rope, keys[:, :0])
    got = torch.einsum("bqhd,bkhd->bhqk", moved_q.double(), keys.double())
    want = torch.einsum("bqhd,bkhd->bhqk", q.double(), moved_k.double())
    scale = float(want.abs().max()) or 1.0
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
        fail(
            KIND,
            realigner,
            f"declares shifts_query, but the query moved by {-shift:g} scores the keys differently "
            f"from the keys moved by {shift:g} (max |diff| {float((got - want).abs().max()):.3g})",
        )


def check_realigner(
    factory: Any,
    params: Any = None,
    *,
    geometries: Any = None,
    max_examples: int | None = None,
    exact_rope: bool = True,
    hypothesis_settings: Any = None,
) -> None:
    """Check a positional realigner against every realigner contract of this module.
    ``exact_rope=False`` for realigners whose ``realign`` is not the model's temporal RoPE shift
    from the stored position (e.g. keys stored without RoPE)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from packforcing.testing import strategies as pst

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[Geometry, list[Span], int, int, int, float, int]:
        g = draw(geometries_strategy(geometries))
        spans, query_start = draw(pst.spans(g.frames_per_block))
        keep = draw(st.integers(0, len(spans)))
        return (
            g,
            spans,
            query_start,
            keep,
            draw(st.sampled_from([1, 2])),
            draw(st.floats(-64, 64, allow_nan=False).map(lambda x: round(x * 4) / 4)),
            draw(st.integers(0, 2**31 - 1)),
        )

    @given(case=cases(), data=st.data())
    def run(case: tuple[Any, ...], data: st.DataObject) -> None:
        g, spans, query_start, keep, batch, shift, seed = case
        env = make_env(g)
        assert env.model is not None
        rope = env.model.rope
        realigner = build_component(factory, params, env, KIND, PositionalRealigner)
        is_a_realigner(realigner)
        query = make_query(g, query_start // g.frames_per_block)
        assigns_ordered_positions(realigner, spans, query)
        capability_flags_hold(realigner, spans, query)
        if keep < len(spans):
            chosen = data.draw(st.lists(st.integers(0, len(spans) - 1), min_size=keep, max_size=keep, unique=True))
            query_position_depends_only_on_the_count(realigner, spans[:keep], [spans[i] for i in sorted(chosen)], query)
        block = make_block(g, block_id=max(0, query.block_id - 1), batch_size=batch, latents=False, seed=seed)
        realign_is_a_rotation(realigner, block, shift, rope, exact_rope)
        accepts_per_item_targets(realigner, block, shift, rope)
        if exact_rope:
            gather_shifted_moves_like_realign(realigner, block, shift, rope, block.keys[-1])
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(tuple(block.keys[0].shape), generator=gen).to(block.keys[0])
        query_shifter_scores_like_moved_keys(realigner, block, shift, rope, q)

    run_examples(run, max_examples, hypothesis_settings)
