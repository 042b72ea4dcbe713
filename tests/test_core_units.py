"""Geometry, paged store and tier layout, unit by unit."""

from __future__ import annotations

import pytest
import torch

from packforcing import Geometry
from packforcing.core.rope import Rope3D
from packforcing.core.store import NonFiniteError, TierStore
from packforcing.policies.layout import ARCHIVE, DROP, Move, TierLayout, TierSlotSpec


def test_wan_geometry_numbers():
    g = Geometry(latent_height=60, latent_width=104, num_layers=30, num_heads=12, head_dim=128, dtype="bfloat16")
    assert g.tokens_per_frame == 1560
    assert g.block_grid == (4, 30, 52)
    assert g.tokens_per_block == 6240
    assert g.bytes_per_token == 184_320
    # 1,920 pixel frames = 1 + 4 * 480: the causal VAE's first latent frame is one pixel frame
    assert g.latent_frames(120, 16) == 481
    assert g.latent_frames(120, 16, 1) == 1920 and g.latent_frames(0.01, 16) == 1


@pytest.mark.parametrize("bad", [dict(latent_height=7), dict(patch=(2, 2, 2), frames_per_block=3), dict(num_heads=0)])
def test_geometry_rejects_inconsistent_shapes(bad):
    base = dict(latent_height=8, latent_width=8, num_layers=1, num_heads=2, head_dim=8)
    with pytest.raises(ValueError):
        Geometry(**{**base, **bad})


def make_store(capacity, page_blocks=2, tokens=3):
    return TierStore(
        name="t", slot_tokens=tokens, num_layers=2, num_heads=2, head_dim=4, capacity=capacity, page_blocks=page_blocks
    )


def kv(batch=1, tokens=3, fill=1.0):
    k = torch.full((batch, tokens, 2, 4), float(fill), dtype=torch.float32)
    return [k, k + 1], [k + 2, k + 3]


def test_store_pages_grow_by_page_and_reuse_freed_slots():
    store = make_store(capacity=None, page_blocks=2)
    slots = [store.put(*kv(fill=i)) for i in range(3)]
    assert len(store.pages) == 2  # 3 blocks in pages of 2
    page_ids = [id(p) for p in store.pages]
    store.release(slots[0])
    again = store.put(*kv(fill=9))
    assert (again.page, again.index) == (slots[0].page, slots[0].index)
    assert [id(p) for p in store.pages] == page_ids  # no reallocation, no copy of existing entries
    k, v = again.layer_kv(1)
    assert torch.equal(k, torch.full((1, 3, 2, 4), 10.0)) and torch.equal(v, torch.full((1, 3, 2, 4), 12.0))
    k2, _ = slots[2].layer_kv(0)
    assert torch.equal(k2, torch.full((1, 3, 2, 4), 2.0))  # neighbours untouched
    assert store.nbytes == sum(p.nbytes for p in store.pages) == 2 * (2 * 2 * 1 * 2 * 3 * 2 * 4 * 4)


def test_store_capacity_and_planned_slots_agree():
    store = make_store(capacity=3, page_blocks=2)
    for i in range(3):
        store.put(*kv(fill=i))
    with pytest.raises(RuntimeError, match="full"):
        store.put(*kv())
    assert sum(p.shape[3] for p in store.pages) == TierStore.planned_slots(3, 2, 3) == 4


def test_store_validates_shapes_and_values():
    store = make_store(capacity=2)
    with pytest.raises(ValueError, match="expected K/V"):
        store.put(*kv(tokens=4))
    keys, values = kv()
    keys[1] = keys[1].clone()
    keys[1][0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        store.put(keys, values)
    assert store.live_blocks == 0 and store.nbytes == 0
    slot = store.put(*kv())
    store.release(slot)
    with pytest.raises(RuntimeError):
        slot.layer_kv(0)
    with pytest.raises(RuntimeError, match="twice"):
        store.release(slot)


def test_layout_moves_sink_then_cascade():
    layout = TierLayout(
        [TierSlotSpec("sink", 1, pinned=True), TierSlotSpec("mid", 2), TierSlotSpec("recent", 1)], ARCHIVE
    )
    assert layout.commit(0) == [Move(0, None, 0)]
    assert layout.commit(1) == [Move(1, None, 2)]
    assert layout.commit(2) == [Move(1, 2, 1), Move(2, None, 2)]
    assert layout.commit(3) == [Move(2, 2, 1), Move(3, None, 2)]
    # mid is full: its oldest leaves first, then recent's oldest takes its place
    assert layout.commit(4) == [Move(1, 1, ARCHIVE), Move(3, 2, 1), Move(4, None, 2)]
    assert layout.commit(5) == [Move(2, 1, ARCHIVE), Move(4, 2, 1), Move(5, None, 2)]
    assert [list(m) for m in layout.members] == [[0], [3, 4], [5]]


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        (
            [TierSlotSpec("a", 1), TierSlotSpec("s", 1, pinned=True), TierSlotSpec("b", 1)],
            "pinned tiers must come first",
        ),
        ([TierSlotSpec("s", 1, pinned=True)], "newest tier cannot be pinned"),
        ([TierSlotSpec("s", None, pinned=True), TierSlotSpec("b", 1)], "needs a capacity"),
        ([TierSlotSpec("b", 0)], "at least one block"),
    ],
)
def test_layout_rejects_impossible_tier_orders(tiers, message):
    with pytest.raises(ValueError, match=message):
        TierLayout(tiers, DROP)


def test_rope_shift_equals_recomputed_rope_and_touches_only_the_temporal_band():
    rope = Rope3D(head_dim=32)
    assert rope.band_pairs == (6, 5, 5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * 3 * 4, 3, 32, generator=gen, dtype=torch.float64).float()
    at5 = rope.apply_grid(x, (2, 3, 4), t_start=5)
    at9 = rope.apply_grid(x, (2, 3, 4), t_start=9)
    shifted = rope.shift_temporal(at5, 4)
    assert float((shifted - at9).abs().max()) < 1e-5
    assert torch.equal(shifted[..., 12:], at5[..., 12:])
    per_item = rope.shift_temporal(at5, torch.tensor([4.0, 0.0]))
    assert torch.allclose(per_item[0], at9[0], atol=1e-5) and torch.equal(per_item[1], at5[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotation_is_the_pairs_complex_rotation_rounded_once(dtype):
    """``rotate`` by angles or by their ``rotation`` table turns each channel pair by its angle:
    the float64 rotation, rounded once to the input's dtype; a non-contiguous input works too."""
    rope = Rope3D(head_dim=12)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 12, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)  # [B, N=5, H=3, D]
    angles = torch.randn(5, 6, generator=gen, dtype=torch.float64) * 40  # [N, D/2], large angles too
    by_angles, by_table = rope.rotate(x, angles), rope.rotate(x, rope.rotation(angles))
    assert by_angles.dtype == dtype and by_angles.shape == x.shape and torch.equal(by_angles, by_table)
    pairs = x.double().unflatten(-1, (6, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    exact = torch.stack((real * cos - imag * sin, real * sin + imag * cos), -1).flatten(-2)
    rtol = 1e-6 if dtype == torch.float32 else 2.0**-8  # float32 arithmetic, then one rounding
    torch.testing.assert_close(by_angles.double(), exact, rtol=rtol, atol=1e-6)


def test_rope_temporal_turn_is_made_once_per_shift_tensor():
    """The same shift tensor, unmodified, gets the table already made (a context's pass passes
    one to every layer); an in-place change or another tensor of equal values gets a new one,
    equal to a table made afresh."""
    rope = Rope3D(head_dim=12)
    delta = torch.tensor([[0.0, 3.0, -2.5]], dtype=torch.float64)
    table = rope.temporal_turn(delta)
    assert rope.temporal_turn(delta) is table
    other = delta.clone()
    assert rope.temporal_turn(other) is not table and torch.equal(rope.temporal_turn(other), table)
    delta.add_(1.0)
    moved = rope.temporal_turn(delta)
    assert moved is not table and torch.equal(moved, Rope3D(head_dim=12).temporal_turn(delta.clone()))
    assert rope == Rope3D(head_dim=12) and hash(rope) == hash(Rope3D(head_dim=12))  # the memo is not its value
    with torch.inference_mode():  # no version counter: a table every time, none kept
        frozen = delta.clone()
        assert torch.equal(rope.temporal_turn(frozen), moved) and rope.temporal_turn(frozen) is not moved


def test_a_cached_block_from_tensors_reads_like_a_stored_one():
    """CachedBlock.from_tensors holds the given tensors (no store, no copy) with a slot's interface."""
    from packforcing.core.records import CachedBlock

    keys, values = kv(batch=2, tokens=4)
    latents = torch.randn(2, 16, 4, 8, 8)
    block = CachedBlock.from_tensors(
        keys, values, latents=latents, block_id=3, start_frame=12, num_frames=4, grid=(1, 2, 2), position=12.0,
        temporal_stride=1.0,
    )  # fmt: skip
    assert block.num_layers == 2 and block.num_tokens == 4
    assert all(a is b for a, b in zip(block.keys, keys, strict=True))
    assert all(a is b for a, b in zip(block.values, values, strict=True))
    assert block.layer_kv(1) == (keys[1], values[1]) and block.latents is latents
    store = make_store(capacity=None, tokens=4)
    stored = CachedBlock(3, 12, 4, "full", (1, 2, 2), 12.0, 1.0, store.put(keys, values))
    assert all(torch.equal(a, b) for a, b in zip(stored.keys + stored.values, block.keys + block.values, strict=True))
    with pytest.raises(ValueError, match=r"layer 0: expected keys and values \[B, 8, H, D\] for grid \(2, 2, 2\)"):
        CachedBlock.from_tensors(keys, values, block_id=0, start_frame=0, num_frames=4, grid=(2, 2, 2), position=0.0,
                                 temporal_stride=1.0)  # fmt: skip


def test_a_compressed_entry_tier_compresses_the_commit_itself():
    """The newest tier compressed: each commit is seen as a block (CachedBlock.from_tensors) and
    compressed before it is stored; nothing else holds it, and the plan equals the live cache."""
    import packforcing as pf

    config = {
        "policy": {"name": "tiered", "tiers": [{"name": "recent", "blocks": 2, "fidelity": "compressed"}]},
        "compressor": {"name": "pool", "window": [1, 2, 2]},
        "sampler": {"steps": 1},
        "run": {"device": "cpu"},
    }
    engine = pf.build_engine(config)
    blocks = list(engine.generate(3, seed=0))
    held = engine.policy.tier_blocks("recent")
    assert [(b.block_id, b.fidelity, b.grid) for b in held] == [(1, "pool", (4, 2, 2)), (2, "pool", (4, 2, 2))]
    assert blocks[-1].stats.bytes == engine.policy.plan(3).bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf"), "both"])
def test_finite_probe_is_finite_exactly_when_every_element_is(dtype, bad):
    from packforcing.core.finite import all_finite, finite_probe

    x = torch.full((64, 3), torch.finfo(dtype).max, dtype=dtype)  # the largest finite values: no overflow
    x[::2] = torch.finfo(dtype).min
    if bad == "both":  # +Inf and -Inf together sum to NaN: still caught
        x[5, 1], x[9, 2] = float("inf"), float("-inf")
    elif bad is not None:
        x[7, 2] = bad
    assert bool(torch.isfinite(finite_probe(x))) is (bad is None)
    assert bool(all_finite([torch.zeros(2, dtype=dtype), x])) is (bad is None)
    assert bool(all_finite([])) and bool(all_finite([torch.empty(0, dtype=dtype)]))
