"""``packforcing.plan``: Wan2.1-1.3B numbers from the paper, and at the tiny geometry the plan
equals what the engine actually holds."""

from __future__ import annotations

import pytest

import packforcing as pf

pytestmark = pytest.mark.usefixtures("torch_single_thread")

WAN_TOKENS_PER_FRAME = 1560
WAN_BYTES_PER_TOKEN = 2 * 30 * 12 * 128 * 2  # K+V, 30 layers, 12 heads x 128, bf16 = 184,320


def test_wan_full_cache_at_120_seconds():
    plan = pf.plan("configs/wan1.3b/full.yaml", seconds=120, fps=16)
    # 1,920 pixel frames need 481 latent frames (1 + 4k), whole blocks of 4: 121 blocks, 484 frames;
    # the paper's ~138 GB counts 480
    assert plan.tokens == 121 * 4 * WAN_TOKENS_PER_FRAME
    assert plan.full_cache_bytes == plan.tokens * WAN_BYTES_PER_TOKEN == pytest.approx(1.39e11, rel=0.01)
    # the full policy holds whole pages of 4 blocks: 31 pages for 121 blocks
    assert plan.bytes == 31 * 4 * 4 * WAN_TOKENS_PER_FRAME * WAN_BYTES_PER_TOKEN


def test_wan_packforcing_is_about_4_gb():
    plan = pf.plan("configs/wan1.3b/packforcing.yaml", seconds=120, fps=16)
    assert plan.tokens == 21_632  # 12,480 sink + 2,912 mid (16 x 182) + 6,240 recent
    assert {name: t.tokens for name, t in plan.tiers.items()} == {"sink": 12_480, "mid": 2_912, "recent": 6_240}
    assert plan.bytes == pytest.approx(3.99e9, rel=0.01)
    assert plan.context_tokens + 4 * WAN_TOKENS_PER_FRAME == 27_872  # with the current 4-frame block
    assert plan.archive.blocks == 121 - 2 - 16 - 1  # kept apart from the active budget (121 blocks: 481 latent frames)
    assert plan.archive.bytes > 0


def test_wan_sliding_window_is_about_3_gb():
    plan = pf.plan("configs/wan1.3b/sliding_window.yaml", seconds=120, fps=16)
    assert plan.tokens == 12 * WAN_TOKENS_PER_FRAME
    assert plan.bytes == pytest.approx(3.45e9, rel=0.01)


def test_wan_packforcing_plateaus_with_length():
    short = pf.plan("configs/wan1.3b/packforcing.yaml", seconds=30, fps=16)
    long = pf.plan("configs/wan1.3b/packforcing.yaml", seconds=600, fps=16)
    assert short.bytes == long.bytes
    assert long.full_cache_bytes > 100 * long.bytes


TINY_CONFIGS = [
    ("configs/packforcing.yaml", []),
    ("configs/packforcing.yaml", ["policy.mid_overflow=drop", "compressor={name: pool, window: [2, 4, 4]}"]),
    ("configs/packforcing.yaml", ["realigner.anchor=window", "selector={name: recency, k: 3}"]),
    ("configs/packforcing_4tier.yaml", []),
    ("configs/full.yaml", []),
    ("configs/sliding_window.yaml", []),
    ("configs/sink_recent.yaml", []),
]


@pytest.mark.parametrize(("path", "overrides"), TINY_CONFIGS)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_tiny_plan_equals_what_the_engine_holds(path, overrides, batch_size):
    blocks = 22 if "4tier" not in path else 26
    config = pf.load_config(
        path,
        overrides=[
            *overrides,
            "run.device=cpu",
            "backend.name=sdpa",
            "sampler.steps=1",
            f"run.batch_size={batch_size}",
        ],
    )
    planned = pf.plan(config, num_blocks=blocks)
    engine = pf.build_engine(config)
    peak = 0
    for block in engine.generate(blocks, batch_size=batch_size):
        peak = max(peak, block.stats.bytes)
    stats = block.stats
    assert planned.bytes == peak == stats.bytes
    assert planned.tiers == stats.tiers
    assert planned.archive.bytes == stats.archive.bytes and planned.archive.blocks == stats.archive.blocks
    assert planned.context_tokens == block.context_tokens
    # the planned tokens are the blocks actually held
    held = sum(b.num_tokens for name in engine.policy.tier_names for b in engine.policy.tier_blocks(name))
    assert held == stats.tokens


def test_plan_from_seconds_and_fps():
    # tiny_dit's codec: one pixel frame per latent frame; 4-frame blocks: 10 s at 16 fps = 40 blocks
    plan = pf.plan("configs/packforcing.yaml", seconds=10, fps=16)
    assert plan.num_blocks == 40
    assert plan.bytes == pf.plan("configs/packforcing.yaml", num_blocks=40).bytes
    # Wan's VAE stride, given explicitly: 160 pixel frames = 1 + 4 * 40 latent frames, 11 blocks
    assert pf.plan("configs/packforcing.yaml", seconds=10, fps=16, pixel_frames_per_latent=4).num_blocks == 11
