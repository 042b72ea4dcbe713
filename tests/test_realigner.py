"""The ``temporal_rope_shift`` realigner: packed positions, temporal-band-only rotation from the
home position, and precision that does not decay with video length."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packforcing as pf
from packforcing.attention.backends import SdpaBackend
from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import AttentionBackend, PositionalRealigner, Selector
from packforcing.core.records import BlockCommit, BlockQuery, CachedBlock
from packforcing.core.rope import Rope3D
from packforcing.policies.tiered import TieredParams, TieredPolicy, TierSpec
from packforcing.positional import TemporalRopeShift, TemporalRopeShiftParams

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class RecordingRealigner(PositionalRealigner):
    """Delegates to ``inner`` and records ``(block_id, target, realigned keys)`` per realign call."""

    def __init__(self, inner: PositionalRealigner) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[tuple[int, float, torch.Tensor]] = []

    def assign(self, spans, query):
        return self.inner.assign(spans, query)

    def realign(self, keys, block, target, rope):
        out = self.inner.realign(keys, block, target, rope)
        self.calls.append((block.block_id, float(target), out))
        return out


class FixedSelector(Selector):
    """Always picks the given indices (for the paper's figure)."""

    name = "fixed"
    shared_across_layers = True

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def budget(self, num_candidates: int) -> int:
        return min(len(self.indices), num_candidates)

    def select(self, queries, candidates, layer):
        chosen = [i for i in self.indices if i < len(candidates)][: self.budget(len(candidates))]
        return torch.tensor(chosen, dtype=torch.int64)[None].expand(queries.shape[0], -1)


class RopeModel:
    """The parts of a model a tiered policy without compressors uses."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.rope = Rope3D(geometry.head_dim)
        self.codec = None
        self.hidden_size = geometry.hidden_size


def _geometry(frames_per_block: int = 1, dtype: str = "float32") -> Geometry:
    return Geometry(
        latent_height=4,
        latent_width=4,
        num_layers=1,
        num_heads=2,
        head_dim=12,
        frames_per_block=frames_per_block,
        dtype=dtype,
    )


def _query(g: Geometry, block_id: int) -> BlockQuery:
    return BlockQuery(block_id, block_id * g.frames_per_block, g.frames_per_block, g.block_grid)


def _commit_random(policy: TieredPolicy, g: Geometry, block_id: int, position: float, raw: dict, dtype) -> None:
    """Commit random un-rotated keys (kept in ``raw``) rotated at ``position``, like a clean pass."""
    gen = torch.Generator().manual_seed(block_id)
    shape = (1, g.tokens_per_block, g.num_heads, g.head_dim)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    raw[block_id] = k
    keys = policy.model.rope.apply_grid(k, g.block_grid, position, g.patch[0]).to(dtype)
    policy.commit(
        BlockCommit(
            block_id, block_id * g.frames_per_block, g.frames_per_block, g.block_grid, position, [keys], [v.to(dtype)]
        )
    )


def _q(g: Geometry, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, g.tokens_per_block, g.num_heads, g.head_dim).to(dtype)


# ---------------------------------------------------------------------- assignment
def test_paper_figure_literally():
    """S0..S1, M2..M7, R8..R9 (one frame each), M2 and M6 skipped → 2, 3, 4, 5, 6, 7, 8, 9."""
    homes = [0, 1, 3, 4, 5, 7, 8, 9]  # S0 S1 M3 M4 M5 M7 R8 R9
    targets, query = TemporalRopeShift().assign([(h, 1) for h in homes], BlockQuery(10, 10, 1, (1, 1, 1)))
    assert targets == [2, 3, 4, 5, 6, 7, 8, 9]
    assert query == 10


def _paper_figure_policy(
    g: Geometry, realigner: PositionalRealigner, backend: AttentionBackend | None = None
) -> tuple[TieredPolicy, dict[int, torch.Tensor]]:
    """The paper's figure as a cache: sink S0 S1, mid bank M2..M7, recent R8 R9 (one frame per
    block), a selector keeping M3 M4 M5 M7; returns the policy and each block's un-rotated keys.
    ``backend``: SDPA unless given."""
    policy = TieredPolicy(
        TieredParams(
            tiers=(
                TierSpec(name="sink", frames=2, pinned=True),
                TierSpec(name="mid", blocks=6, select=True),
                TierSpec(name="recent", frames=2),
            )
        ),
        geometry=g,
        model=RopeModel(g),
        backend=backend or SdpaBackend(),
        realigner=realigner,
        selector=FixedSelector([1, 2, 3, 5]),  # M3 M4 M5 M7 out of M2..M7
    )
    raw: dict[int, torch.Tensor] = {}
    for block_id in range(10):
        _commit_random(policy, g, block_id, float(block_id), raw, torch.float32)
    return policy, raw


def test_paper_figure_through_the_policy():
    """The same figure end to end: sink 2 frames, mid bank of 6, recent 2, a selector skipping
    M2 and M6; the gathered keys equal RoPE recomputed at 2..9 (only the moved blocks rotate)."""
    g = _geometry(frames_per_block=1)
    realigner = RecordingRealigner(TemporalRopeShift())
    policy, raw = _paper_figure_policy(g, realigner)
    context = policy.context(_query(g, 10))
    assert context.position == 10
    context.attend(0, _q(g), _q(g), _q(g))
    assert [(b, t) for b, t, _ in realigner.calls] == [(0, 2), (1, 3), (3, 4), (4, 5), (5, 6), (7, 7), (8, 8), (9, 9)]
    rope = policy.model.rope
    for block_id, target, keys in realigner.calls:
        fresh = rope.apply_grid(raw[block_id], g.block_grid, target)
        torch.testing.assert_close(keys, fresh, atol=1e-5, rtol=0)
    # R8, R9 did not move: their stored keys are passed through without a copy
    stored = {b.block_id: b.layer_kv(0)[0] for b in policy.tier_blocks("recent")}
    for block_id, _, keys in realigner.calls[-2:]:
        assert keys.data_ptr() == stored[block_id].data_ptr()


@given(
    frames=st.lists(st.integers(1, 4), min_size=0, max_size=12),
    gaps=st.lists(st.integers(0, 5), min_size=12, max_size=12),
    query_start=st.integers(0, 200),
)
def test_absolute_packs_contiguously_before_the_query(frames, gaps, query_start):
    homes, pos = [], 0
    for n, gap in zip(frames, gaps, strict=False):
        pos += gap
        homes.append(pos)
        pos += n
    start = max(query_start, pos)
    targets, query = TemporalRopeShift().assign(
        list(zip(homes, frames, strict=True)), BlockQuery(0, start, 4, (1, 1, 1))
    )
    assert query == start
    following = [*targets[1:], query][: len(targets)]
    for t, n, nxt in zip(targets, frames, following, strict=True):
        assert t + n == nxt  # contiguous, the last one ending right before the query
    assert all(t >= h for t, h in zip(targets, homes, strict=True))  # packing only moves blocks forward


@given(
    frames=st.lists(st.integers(1, 4), min_size=0, max_size=12),
    origin=st.integers(0, 32).map(lambda x: x / 2),  # exact in binary: sums are exact
    query_start=st.integers(0, 10**6),
)
def test_window_positions_stay_inside_the_context(frames, origin, query_start):
    realigner = TemporalRopeShift(TemporalRopeShiftParams(anchor="window", origin=origin))
    homes = [10**5 + 4 * i for i in range(len(frames))]  # wherever they were stored
    targets, query = realigner.assign(list(zip(homes, frames, strict=True)), BlockQuery(0, query_start, 4, (1, 1, 1)))
    assert targets[:1] == ([origin] if frames else [])
    for t, n, nxt in zip(targets, frames, [*targets[1:], query][: len(targets)], strict=True):
        assert t + n == nxt
    assert query == origin + sum(frames)  # bounded by the context, not by the video length


def test_window_anchor_positions_are_bounded_over_a_long_video():
    g = _geometry(frames_per_block=2)
    realigner = RecordingRealigner(TemporalRopeShift(TemporalRopeShiftParams(anchor="window")))
    policy = TieredPolicy(
        TieredParams(tiers=(TierSpec(name="sink", frames=2, pinned=True), TierSpec(name="recent", frames=4))),
        geometry=g,
        model=RopeModel(g),
        backend=SdpaBackend(),
        realigner=realigner,
    )
    raw: dict[int, torch.Tensor] = {}
    seen = []
    for block_id in range(300):
        context = policy.context(_query(g, block_id))
        seen.append(context.position)
        context.attend(0, _q(g), _q(g), _q(g))
        _commit_random(policy, g, block_id, context.position, raw, torch.float32)
    assert max(seen) == 6  # sink 2 + recent 4 frames, however long the video
    assert max(t for _, t, _ in realigner.calls) <= 4


def test_only_the_temporal_band_rotates():
    rope = Rope3D(12)
    keys = torch.randn(2, 6, 2, 12)
    block = CachedBlock(0, 0, 2, "full", (2, 1, 3), 5.0, 1.0, None)  # type: ignore[arg-type]
    out = TemporalRopeShift().realign(keys, block, 9.0, rope)
    band = 2 * rope.band_pairs[0]
    assert torch.equal(out[..., band:], keys[..., band:])
    assert not torch.allclose(out[..., :band], keys[..., :band])
    assert TemporalRopeShift().realign(keys, block, 5.0, rope) is keys  # unmoved: no work, no copy


def test_realign_per_batch_targets():
    rope = Rope3D(12)
    raw = torch.randn(3, 4, 2, 12)
    grid = (2, 1, 2)
    block = CachedBlock(0, 0, 2, "full", grid, 4.0, 1.0, None)  # type: ignore[arg-type]
    stored = rope.apply_grid(raw, grid, 4.0)
    targets = torch.tensor([4.0, 1.0, 17.5], dtype=torch.float64)
    out = TemporalRopeShift().realign(stored, block, targets, rope)
    for b, t in enumerate(targets.tolist()):
        torch.testing.assert_close(out[b : b + 1], rope.apply_grid(raw[b : b + 1], grid, t), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- precision
@given(
    home=st.integers(0, 2000),
    shifts=st.lists(st.integers(-64, 64), min_size=1, max_size=40),
    t_stride=st.sampled_from([1.0, 2.0]),
    hw_stride=st.sampled_from([1.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_any_sequence_of_shifts_equals_fresh_rope_fp32(home, shifts, t_stride, hw_stride, seed):
    """After any sequence of shifts the keys equal RoPE recomputed from the un-rotated keys at
    the final position (≤ 1e-5 in float32), on full and compressed grids."""
    rope = Rope3D(32)
    grid = (2, 2, 3)
    raw = torch.randn(1, 12, 2, 32, generator=torch.Generator().manual_seed(seed))
    stored = rope.apply_grid(raw, grid, float(home), t_stride, hw_stride)
    block = CachedBlock(0, 0, 4, "full", grid, float(home), t_stride, None, hw_stride)  # type: ignore[arg-type]
    realigner = TemporalRopeShift()
    position = float(home)
    for shift in shifts:
        position += shift
        keys = realigner.realign(stored, block, position, rope)
    fresh = rope.apply_grid(raw, grid, position, t_stride, hw_stride)
    assert float((keys - fresh).abs().max()) <= 1e-5


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_500_shifts_in_bf16_stay_at_one_rounding():
    """A sink block moves every block; after 500 moves its gathered keys are still within 4e-3
    (relative) of a fresh rotation, while compounding the same shifts in place drifts away."""
    g = _geometry(frames_per_block=1, dtype="bfloat16")
    realigner = RecordingRealigner(TemporalRopeShift())
    policy = TieredPolicy(
        TieredParams(tiers=(TierSpec(name="sink", frames=1, pinned=True), TierSpec(name="recent", frames=2))),
        geometry=g,
        model=RopeModel(g),
        backend=SdpaBackend(),
        realigner=realigner,
    )
    rope = policy.model.rope
    raw: dict[int, torch.Tensor] = {}
    worst = 0.0
    compounded = None
    previous = 0.0
    moves = 0
    for block_id in range(504):
        context = policy.context(_query(g, block_id))
        realigner.calls.clear()
        context.attend(0, _q(g, torch.bfloat16), _q(g, torch.bfloat16), _q(g, torch.bfloat16))
        for b, target, keys in realigner.calls:
            if b == 0:
                fresh = rope.apply_grid(raw[0], g.block_grid, target)
                worst = max(worst, _relative(keys, fresh))
                base = policy.tier_blocks("sink")[0].layer_kv(0)[0] if compounded is None else compounded
                compounded = rope.shift_temporal(base, target - previous)  # the naive, in-place way
                moves += target != previous
                previous = target
        _commit_random(policy, g, block_id, context.position, raw, torch.bfloat16)
    assert moves >= 500  # the sink really moved 500 times
    assert worst <= 4e-3
    naive = _relative(compounded, rope.apply_grid(raw[0], g.block_grid, previous))
    assert naive > 2e-2  # what the design avoids
    # the stored sink keys were never modified
    stored = policy.tier_blocks("sink")[0].layer_kv(0)[0]
    torch.testing.assert_close(stored, rope.apply_grid(raw[0], g.block_grid, 0.0).bfloat16(), atol=0, rtol=0)


# ---------------------------------------------------------------------- config
def test_registered_and_configurable():
    assert isinstance(pf.build_engine(_tiny_config(anchor="window")).policy.realigner, TemporalRopeShift)
    with pytest.raises(pf.ConfigError, match=r"realigner\.anchor: expected one of absolute, window"):
        pf.load_config(_tiny_config(anchor="sideways"))


def _tiny_config(**realigner):
    return {
        "model": {"name": "tiny_dit", "hidden_size": 24, "num_heads": 2, "num_layers": 1},
        "policy": {"name": "sink_recent", "sink_frames": 4, "window_frames": 4},
        "realigner": {"name": "temporal_rope_shift", **realigner},
        "backend": "sdpa",
        "run": {"device": "cpu"},
    }


def test_batched_gather_equals_block_by_block_realignment():
    """TemporalRopeShift.gather rotates the whole moved prefix in one call; it must equal the
    interface's block-by-block default and RoPE recomputed at each target."""
    g = _geometry(frames_per_block=1)
    realigner = TemporalRopeShift()
    policy, raw = _paper_figure_policy(g, realigner)
    blocks = [b for name in ("sink", "mid", "recent") for b in policy.tier_blocks(name)]
    blocks = [b for b in blocks if b.block_id not in (2, 6)]
    targets, _ = realigner.assign([(b.position, b.num_frames) for b in blocks], _query(g, 10))
    keys = [b.layer_kv(0)[0] for b in blocks]
    stored = [k.clone() for k in keys]
    tail = _q(g)
    batched = realigner.gather(keys, blocks, targets, policy.model.rope, tail)
    one_by_one = PositionalRealigner.gather(realigner, keys, blocks, targets, policy.model.rope, tail)
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
    fresh = torch.cat(
        [
            *(
                policy.model.rope.apply_grid(raw[b.block_id], g.block_grid, t)
                for b, t in zip(blocks, targets, strict=True)
            ),
            tail,
        ],
        dim=1,
    )
    torch.testing.assert_close(batched, fresh, atol=1e-5, rtol=0)
    assert all(torch.equal(k, s) for k, s in zip(keys, stored, strict=True))  # stored keys untouched


# ---------------------------------------------------------------------- the device-side forms
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    moved=st.integers(0, 4),
    tail=st.integers(1, 4),
    batch=st.integers(1, 3),
    per_item=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_gather_shifted_equals_rope_recomputed_at_each_tokens_target(sizes, moved, tail, batch, per_item, dtype, seed):
    """``gather_shifted`` (the copy a device-side context attends) against RoPE from scratch
    (:mod:`tests.context_oracle`): the first ``M`` tokens, wherever they sit in ``(t, h, w)``,
    moved by their own shift (one per token, or per token and batch item), rounded once to the
    storage dtype; the rest (the block's own tokens) and the stored pieces untouched."""
    from .context_oracle import rotate64, token_angles

    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = 2, 12
    rope = Rope3D(head_dim)
    total = sum(sizes)
    m = min(moved, len(sizes))  # the first m pieces move
    shifted = sum(sizes[:m])
    t, h, w = (torch.randint(0, 40, (total,), generator=gen).double() for _ in range(3))
    raw = torch.randn(batch, total, heads, head_dim, generator=gen, dtype=torch.float64)
    stored = rotate64(raw, token_angles(head_dim, rope.theta, t, h, w)).to(dtype)
    pieces = list(torch.split(stored, sizes, dim=1))
    before = [p.clone() for p in pieces]
    own = torch.randn(batch, tail, heads, head_dim, generator=gen).to(dtype)
    deltas = (torch.randint(-80, 80, (batch if per_item else 1, shifted), generator=gen) / 2).double()
    out = TemporalRopeShift().gather_shifted(pieces, deltas if shifted else None, rope, own)
    assert out.dtype == dtype and out.shape == (batch, total + tail, heads, head_dim)
    exact = torch.empty(batch, shifted, heads, head_dim, dtype=torch.float64)
    for b in range(batch):  # the stored (rounded) keys moved exactly, in float64
        moved_t = t[:shifted] + deltas[b if per_item else 0]
        undo = rotate64(stored[b, :shifted].double(), -token_angles(head_dim, rope.theta, t, h, w)[:shifted])
        exact[b] = rotate64(undo, token_angles(head_dim, rope.theta, moved_t, h[:shifted], w[:shifted]))
    # one rounding to the storage dtype: within half an ulp (2^-8 relative in bfloat16), plus float32 work
    half_ulp = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    assert bool(((out[:, :shifted].double() - exact).abs() <= half_ulp * exact.abs() + 1e-5).all())
    assert torch.equal(out[:, shifted:], torch.cat([stored[:, shifted:], own], 1))
    assert all(torch.equal(p, q) for p, q in zip(pieces, before, strict=True))


@settings(max_examples=30, deadline=None)
@given(delta=st.integers(-200, 200).map(lambda x: x / 4), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_moving_the_query_back_scores_as_moving_the_keys_forward(delta, batch, seed):
    """``query_shifter(Δ)`` (a split context's moved query) gives every key the logits that
    ``gather_shifted`` moving the keys by ``+Δ`` gives (float64 reference), and leaves ``q`` as it was."""
    gen = torch.Generator().manual_seed(seed)
    rope = Rope3D(12)
    q = torch.randn(batch, 6, 2, 12, generator=gen)
    keys = rope.apply_grid(torch.randn(batch, 8, 2, 12, generator=gen), (2, 2, 2), 5.0)
    q_before = q.clone()
    shift = torch.tensor([delta], dtype=torch.float64)
    moved_q = TemporalRopeShift().query_shifter(shift, rope)(q)
    moved_k = TemporalRopeShift().gather_shifted([keys], shift.expand(1, 8), rope, keys[:, :0])
    by_query = torch.einsum("bqhd,bkhd->bhqk", moved_q.double(), keys.double())
    by_keys = torch.einsum("bqhd,bkhd->bhqk", q.double(), moved_k.double())
    torch.testing.assert_close(by_query, by_keys, atol=1e-4, rtol=1e-5)
    assert torch.equal(q, q_before) and moved_q.data_ptr() != q.data_ptr()
