"""Split contexts: the history attended where it is stored, merged by log-sum-exp.

With ``backend: {name: sdpa, split_context: true}`` a tiered context no longer copies its whole
context into one tensor on every layer. Each run of adjacent stored slots of a fixed tier is
attended in place (a run that moves by ``Δ`` with the query moved by ``−Δ``), the selected
picks and the block's own tokens are gathered, and the parts are merged exactly by their
log-sum-exp. The oracles: attention over the union of the keys (merge), the math reference
(``attend_lse``), RoPE recomputed at the packed positions (the paper's figure), the gathered
copy (the same contexts), and the cache-free reference (whole generations).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packforcing.attention.backends import SdpaBackend, SdpaParams, _math_lse
from packforcing.attention.merge import merge_by_lse
from packforcing.core.errors import ConfigError, PluginError
from packforcing.core.store import adjacent_runs
from packforcing.positional import TemporalRopeShift, TemporalRopeShiftParams
from packforcing.positional.identity import IdentityRealigner
from packforcing.testing import reference_generate

from .helpers import (
    FULL_PACKFORCING_BLOCKS,
    assert_one_read_per_block,
    engine_for,
    full_packforcing_engine,
    generate,
    layer_qkv,
    packforcing_engine,
    syncs_of_a_pass,
)
from .test_oracle import CASES, NUM_BLOCKS, rel_err
from .test_realigner import _geometry, _paper_figure_policy, _query

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPLIT = SdpaBackend(SdpaParams(split_context=True))
BLOCKS = FULL_PACKFORCING_BLOCKS


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float64, ``[B, N, H, D]``."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.double())


# ---------------------------------------------------------------------- attend_lse and merge
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)], ids=str
)
@pytest.mark.parametrize("nk", [1, 7, 40])
def test_attend_lse_is_attention_and_its_log_denominator(dtype, tol, nk):
    gen = torch.Generator().manual_seed(nk)
    q, k, v = (torch.randn(2, n, 3, 16, generator=gen).to(dtype) for n in (5, nk, nk))
    out, lse = SdpaBackend().attend_lse(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 5, 3)
    assert lse.dtype in (torch.float32, torch.float64)
    scores = torch.einsum("bqhd,bkhd->bqhk", q.double(), k.double()) / 4.0
    # the log-sum-exp is accumulated in float32 (or wider) whatever the inputs' dtype: for
    # bfloat16 inputs it is within 1e-4 (2e-5 measured), not bfloat16's 2e-2
    lse_tol = min(tol, 1e-4)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=lse_tol, rtol=lse_tol)
    torch.testing.assert_close(out.double(), _attention(q, k, v), atol=tol, rtol=tol)
    torch.testing.assert_close(out, SdpaBackend().attend(q, k, v), atol=tol, rtol=tol)
    _, ref_lse = _math_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(lse, ref_lse.transpose(1, 2).to(lse.dtype), atol=lse_tol, rtol=lse_tol)


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 30), min_size=0, max_size=4, unique=True),
    scale=st.floats(0.1, 30.0),
    seed=st.integers(0, 2**16),
)
def test_merge_by_lse_equals_attention_over_the_union(cuts, scale, seed):
    """Any split of the keys into parts, merged, is attention over all of them (float64), also
    with logits large enough that an unstabilised merge would overflow."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 2, 8, generator=gen, dtype=torch.float64) * scale
    k, v = (torch.randn(1, 31, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    bounds = [0, *sorted(cuts), 31]
    parts = [SdpaBackend().attend_lse(q, k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)]
    torch.testing.assert_close(merge_by_lse(parts), _attention(q, k, v), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_accumulates_in_float32_and_rounds_once_to_the_outputs_dtype(count, dtype):
    """The merge equals the weighted sum accumulated in float32 and rounded once to the outputs'
    dtype, bit for bit (the last step writes that dtype itself); one part is returned as it is."""
    gen = torch.Generator().manual_seed(count)
    outs = [torch.randn(2, 5, 3, 8, generator=gen).to(dtype) for _ in range(count)]
    lses = [torch.randn(2, 5, 3, generator=gen) * 4 for _ in range(count)]
    weights = torch.softmax(torch.stack(lses), dim=0)[..., None]
    accumulated = outs[0].float() * weights[0]
    for out, weight in zip(outs[1:], weights[1:], strict=True):
        accumulated.addcmul_(out, weight)
    merged = merge_by_lse(list(zip(outs, lses, strict=True)))
    assert merged.dtype == dtype and torch.equal(merged, accumulated.to(dtype))
    assert merge_by_lse([(outs[0], lses[0])]) is outs[0]
    with pytest.raises(ValueError, match="at least one part"):
        merge_by_lse([])


@pytest.mark.parametrize("kernels", [None, ("math",)], ids=["fused", "math"])
@pytest.mark.parametrize("empty_at", [0, 1, 2])
def test_a_part_over_no_keys_adds_nothing_to_the_merge(kernels, empty_at):
    """A part with no keys (output 0, log-sum-exp −inf, from the fused kernel and from the math
    reference alike) gets weight 0: the merge is the attention over the other parts, finite."""
    backend = SdpaBackend(SdpaParams(kernels=kernels))
    gen = torch.Generator().manual_seed(empty_at)
    q = torch.randn(2, 5, 3, 8, generator=gen)
    k, v = (torch.randn(2, 9, 3, 8, generator=gen) for _ in range(2))
    empty = backend.attend_lse(q, k[:, :0], v[:, :0])
    assert torch.equal(empty[0], torch.zeros_like(q)) and bool((empty[1] == float("-inf")).all())
    parts = [backend.attend_lse(q, k[:, :4], v[:, :4]), backend.attend_lse(q, k[:, 4:], v[:, 4:])]
    parts.insert(empty_at, empty)
    merged = merge_by_lse(parts)
    assert bool(torch.isfinite(merged).all())
    torch.testing.assert_close(merged.double(), _attention(q, k, v), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the paper's figure
def _figure(backend, realigner):
    """The paper's figure (sink S0 S1, mid M2..M7 of which M3 M4 M5 M7 enter, recent R8 R9; one
    frame per block) and each block's un-rotated keys and values."""
    g = _geometry(frames_per_block=1)
    policy, raw = _paper_figure_policy(g, realigner, backend)
    values = {}
    for block_id in range(10):  # _commit_random's values: the second draw of the block's generator
        gen = torch.Generator().manual_seed(block_id)
        shape = (1, g.tokens_per_block, g.num_heads, g.head_dim)
        torch.randn(shape, generator=gen)
        values[block_id] = torch.randn(shape, generator=gen)
    return g, policy, raw, values


class SpyBackend(SdpaBackend):
    """The split SDPA backend, recording the keys of every part it attends."""

    def __init__(self) -> None:
        super().__init__(SdpaParams(split_context=True))
        self.parts: list[torch.Tensor] = []

    def attend_lse(self, q, k, v):
        self.parts.append(k)
        return super().attend_lse(q, k, v)


def test_paper_figure_split_equals_rope_recomputed_at_the_packed_positions():
    """S0 S1 → 2 3 (moved as one run, by +2, through the query), M3 M4 M5 M7 → 4 5 6 7
    (gathered and rotated), R8 R9 in place: the output equals attention over keys whose RoPE is
    recomputed at those positions, and the sink and recent parts are the stored pages."""
    backend = SpyBackend()
    g, policy, raw, values = _figure(backend, TemporalRopeShift())
    context = policy.context(_query(g, 10))
    gen = torch.Generator().manual_seed(99)
    q, k, v = (torch.randn(1, g.tokens_per_block, g.num_heads, g.head_dim, generator=gen) for _ in range(3))
    out = context.attend(0, q, k, v)
    rope = policy.model.rope
    order = [(0, 2), (1, 3), (3, 4), (4, 5), (5, 6), (7, 7), (8, 8), (9, 9)]
    keys = [rope.apply_grid(raw[b], g.block_grid, t) for b, t in order]
    expected = _attention(q, torch.cat([*keys, k], 1), torch.cat([*(values[b] for b, _ in order), v], 1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert context.context_tokens == 8 * g.tokens_per_block
    # three parts: the sink's page and the recent page where they are stored, then the copy
    sink, recent, gathered = backend.parts
    stored = {
        name: {b.layer_kv(0)[0].untyped_storage().data_ptr() for b in policy.tier_blocks(name)}
        for name in ("sink", "recent")
    }
    assert sink.untyped_storage().data_ptr() in stored["sink"]
    assert recent.untyped_storage().data_ptr() in stored["recent"]
    assert sink.shape[1] == recent.shape[1] == 2 * g.tokens_per_block
    assert gathered.shape[1] == 5 * g.tokens_per_block  # M3 M4 M5 M7 and the block itself


def test_a_realigner_that_cannot_move_the_query_keeps_the_copy():
    """Without ``shifts_query`` (a realigner whose rotation is not the query's inverse) the
    context gathers a moved copy as before, and still gives the right answer."""

    class KeysOnly(TemporalRopeShift):
        shifts_query = False

    spy = SpyBackend()
    g, policy, _, _ = _figure(spy, KeysOnly())
    _, reference, _, _ = _figure(SdpaBackend(), TemporalRopeShift())
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, g.tokens_per_block, g.num_heads, g.head_dim, generator=gen) for _ in range(3))
    out = policy.context(_query(g, 10)).attend(0, q, k, v)
    assert spy.parts == []  # attend(), not attend_lse(): one gathered context
    torch.testing.assert_close(out, reference.context(_query(g, 10)).attend(0, q, k, v))


# ---------------------------------------------------------------------- same contexts, both ways
@pytest.fixture(scope="module")
def engine():
    return full_packforcing_engine()


@pytest.mark.parametrize(
    "realigner",
    [TemporalRopeShift(), TemporalRopeShift(TemporalRopeShiftParams(anchor="window")), IdentityRealigner()],
    ids=["absolute", "window", "identity"],
)
def test_split_equals_the_gathered_copy(engine, realigner):
    """A full PackForcing context (two batch items picking different blocks): the same picks,
    position and context size, and outputs equal to rounding, on every layer."""
    policy = engine.policy
    saved = policy.realigner, policy.backend
    results = {}
    try:
        policy.realigner = realigner
        for name, backend in (("copy", SdpaBackend()), ("split", SPLIT)):
            policy.backend = backend
            ctx = policy.context(engine.query(BLOCKS))
            outs = [ctx.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(layer_qkv(engine, 1))]
            results[name] = (outs, ctx.selections, ctx.position, ctx.context_tokens)
    finally:
        policy.realigner, policy.backend = saved
    (copy, copy_sel, *copy_rest), (split, split_sel, *split_rest) = results["copy"], results["split"]
    assert copy_rest == split_rest
    assert all(torch.equal(copy_sel[key], split_sel[key]) for key in copy_sel)
    for a, b in zip(copy, split, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_a_split_context_attends_without_host_syncs(engine):
    policy = engine.policy
    saved = policy.backend
    policy.backend = SPLIT
    try:
        syncs = syncs_of_a_pass(policy, engine.query(BLOCKS), layer_qkv(engine, 0))
    finally:
        policy.backend = saved
    assert_one_read_per_block(syncs)


class NanQuery(TemporalRopeShift):
    """Moves the query to NaN at one layer (``keeps_finite`` claimed or not)."""

    def __init__(self, bad_layer: int, keeps_finite: bool) -> None:
        super().__init__()
        self.bad_layer, self.keeps_finite, self.calls = bad_layer, keeps_finite, 0

    def query_shifter(self, delta, rope):
        shift = super().query_shifter(delta, rope)

        def shifter(q):
            self.calls += 1
            out = shift(q)
            return out.fill_(float("nan")) if self.calls - 1 == self.bad_layer else out

        return shifter


@pytest.mark.parametrize(("keeps_finite", "blamed"), [(False, "realigner"), (True, "backend")])
def test_a_non_finite_moved_query_is_blamed_like_gathered_keys(engine, keeps_finite, blamed):
    policy = engine.policy
    saved = policy.realigner, policy.backend
    policy.realigner, policy.backend = NanQuery(bad_layer=1, keeps_finite=keeps_finite), SPLIT
    try:
        ctx = policy.context(engine.query(BLOCKS))
        for layer, qkv in enumerate(layer_qkv(engine, 3)):
            ctx.attend(layer, *qkv)  # no error yet: nothing read on the host
        with pytest.raises(PluginError, match="layer 1: ") as info:
            policy.settle()
        assert blamed in str(info.value)
    finally:
        policy.realigner, policy.backend = saved


def test_a_backend_returning_a_wrong_lse_is_named(engine):
    class BadLse(SdpaBackend):
        def attend_lse(self, q, k, v):
            out, lse = super().attend_lse(q, k, v)
            return out, lse[:, :1]

    policy = engine.policy
    saved = policy.backend
    policy.backend = BadLse(SdpaParams(split_context=True))
    try:
        ctx = policy.context(engine.query(BLOCKS))
        with pytest.raises(PluginError, match=r"backend.*layer 0: attend_lse\(\) log-sum-exp: expected shape"):
            ctx.attend(0, *layer_qkv(engine, 0)[0])
    finally:
        policy.backend = saved


# ---------------------------------------------------------------------- whole generations
@pytest.mark.parametrize(("policy", "visible"), CASES, ids=lambda c: getattr(c, "get", lambda k: None)("name"))
def test_split_generation_matches_the_uncached_reference(policy, visible):
    engine = engine_for(policy, backend={"name": "sdpa", "split_context": True})
    assert engine.policy.backend.split_context
    cached = generate(engine, NUM_BLOCKS, seed=3, batch_size=2)
    reference = reference_generate(
        engine.model, SdpaBackend(), NUM_BLOCKS, visible, sampler=engine.sampler, seed=3, batch_size=2
    )
    for block, ref in zip(cached, reference, strict=True):
        assert rel_err(block.latents, ref) <= 1e-5, block.index


def test_packforcing_generation_split_equals_copy():
    copy = [b.latents for b in packforcing_engine().generate(BLOCKS, seed=1)]
    split = [b.latents for b in packforcing_engine("backend.split_context=true").generate(BLOCKS, seed=1)]
    for a, b in zip(copy, split, strict=True):
        assert rel_err(b, a) <= 1e-5  # 1.2e-6 measured: float32 rounding, compounded over 13 blocks


def test_split_context_is_validated_with_its_key_path():
    with pytest.raises(ConfigError, match=r"backend\.split_context"):
        engine_for({"name": "full"}, backend={"name": "sdpa", "split_context": "often"})


# ---------------------------------------------------------------------- store runs
def test_adjacent_runs_join_adjacent_slots_of_one_page_in_any_order():
    from packforcing.core.store import TierStore

    store = TierStore(name="t", slot_tokens=2, num_layers=1, num_heads=1, head_dim=2, capacity=None, page_blocks=3)
    kv = [torch.zeros(1, 2, 1, 2)]
    slots = [store.put(kv, kv) for _ in range(5)]  # page 0: slots 0 1 2, page 1: slots 0 1
    runs = adjacent_runs([slots[4], slots[1], slots[0], slots[3]])
    assert [(s.page, s.index, n) for s, n in runs] == [(0, 0, 2), (1, 0, 2)]
    assert adjacent_runs([slots[2], slots[0]]) == [(slots[0], 1), (slots[2], 1)]
    k, _ = slots[0].span_kv(0, 3)
    assert k.shape == (1, 6, 1, 2) and k.data_ptr() == store.pages[0][0, 0].data_ptr()
    with pytest.raises(ValueError, match="no run of 3"):
        slots[1].span_kv(0, 3)


def test_span_views_do_not_keep_a_cleared_page_alive():
    import gc
    import weakref

    from packforcing.core.store import TierStore

    store = TierStore(name="t", slot_tokens=2, num_layers=1, num_heads=1, head_dim=2, capacity=None, page_blocks=2)
    kv = [torch.zeros(1, 2, 1, 2)]
    slots = [store.put(kv, kv) for _ in range(2)]
    assert slots[0].span_kv(0, 2) is slots[0].span_kv(0, 2)  # made once
    page = weakref.ref(store.pages[0])
    store.clear()
    gc.collect()
    assert page() is None and len(slots) == 2


@pytest.mark.parametrize(
    ("mid", "one_page"),
    [({"blocks": 8}, True), ({}, False)],  # bounded: one page of 8; unbounded: pages of 2 slots
    ids=["bounded-one-page", "unbounded-pages"],
)
@pytest.mark.parametrize("split", [False, True], ids=["copy", "split"])
def test_picks_gathered_from_one_page_or_stacked_equal_the_host_path(mid, one_page, split):
    """A bounded selected tier is one store page and its picks are gathered from it in one
    indexing; an unbounded one spans pages and its candidates are stacked. Either way the
    device-side path attends what the host path (picks read on the host) attends."""
    tiers = [
        {"name": "sink", "frames": 8, "pinned": True},
        {"name": "mid", **mid, "fidelity": "compressed", "select": True},
        {"name": "recent", "frames": 4},
    ]
    engine = engine_for(
        {"name": "tiered", "overflow": "drop", "tiers": tiers, "page_blocks": 2},
        compressor={"name": "pool", "window": [1, 2, 2]},
        selector={"name": "topk", "k": 3, "min_queries": 2},
        realigner={"name": "temporal_rope_shift"},
        backend={"name": "sdpa", "split_context": split},
    )
    session = engine.session(seed=0, batch_size=2)
    for _ in range(12):
        session.step()
    session.close()
    policy = engine.policy
    assert ({t.name: t.store.page_blocks for t in policy.tiers}["mid"] == 8) is one_page
    layers = layer_qkv(engine, 4)
    device_side = policy.context(engine.query(12))
    outs = [device_side.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(layers)]
    group = next(p for p in device_side._layout.pieces if p.group is not None)
    assert (group.page is not None) is one_page
    saved = policy.realigner
    policy.realigner = HostPath()
    try:
        host_side = policy.context(engine.query(12))
        expected = [host_side.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(layers)]
    finally:
        policy.realigner = saved
    assert host_side.selections.keys() == device_side.selections.keys()
    for a, b in zip(outs, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class HostPath(TemporalRopeShift):
    """``temporal_rope_shift`` without ``targets_from_frames``: picks read on the host."""

    targets_from_frames = False
