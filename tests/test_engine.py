"""Engine behaviour: determinism, batching, streaming and honest byte accounting."""

from __future__ import annotations

import attrs
import pytest
import torch

from packforcing.core.records import BlockCommit
from packforcing.core.store import NonFiniteError

from .helpers import engine_for, generate

POLICIES = [
    {"name": "full"},
    {"name": "sliding_window", "window_frames": 8},
    {"name": "sink_recent", "sink_frames": 4, "window_frames": 8},
]


def held_nbytes(policy) -> int:
    """Bytes of every tensor the policy's stores hold, found independently of stats()."""
    total = 0
    for tier in policy._tiers:
        total += sum(p.nbytes for p in tier.store.pages) + sum(p.nbytes for p in tier.store.latent_pages)
    return total


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["name"])
def test_same_seed_gives_identical_bytes(policy):
    a = generate(engine_for(policy), 5, seed=11)
    b = generate(engine_for(policy), 5, seed=11)
    c = generate(engine_for(policy), 5, seed=12)
    for x, y in zip(a, b, strict=True):
        assert x.latents.numpy().tobytes() == y.latents.numpy().tobytes()
    assert not torch.equal(a[-1].latents, c[-1].latents)


def test_engine_reuse_restarts_from_an_empty_cache():
    engine = engine_for({"name": "full"})
    first = generate(engine, 4, seed=5)
    second = generate(engine, 4, seed=5)
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(first, second, strict=True))


def test_batch_items_are_independent_videos():
    engine = engine_for({"name": "sink_recent", "sink_frames": 4, "window_frames": 4})
    batched = generate(engine, 4, seed=7, batch_size=3)
    assert batched[0].latents.shape[0] == 3
    # different noise per item: different videos; same seed twice: same batch
    assert not torch.equal(batched[-1].latents[0], batched[-1].latents[1])
    again = generate(engine, 4, seed=7, batch_size=3)
    assert torch.equal(batched[-1].latents, again[-1].latents)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["name"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_reported_bytes_equal_tensors_held(policy, batch_size):
    engine = engine_for(policy)
    g = engine.geometry
    for block in engine.generate(7, seed=0, batch_size=batch_size):
        assert block.stats.bytes == held_nbytes(engine.policy)
        for name, tier in block.stats.tiers.items():
            assert tier.tokens == tier.blocks * g.tokens_per_block, name
            assert tier.bytes >= tier.tokens * g.bytes_per_token * batch_size
    plan = engine.policy.plan(7, batch_size=batch_size)
    assert plan.bytes == block.stats.bytes
    assert plan.context_tokens == block.context_tokens


def test_full_cache_grows_linearly_and_window_plateaus():
    full = [b.stats.bytes for b in generate(engine_for({"name": "full", "page_blocks": 1}), 6)]
    window = [b.stats.bytes for b in generate(engine_for({"name": "sliding_window", "window_frames": 8}), 6)]
    steps = {full[i + 1] - full[i] for i in range(5)}
    assert len(steps) == 1 and steps.pop() > 0
    assert window[1:] == [window[1]] * 5


def test_context_tokens_follow_the_policy():
    engine = engine_for({"name": "sink_recent", "sink_frames": 4, "window_frames": 8})
    tpb = engine.geometry.tokens_per_block
    tokens = [b.context_tokens for b in generate(engine, 6)]
    assert tokens == [0, tpb, 2 * tpb, 3 * tpb, 3 * tpb, 3 * tpb]


def test_cache_refuses_non_finite_keys_and_keeps_its_state():
    engine = engine_for({"name": "full"})
    generate(engine, 2)
    g = engine.geometry
    policy = engine.policy
    before = policy.stats()
    k = torch.randn(1, g.tokens_per_block, g.num_heads, g.head_dim)
    bad = k.clone()
    bad[0, 0, 0, 0] = float("nan")
    commit = BlockCommit(
        block_id=2,
        start_frame=8,
        num_frames=4,
        grid=g.block_grid,
        position=8.0,
        keys=[bad] * g.num_layers,
        values=[k] * g.num_layers,
    )
    with pytest.raises(NonFiniteError, match="non-finite"):
        policy.commit(commit)
    assert policy.stats().tiers["history"].blocks == before.tiers["history"].blocks
    # nothing half-done: the same block, made finite, goes in and lands where it should
    policy.commit(attrs.evolve(commit, keys=[k] * g.num_layers))
    assert policy.location(2) == "history"
    assert policy.stats().tiers["history"].blocks == before.tiers["history"].blocks + 1
    assert policy.layout.members[0][-1] == 2 and len(policy.layout.members[0]) == 3
