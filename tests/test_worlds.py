"""The scenes world: determinism, frozen off-screen scenes, schedules; the DCT codec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from packforcing.core.sampler import block_noise
from packforcing.models.codec import LinearPatchCodec
from packforcing.worlds import (
    SceneWorld,
    SceneWorldParams,
    conditions,
    recall_schedule,
    returns,
    revisit_schedule,
    schedule_from_conditions,
)

SMALL = SceneWorldParams(num_scenes=3, height=16, width=24, frames_per_block=2, object_size=(3, 6))


@pytest.mark.parametrize("seed", [100_000_000_000_000, 2**63 - 1])
def test_derived_seeds_wrap_so_every_valid_seed_works(seed):
    """Seeds derived as ``seed * K + c`` wrap into a generator's range instead of overflowing."""
    assert len(revisit_schedule(6, 3, seed)) == len(recall_schedule(6, 3, seed)) == 6
    assert SceneWorld(SMALL, seed=seed).render([0]).shape == (3, 2, 16, 24)
    noise = block_noise(seed, 5, (2,), torch.float32, "cpu")
    assert torch.equal(noise, block_noise(seed, 5, (2,), torch.float32, "cpu"))


def test_world_is_deterministic_from_its_seed():
    schedule = [0, 1, 0, 2]
    a = SceneWorld(SMALL, seed=5).render(schedule)
    b = SceneWorld(SMALL, seed=5).render(schedule)
    c = SceneWorld(SMALL, seed=6).render(schedule)
    assert a.shape == (3, 8, 16, 24)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_off_screen_scenes_are_frozen_and_resume():
    world = SceneWorld(SMALL, seed=1)
    pixels = world.render([0, 0, 1, 2, 1, 0])
    f = SMALL.frames_per_block
    # the first frame after a return repeats the last frame shown, whatever happened meanwhile
    assert torch.equal(pixels[:, 5 * f], pixels[:, 2 * f - 1])
    assert torch.equal(pixels[:, 4 * f], pixels[:, 3 * f - 1])
    # and the scene moves on from there: its next frames are the ones it would have shown
    alone = world.render([0, 0, 0])
    assert torch.equal(pixels[:, 5 * f + 1 : 6 * f], alone[:, 2 * f : 3 * f - 1])
    # objects move while on screen (the scene is not a still picture)
    assert not torch.equal(pixels[:, 0], pixels[:, 2 * f - 1])


@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_conditions_round_trip_and_returns(schedule):
    segments = conditions(schedule)
    assert segments[0]["from_block"] == 0
    assert [s["from_block"] for s in segments] == sorted({s["from_block"] for s in segments})
    assert schedule_from_conditions(segments, len(schedule)) == schedule
    for r in returns(schedule):
        assert schedule[r.block] == r.scene == schedule[r.last_block]
        assert schedule[r.block - 1] != r.scene
        assert r.scene not in schedule[r.last_block + 1 : r.block]
        assert r.blocks_since >= 2


@given(st.integers(1, 80), st.integers(2, 8), st.integers(0, 1000))
def test_revisit_schedules_come_back(num_blocks, num_scenes, seed):
    schedule = revisit_schedule(num_blocks, num_scenes, seed)
    assert len(schedule) == num_blocks
    assert all(0 <= s < num_scenes for s in schedule)
    assert schedule == revisit_schedule(num_blocks, num_scenes, seed)
    if num_blocks >= 4 * num_scenes:
        assert returns(schedule)


def test_scene_out_of_range_is_refused():
    with pytest.raises(ValueError, match="scene 3"):
        SceneWorld(SMALL).render([0, 3])


def test_dct_codec_is_invertible_and_keeps_pictures():
    codec = LinearPatchCodec(16, 8, basis="dct")
    z = torch.randn(2, 16, 3, 4, 5)
    assert torch.allclose(codec.encode(codec.decode(z)), z, atol=1e-5)
    pixels = SceneWorld(SceneWorldParams(num_scenes=2), seed=0).render([0, 1])[None]
    projected = codec.decode(codec.encode(pixels))
    psnr = 10 * torch.log10(4 / (projected - pixels).pow(2).mean())
    assert psnr > 25  # a recognisable low-pass picture (the random basis keeps ~10 dB)
    random = LinearPatchCodec(16, 8, basis="random")
    assert 10 * torch.log10(4 / (random.decode(random.encode(pixels)) - pixels).pow(2).mean()) < psnr - 10
    with pytest.raises(ValueError, match="basis"):
        LinearPatchCodec(16, 8, basis="wavelet")


def test_recall_schedule_returns_from_varied_distances():
    """New scenes first (one block each), then only returns, to scenes drawn at random among
    those seen: across seeds every distance back from 2 to 5 blocks occurs."""
    from packforcing.worlds import recall_schedule, returns

    distances = set()
    for seed in range(200):
        order = recall_schedule(6, 8, seed)
        assert len(order) == 6 and order == recall_schedule(6, 8, seed)
        k = len(set(order))
        assert 2 <= k <= 5 and len(set(order[:k])) == k
        distances |= {r.blocks_since for r in returns(order)}
    assert {2, 3, 4, 5} <= distances


@given(st.integers(1, 40), st.integers(0, 1000))
def test_a_world_of_one_scene_has_schedules(num_blocks, seed):
    """One scene (a model with ``num_conditions: 1``): both schedules show it throughout instead
    of failing ("min() arg is an empty sequence", "list index out of range")."""
    assert revisit_schedule(num_blocks, 1, seed) == [0] * num_blocks
    assert recall_schedule(num_blocks, 1, seed) == [0] * num_blocks
    assert returns([0] * num_blocks) == []
