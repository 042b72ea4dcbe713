"""Cached generation equals the cache-free reference (same model, whole sequence, block mask)."""

from __future__ import annotations

import pytest
import torch

from packforcing.attention import SdpaBackend
from packforcing.testing import block_causal_mask, reference_generate

from .helpers import engine_for, generate

NUM_BLOCKS = 7


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def visible_full(i: int) -> range:
    return range(i)


def visible_window(blocks: int):
    return lambda i: range(max(0, i - blocks), i)


def visible_sink_window(sink_blocks: int, blocks: int):
    return lambda i: sorted(set(range(min(sink_blocks, i))) | set(range(max(0, i - blocks), i)))


CASES = [
    ({"name": "full"}, visible_full),
    ({"name": "sliding_window", "window_frames": 8}, visible_window(2)),
    ({"name": "sliding_window", "window_frames": 11}, visible_window(2)),  # floor to whole blocks
    ({"name": "sink_recent", "sink_frames": 4, "window_frames": 8}, visible_sink_window(1, 2)),
    ({"name": "sink_recent", "sink_frames": 8, "window_frames": 4}, visible_sink_window(2, 1)),
    (
        {
            "name": "tiered",
            "tiers": [
                {"name": "a", "frames": 4, "pinned": True},
                {"name": "b", "blocks": 1},
                {"name": "c", "blocks": 2},
            ],
        },
        visible_sink_window(1, 3),
    ),
]


@pytest.mark.parametrize(("policy", "visible"), CASES, ids=lambda c: getattr(c, "get", lambda k: None)("name"))
@pytest.mark.parametrize("batch_size", [1, 2])
def test_policy_matches_uncached_reference(policy, visible, batch_size):
    engine = engine_for(policy)
    cached = generate(engine, NUM_BLOCKS, seed=3, batch_size=batch_size)
    reference = reference_generate(
        engine.model, SdpaBackend(), NUM_BLOCKS, visible, sampler=engine.sampler, seed=3, batch_size=batch_size
    )
    for block, ref in zip(cached, reference, strict=True):
        assert rel_err(block.latents, ref) <= 1e-5, block.index


def test_reference_mask_really_matters():
    """Guard against a vacuous oracle: a different mask gives a different video."""
    engine = engine_for({"name": "full"})
    full = reference_generate(engine.model, SdpaBackend(), 4, visible_full, sampler=engine.sampler)
    windowed = reference_generate(engine.model, SdpaBackend(), 4, visible_window(1), sampler=engine.sampler)
    assert rel_err(full[0], windowed[0]) == 0.0  # the first block sees nothing either way
    assert rel_err(full[3], windowed[3]) > 1e-3


def test_window_covering_the_video_equals_full():
    full = generate(engine_for({"name": "full"}), 6, seed=1)
    wide = generate(engine_for({"name": "sliding_window", "window_frames": 4 * 6}), 6, seed=1)
    for a, b in zip(full, wide, strict=True):
        assert torch.equal(a.latents, b.latents)


def test_sink_recent_without_sink_equals_sliding_window():
    window = generate(engine_for({"name": "sliding_window", "window_frames": 8}), 6, seed=2)
    sink0 = generate(engine_for({"name": "sink_recent", "sink_frames": 0, "window_frames": 8}), 6, seed=2)
    for a, b in zip(window, sink0, strict=True):
        assert torch.equal(a.latents, b.latents)


def test_block_causal_mask_shape_and_content():
    mask = block_causal_mask(3, 2, visible_window(1))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="only earlier blocks"):
        block_causal_mask(2, 1, lambda i: [i])
