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


def test_a_world_whose_objects_cannot_fit_its_frame_is_refused():
    """Objects bounce off the frame's edges, so they must be smaller than its shorter side: a
    world where they cannot be is refused in one line naming the key (it used to render objects
    covering the whole frame or lying mostly outside it, and NaN frames at exactly the frame's size)."""
    with pytest.raises(ValueError, match=r"^object_size: objects up to 22 pixels do not fit a 16x24 frame") as info:
        SceneWorldParams(height=16, width=24)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^object_size: "):
        SceneWorldParams(height=16, width=24, object_size=(3, 16))  # as large as the frame: no room to move
    assert SceneWorldParams(height=16, width=24, object_size=(3, 15.5)).object_size == (3.0, 15.5)
    with pytest.raises(ValueError, match=r"^speed: expected a range \[low, high\]"):
        SceneWorldParams(speed=(2, 1))


@pytest.mark.parametrize(
    ("fields", "got"),
    [
        ({"object_size": (1, 2, 3)}, "[1, 2, 3]"),
        ({"object_size": [1]}, "[1]"),
        ({"speed": "ab"}, "'ab'"),
        ({"speed": (1, "x")}, "[1, 'x']"),
        ({"speed": 5}, "5"),
        ({"speed": (0.5, float("inf"))}, "[0.5, inf]"),  # objects would leave the frame: NaN positions
        ({"object_size": (float("nan"), 2)}, "[nan, 2.0]"),
        ({"speed": (1, 10**400)}, f"[1, {10**400}]"),  # an int no float holds (YAML reads one)
    ],
)
def test_a_range_that_is_not_two_finite_numbers_is_refused_naming_its_key(fields, got):
    """Whatever is wrong with a range, the one-line error names its key and shows what was given."""
    key = next(iter(fields))
    with pytest.raises(ValueError) as info:
        SceneWorldParams(**fields)
    assert str(info.value) == f"{key}: expected a range [low, high] with 0 <= low <= high < inf, got {got}"


def test_the_world_for_a_frame_is_the_shipped_world_at_64_and_scaled_elsewhere():
    """``for_frame`` at 64×64 is the default world itself (the shipped model's training data, bit
    for bit); elsewhere object sizes and speeds scale with the frame's shorter side, and sizes
    given outright are kept."""
    assert SceneWorldParams.for_frame(64, 64) == SceneWorldParams()
    shipped = SceneWorld(SceneWorldParams(), seed=3).render([0, 1, 0])
    assert torch.equal(SceneWorld(SceneWorldParams.for_frame(64, 64), seed=3).render([0, 1, 0]), shipped)
    small = SceneWorldParams.for_frame(16, 24, num_scenes=3)
    assert (small.object_size, small.speed, small.num_scenes) == ((3.5, 5.5), (0.1875, 0.5), 3)
    assert SceneWorldParams.for_frame(128, 96).object_size == (21.0, 33.0)
    assert SceneWorldParams.for_frame(16, 16, object_size=(2, 4)).object_size == (2.0, 4.0)
    with pytest.raises(ValueError, match=r"^object_size: "):
        SceneWorldParams.for_frame(16, 16, object_size=(14, 22))


def lone_objects(height: int, width: int, seed: int, times: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Opacity ``[T, H, W]`` of the one object of a world at ``height × width`` on a flat zero
    background (frames are its colour times its opacity), at ``times``, and its size."""
    params = SceneWorldParams.for_frame(
        height, width, num_scenes=1, objects_per_scene=1, background_range=0.0, texture_amplitude=0.0
    )
    world = SceneWorld(params, seed)
    scene = world.scenes[0]
    channel = int(scene.colour[0].abs().argmax())  # a saturated colour: at least 0.5 in one channel
    frames = world.render_scene(0, times)
    return frames[channel] / scene.colour[0, channel], float(scene.size[0])


@given(st.integers(16, 96), st.integers(16, 96), st.integers(0, 2**32), st.integers(0, 2000))
def test_every_object_of_every_frame_lies_within_it(height, width, seed, start):
    """A world at any frame size keeps each object whole inside the frame at every time (bounces
    included): the rows and the columns it covers (opacity above one half) are one run as long as
    the object, never cut by an edge."""
    alpha, size = lone_objects(height, width, seed, torch.arange(start, start + 6))
    assert size < min(height, width)
    for a in alpha:
        for covered in (a.amax(dim=1) > 0.5, a.amax(dim=0) > 0.5):
            run = covered.nonzero().flatten().tolist()
            assert run == list(range(run[0], run[-1] + 1))  # one run
            assert size - 1.5 <= len(run) <= size + 1, (len(run), size)


@given(st.integers(1, 96), st.integers(1, 96), st.integers(0, 2**32))
def test_a_world_at_any_frame_size_renders(height, width, seed):
    """Down to one pixel: the objects fit, and the frames are finite pixels in [-1, 1]."""
    params = SceneWorldParams.for_frame(height, width, num_scenes=2, frames_per_block=2)
    assert params.object_size[1] < min(height, width)
    pixels = SceneWorld(params, seed).render([0, 1, 0])
    assert pixels.shape == (3, 6, height, width)
    assert torch.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1
