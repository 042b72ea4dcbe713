"""Cached generation equals the cache-free reference (same model, whole sequence, block mask),
for the policies a block mask can express (absolute positions, full-fidelity blocks); and one
context of a selecting, compressing, realigning policy equals the cache-free context oracle
(``tests/context_oracle.py``: brute-force picks, RoPE recomputed at packed positions, float64
attention), which a block mask cannot express."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packforcing.api import AttentionBackend
from packforcing.attention import SdpaBackend
from packforcing.positional import TemporalRopeShift
from packforcing.testing import block_causal_mask, reference_generate

from .context_oracle import reference_context_attention
from .helpers import engine_for, generate, selector_blocks

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


def test_engine_hands_its_backend_to_the_oracle():
    """A plugin author compares an engine with the oracle without importing a backend class:
    ``engine.backend`` is the one the policy's contexts run."""
    engine = engine_for({"name": "sliding_window", "window_frames": 8})
    assert isinstance(engine.backend, AttentionBackend)
    cached = generate(engine, 4, seed=1)
    reference = reference_generate(engine.model, engine.backend, 4, visible_window(2), sampler=engine.sampler, seed=1)
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


# ---------------------------------------------------------------------- one context, every component
class _HostPath(TemporalRopeShift):
    """``temporal_rope_shift`` whose picks are read on the host (no ``targets_from_frames``)."""

    targets_from_frames = False


def _context_case(draw) -> tuple[dict, dict]:
    """A tiny model and a selecting tiered policy (the packforcing preset, or sink | two
    selected tiers | recent) with its selector, compressor and realigner."""
    frames = draw(st.sampled_from([1, 2]), label="frames_per_block")
    heads = draw(st.integers(1, 2), label="heads")
    model = {
        "name": "tiny_dit",
        "hidden_size": 12 * heads,
        "num_heads": heads,
        "num_layers": 2,
        "latent_height": 4,
        "latent_width": draw(st.sampled_from([4, 6]), label="latent_width"),
        "frames_per_block": frames,
    }
    k = draw(st.integers(1, 4), label="k")
    selector = draw(st.sampled_from(selector_blocks(k)), label="selector")
    window = draw(st.sampled_from([1, 2]), label="pool_hw")
    if draw(st.booleans(), label="packforcing"):
        policy = {
            "name": "packforcing",
            "sink_frames": draw(st.integers(0, 3 * frames), label="sink_frames"),  # not always whole blocks
            "recent_frames": frames * draw(st.integers(1, 2), label="recent_blocks"),
            "mid_capacity_blocks": draw(st.integers(k, k + 2), label="mid_blocks"),  # k = capacity included
            "page_blocks": draw(st.integers(1, 3), label="page_blocks"),
        }
    else:
        policy = {
            "name": "tiered",
            "overflow": "drop",
            "page_blocks": draw(st.integers(1, 3), label="page_blocks"),
            "tiers": [
                {"name": "sink", "frames": draw(st.integers(0, 2 * frames), label="sink_frames"), "pinned": True},
                {"name": "far", "select": True, "fidelity": "compressed"},  # unbounded: candidates span pages
                {"name": "mid", "blocks": draw(st.integers(k, k + 1), label="mid_blocks"), "select": True},
                {"name": "recent", "blocks": 1},
            ],
        }
    realigner = draw(
        st.sampled_from(
            [
                {"name": "temporal_rope_shift"},
                {"name": "temporal_rope_shift", "anchor": "window", "origin": 1.5},
                {"name": "identity"},
            ]
        ),
        label="realigner",
    )
    sections = {
        "selector": selector,
        "realigner": realigner,
        "compressor": {"name": "pool", "window": [1, window, window]},
        "backend": {"name": "sdpa", "split_context": draw(st.booleans(), label="split_context")},
    }
    return model, {"policy": policy, **sections}


def _expected_tiers(config: dict, frames: int, count: int) -> dict[str, list[int]]:
    """Blocks ``0..count-1`` by tier for :func:`_context_case`'s policies: the sink takes the
    first ``⌊sink_frames / frames⌋``, the newest tier the newest ones it has room for, and so on
    back; what overflows the oldest bounded tier leaves the tiers."""
    if config["name"] == "packforcing":
        tiers = [
            ("sink", config["sink_frames"] // frames, True),
            ("mid", config["mid_capacity_blocks"], False),
            ("recent", config["recent_frames"] // frames, False),
        ]
    else:
        tiers = [(t["name"], t["frames"] // frames if "frames" in t else t.get("blocks"), t.get("pinned", False))
                 for t in config["tiers"]]  # fmt: skip
    (sink, sink_blocks, _), *chain = tiers  # the one pinned tier comes first
    placed = {sink: list(range(min(sink_blocks, count)))}
    rest = list(range(len(placed[sink]), count))
    for name, cap, _ in reversed(chain):
        keep = len(rest) if cap is None else min(cap, len(rest))
        placed[name] = rest[len(rest) - keep :]
        rest = rest[: len(rest) - keep]
    return {name: placed[name] for name, _, _ in tiers}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_selecting_realigning_context_matches_the_cache_free_context_oracle(data):
    """Every component at once against :mod:`tests.context_oracle` (no code shared with the
    policy): after any number of blocks (one block, tiers exactly full, overflowing), for 1-3
    batch items picking differently, 1-2 heads, ``k`` up to and at the candidates, the three
    realigners, picks kept on the device or read on the host, the copy or the split context,
    float32 or bfloat16, contiguous or strided inputs: each layer's output is float64 attention
    over keys whose RoPE is recomputed at independently packed positions."""
    draw = data.draw
    model, sections = _context_case(draw)
    dtype = draw(st.sampled_from(["float32", "bfloat16"]), label="dtype")
    config = sections.pop("policy")
    engine = engine_for(config, model=model, steps=1, run={"device": "cpu", "dtype": dtype}, **sections)
    policy = engine.policy
    if policy.realigner.name == "temporal_rope_shift" and draw(st.booleans(), label="host_path"):
        policy.realigner = _HostPath(policy.realigner.params)
    blocks = draw(st.integers(1, 12), label="blocks")
    batch = draw(st.integers(1, 3), label="batch")
    with engine.session(seed=draw(st.integers(0, 99), label="seed"), batch_size=batch) as session:
        for _ in range(blocks):
            session.step()
    g = engine.geometry
    # which blocks each tier holds, from the configured frames and blocks (whole blocks that fit)
    held = {t.name: [b.block_id for b in t.blocks] for t in policy.tiers}
    assert held == _expected_tiers(config, model["frames_per_block"], blocks)
    query = engine.query(blocks)
    context = policy.context(query)
    strided = draw(st.booleans(), label="strided")
    gen = torch.Generator().manual_seed(blocks)
    tol = 1e-5 if dtype == "float32" else 1e-2
    first = None
    for layer in range(g.num_layers):
        shape = (batch, g.tokens_per_block, g.num_heads, g.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(getattr(torch, dtype)) for _ in range(3))
        if strided:  # the same values in [B, H, N, D] memory, seen as [B, N, H, D]
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        first = first or (layer, q)
        out = context.attend(layer, q, k, v)
        shared = policy.selector.shared_across_layers
        expected, position = reference_context_attention(
            policy, query, layer, q, k, v, context.selections, selected_with=first if shared else None
        )
        assert out.dtype == q.dtype and out.shape == q.shape and context.position == position
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    policy.settle()
