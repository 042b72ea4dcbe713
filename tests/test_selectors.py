"""Selectors: ``topk`` against a brute-force oracle, ``recency``, and their use by the policy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import packforcing as pf
from packforcing.core.geometry import Geometry
from packforcing.selectors import RecencyParams, RecencySelector, TopKParams, TopKSelector
from packforcing.selectors.topk import head_sample, query_sample

from .context_oracle import topk_samples

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def make_blocks(keys: list[torch.Tensor]) -> list[pf.CachedBlock]:
    """Candidate blocks holding ``keys[i] [B, N, H, D]`` (layer 0; values are zeros)."""
    n = keys[0].shape[1]
    return [
        pf.CachedBlock.from_tensors(
            [k], [torch.zeros_like(k)], block_id=i, start_frame=4 * i, num_frames=4, grid=(1, 1, n),
            position=4.0 * i, temporal_stride=1.0,
        )
        for i, k in enumerate(keys)
    ]  # fmt: skip


def brute_force(queries, blocks, params: TopKParams, layer: int = 0) -> tuple[list[list[int]], list[float]]:
    """Score = mean over sampled queries, chosen heads and every key of qᵀk/√d, loop by loop;
    the top k (ties to the newer block), in time order."""
    b_size, nq, num_heads, d = queries.shape
    qi, heads = topk_samples(params, nq, num_heads)  # from their definitions, not the selector's samplers
    out = []
    for b in range(b_size):
        scores = []
        for block in blocks:
            keys = block.layer_kv(layer)[0][b].double()
            total, count = 0.0, 0
            for i in qi:
                for h in heads:
                    for j in range(keys.shape[0]):
                        total += float(queries[b, i, h].double() @ keys[j, h]) / math.sqrt(d)
                        count += 1
            scores.append(total / count)
        order = sorted(range(len(blocks)), key=lambda c: (-scores[c], -c))
        out.append(sorted(order[: params.k]))
    return out, scores


@given(
    batch=st.integers(1, 3),
    candidates=st.integers(1, 7),
    k=st.integers(1, 8),
    nq=st.integers(1, 10),
    nk=st.integers(1, 5),
    heads=st.integers(1, 3),
    fraction=st.sampled_from([0.125, 0.5, 1.0]),
    min_queries=st.integers(0, 4),
    head_fraction=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_topk_matches_brute_force(batch, candidates, k, nq, nk, heads, fraction, min_queries, head_fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 4
    keys = [torch.randn(batch, nk, heads, d, generator=gen) for _ in range(candidates)]
    queries = torch.randn(batch, nq, heads, d, generator=gen)
    params = TopKParams(k=k, query_fraction=fraction, min_queries=min_queries, head_fraction=head_fraction)
    selector = TopKSelector(params)
    blocks = make_blocks(keys)
    got = selector.select(queries, blocks, 0)
    expected, _ = brute_force(queries, blocks, params)
    # the factorised score equals the loop; only compare choices where no near-tie makes
    # float rounding decide
    scores = selector.last_scores
    for b in range(batch):
        ranked = sorted(scores[b].tolist(), reverse=True)
        if len(ranked) > k:
            assume(ranked[k - 1] - ranked[k] > 1e-5)
    assert got.dtype == torch.int64
    assert got.shape == (batch, min(k, candidates))
    assert got.tolist() == expected


def test_scores_equal_the_explicit_mean():
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 5, 3, 8, generator=gen) for _ in range(4)]
    queries = torch.randn(2, 16, 3, 8, generator=gen)
    params = TopKParams(k=2, query_fraction=0.25, min_queries=3, heads=(0, 2))
    blocks = make_blocks(keys)
    scores = TopKSelector(params).scores(queries, blocks, 0)
    qi = query_sample(16, 0.25, 3)
    for b in range(2):
        for c, block in enumerate(blocks):
            q = queries[b, qi][:, [0, 2]]  # [nq, h, D]
            kk = block.layer_kv(0)[0][b][:, [0, 2]]  # [nk, h, D]
            explicit = torch.einsum("ihd,jhd->ihj", q, kk).mean() / math.sqrt(8)
            assert float(scores[b, c]) == pytest.approx(float(explicit), abs=1e-5)


def test_ties_go_to_the_newer_block_deterministically():
    same = torch.ones(1, 2, 1, 4)
    blocks = make_blocks([same.clone() for _ in range(6)])
    queries = torch.ones(1, 3, 1, 4)
    selector = TopKSelector(TopKParams(k=2, min_queries=1))
    first = selector.select(queries, blocks, 0)
    assert first.tolist() == [[4, 5]]
    for _ in range(3):
        assert torch.equal(selector.select(queries, blocks, 0), first)


def test_selection_is_per_batch_item():
    # item 0's query aligns with block 1, item 1's with block 3
    keys = []
    for c in range(4):
        k = torch.zeros(2, 1, 1, 4)
        k[0, 0, 0, c] = 1.0
        k[1, 0, 0, 3 - c] = 1.0
        keys.append(k)
    queries = torch.zeros(2, 1, 1, 4)
    queries[0, 0, 0, 1] = 1.0
    queries[1, 0, 0, 0] = 1.0
    got = TopKSelector(TopKParams(k=1, min_queries=1)).select(queries, make_blocks(keys), 0)
    assert got.tolist() == [[1], [3]]


@given(nq=st.integers(1, 500), fraction=st.floats(0.01, 1.0), minimum=st.integers(0, 64))
def test_query_sample_is_evenly_spaced_and_sized(nq, fraction, minimum):
    idx = query_sample(nq, fraction, minimum)
    n = idx.numel()
    assert n == max(1, min(nq, max(minimum, math.ceil(fraction * nq))))
    assert int(idx[0]) == 0 and int(idx[-1]) < nq
    gaps = set((idx[1:] - idx[:-1]).tolist()) | {nq - int(idx[-1])}  # the wrap-around gap too
    assert gaps <= {nq // n, -(-nq // n)}  # evenly spaced: every gap is floor or ceil of nq / n


def test_heads_parameter():
    assert head_sample(12, TopKParams(head_fraction=0.5)).tolist() == [0, 2, 4, 6, 8, 10]
    assert head_sample(12, TopKParams(heads=(3, 1))).tolist() == [1, 3]
    with pytest.raises(ValueError, match="heads: "):
        head_sample(2, TopKParams(heads=(5,)))


def test_recency_is_the_newest_k_in_time_order():
    blocks = make_blocks([torch.randn(2, 1, 1, 4) for _ in range(5)])
    selector = RecencySelector(RecencyParams(k=3))
    assert selector.select(torch.randn(2, 3, 1, 4), blocks, 0).tolist() == [[2, 3, 4], [2, 3, 4]]
    assert selector.budget(2) == 2 and selector.select(torch.randn(1, 1, 1, 4), blocks[:2], 0).tolist() == [[0, 1]]
    assert selector.shared_across_layers


def _engine(selector: dict, batch_hidden: int = 16):
    return pf.build_engine(
        {
            "model": {"name": "tiny_dit", "hidden_size": batch_hidden, "num_heads": 2, "num_layers": 3},
            "policy": {"name": "packforcing", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 5},
            "compressor": {"name": "pool", "window": [2, 4, 4]},
            "selector": selector,
            "realigner": {"name": "temporal_rope_shift"},
            "backend": "sdpa",
            "sampler": {"steps": 1},
            "run": {"device": "cpu"},
        }
    )


@pytest.mark.parametrize("shared", [False, True])
def test_shared_across_layers_selects_once_per_pass(shared):
    engine = _engine({"name": "topk", "k": 2, "shared_across_layers": shared})
    for _ in engine.generate(8, batch_size=2):
        pass
    g = engine.geometry
    context = engine.policy.context(pf.BlockQuery(8, 8 * g.frames_per_block, g.frames_per_block, g.block_grid))
    x = torch.randn(2, g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width)
    engine.model.denoise(x, torch.full((2,), 500.0), context)
    chosen = {layer: idx for (layer, _group), idx in context.selections.items()}
    assert sorted(chosen) == [0, 1, 2]
    if shared:
        assert all(chosen[layer] is chosen[0] for layer in chosen)
    for idx in chosen.values():
        assert idx.shape == (2, 2)
        assert bool((idx[:, 1:] > idx[:, :-1]).all())


def test_registered_and_validated():
    assert isinstance(_engine({"name": "recency", "k": 2}).policy.selector, RecencySelector)
    with pytest.raises(pf.ConfigError, match=r"selector\.k: expected an integer >= 1"):
        _engine({"name": "topk", "k": 0})
    with pytest.raises(pf.ConfigError, match=r"selector\.query_fraction: expected a number in \(0, 1\]"):
        _engine({"name": "topk", "query_fraction": 1.5})


def test_sampling_at_wan_scale():
    # a 4-frame Wan block has 6,240 queries: 12.5 % of them, and half of the 12 heads
    g = Geometry(latent_height=60, latent_width=104, num_layers=30, num_heads=12, head_dim=128)
    assert query_sample(g.tokens_per_block, 0.125, 32).numel() == 780
    assert head_sample(12, TopKParams(head_fraction=0.5)).numel() == 6
