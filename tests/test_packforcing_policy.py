"""The ``packforcing`` policy: three partitions as a tier composition, its YAML twins, the
four-tier variant, per-item selection, archive accounting and the early plateau."""

from __future__ import annotations

import pytest
import torch

import packforcing as pf
from packforcing.core.interfaces import PositionalRealigner, Selector
from packforcing.output.report import RunReport

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CPU = ["run.device=cpu", "backend.name=sdpa"]
SINK, RECENT, MID = 2, 2, 8  # blocks, in configs/packforcing.yaml


def load(path: str, *overrides: str) -> pf.Config:
    return pf.load_config(path, overrides=[*CPU, *overrides])


class Recording(PositionalRealigner):
    """Wraps a realigner; records each gather as ``(query position, [(block, target), ...])``."""

    def __init__(self, inner: PositionalRealigner) -> None:
        self.inner = inner
        self.name = inner.name
        self.gathers: list[tuple[float, list[tuple[pf.CachedBlock, float]]]] = []

    def assign(self, spans, query):
        targets, position = self.inner.assign(spans, query)
        self.gathers.append((position, []))
        return targets, position

    def realign(self, keys, block, target, rope):
        self.gathers[-1][1].append((block, float(target)))
        return self.inner.realign(keys, block, target, rope)


class PerItemSpy(Selector):
    """Wraps a selector; records each call's choice and, for every batch item, the choice the
    inner selector makes for that item alone (its queries and its rows of the candidates)."""

    def __init__(self, inner: Selector) -> None:
        self.inner = inner
        self.name = inner.name
        self.shared_across_layers = inner.shared_across_layers
        self.calls: list[tuple[torch.Tensor, list[list[int]], int]] = []

    def budget(self, num_candidates):
        return self.inner.budget(num_candidates)

    def select(self, queries, candidates, layer):
        idx = self.inner.select(queries, candidates, layer)
        alone = [
            self.inner.select(queries[b : b + 1], [_row(c, b) for c in candidates], layer)[0].tolist()
            for b in range(queries.shape[0])
        ]
        self.calls.append((idx, alone, len(candidates)))
        return idx


@pytest.fixture(scope="module")
def run():
    """configs/packforcing.yaml for 20 blocks; what every tier held after each block."""
    engine = pf.build_engine(load("configs/packforcing.yaml"))
    policy = engine.policy
    history = []
    sink_snapshot = {}
    for block in engine.generate(20):
        tiers = {name: policy.tier_blocks(name) for name in policy.tier_names}
        for b in tiers["sink"]:
            sink_snapshot.setdefault(b.block_id, [k.clone() for k in b.keys])
        history.append(
            {
                "tiers": {name: [b.block_id for b in blocks] for name, blocks in tiers.items()},
                "fidelity": {name: {b.fidelity for b in blocks} for name, blocks in tiers.items()},
                "grids": {name: {b.grid for b in blocks} for name, blocks in tiers.items()},
                "archived": [b.block_id for b in policy.archived],
                "stats": block.stats,
                "latents": block.latents,
                "sink_now": {b.block_id: [k.clone() for k in b.keys] for b in tiers["sink"]},
            }
        )
    return engine, history, sink_snapshot


def test_three_partitions(run):
    _, history, snapshot = run
    for n, state in enumerate(history):  # after committing block n
        ids = list(range(n + 1))
        sink = ids[:SINK]
        rest = ids[SINK:]
        recent = rest[-RECENT:]
        mid = rest[: len(rest) - len(recent)][-MID:]
        archived = rest[: max(0, len(rest) - RECENT - MID)]
        assert state["tiers"] == {"sink": sink, "mid": mid, "recent": recent}
        assert state["archived"] == archived
        assert state["fidelity"]["sink"] <= {"full"} and state["fidelity"]["recent"] <= {"full"}
        assert state["fidelity"]["mid"] <= {"dual_branch"}
        assert state["grids"]["mid"] <= {(2, 1, 1)}  # 64 tokens -> 2
        # the block that left recent in this step is already compressed in mid, its full slot freed
        if len(rest) > RECENT:
            assert rest[-RECENT - 1] == mid[-1]
            assert state["stats"].tiers["recent"].tokens == RECENT * 64
        # the sink is never evicted nor modified
        for block_id, keys in state["sink_now"].items():
            for a, b in zip(keys, snapshot[block_id], strict=True):
                assert torch.equal(a, b)


def test_budget_plateaus_within_20_blocks_and_matches_the_plan(run):
    engine, history, _ = run
    active = [s["stats"].bytes for s in history]
    tokens = [s["stats"].tokens for s in history]
    full_at = SINK + RECENT + MID  # 12 blocks
    assert all(a == active[-1] for a in active[full_at - 1 :])  # pages are allocated in steps of 4 slots
    assert all(t == tokens[-1] for t in tokens[full_at - 1 :]) and tokens[full_at - 2] < tokens[-1]
    assert active[0] < active[-1]
    planned = engine.policy.plan(20)
    assert planned.bytes == active[-1]
    assert planned.archive.bytes == history[-1]["stats"].archive.bytes > 0
    assert planned.tiers == history[-1]["stats"].tiers


def test_report_keeps_the_archive_apart(run):
    engine, history, _ = run
    report = RunReport(
        config={}, full_bytes_per_block=engine.geometry.tokens_per_block * engine.geometry.bytes_per_token
    )
    for i, state in enumerate(history):
        report.add(pf.GeneratedBlock(i, 4 * i, state["latents"], 0.0, 0, state["stats"]))
    data = report.as_dict()
    assert data["peak_cache_bytes"] == history[-1]["stats"].bytes
    assert data["archive_bytes"] == history[-1]["stats"].archive.bytes > 0


def test_written_as_tiered_yaml_gives_identical_output(run):
    _, history, _ = run
    twin = pf.build_engine(load("configs/packforcing_tiered.yaml"))
    assert twin.policy.name == "tiered"
    for state, block in zip(history, twin.generate(14), strict=False):
        assert torch.equal(state["latents"], block.latents)
        assert state["stats"] == block.stats


def test_context_is_sink_selected_mid_recent_packed_before_the_block():
    config = load("configs/packforcing.yaml")
    engine = pf.build_engine(config)
    policy = engine.policy
    recorder = Recording(policy.realigner)
    policy.realigner = recorder
    for _ in engine.generate(15, batch_size=2):
        pass
    g = engine.geometry
    query = pf.BlockQuery(15, 60, 4, g.block_grid)
    context = policy.context(query)
    recorder.gathers.clear()
    x = torch.randn(2, 16, 4, 8, 8)
    engine.model.denoise(x, torch.full((2,), 700.0), context)
    assert recorder.gathers
    sink = [b.block_id for b in policy.tier_blocks("sink")]
    recent = [b.block_id for b in policy.tier_blocks("recent")]
    mid = [b.block_id for b in policy.tier_blocks("mid")]
    for position, gathered in recorder.gathers:
        ids = [b.block_id for b, _ in gathered]
        chosen_mid = ids[len(sink) : len(ids) - len(recent)]
        assert ids[: len(sink)] == sink and ids[len(ids) - len(recent) :] == recent
        assert len(chosen_mid) == 4 and set(chosen_mid) <= set(mid) and chosen_mid == sorted(chosen_mid)
        targets = [t for _, t in gathered]
        frames = [b.num_frames for b, _ in gathered]
        assert position == 60.0
        assert [t + n for t, n in zip(targets, frames, strict=True)] == [*targets[1:], position]
        # recent blocks kept their positions
        assert [t for b, t in gathered if b.block_id in recent] == [b.position for b in policy.tier_blocks("recent")]


def test_selection_is_per_batch_item():
    engine = pf.build_engine(load("configs/packforcing.yaml"))
    spy = PerItemSpy(engine.policy.selector)
    engine.policy.selector = spy
    for _ in engine.generate(14, batch_size=2):
        pass
    assert spy.calls
    rows_differ = False
    for idx, alone, num_candidates in spy.calls:
        assert idx.shape == (2, min(4, num_candidates))
        assert idx.tolist() == alone
        rows_differ |= idx[0].tolist() != idx[1].tolist()
    assert rows_differ


class _RowSlot:
    def __init__(self, block: pf.CachedBlock, row: int) -> None:
        self.block, self.row = block, row
        self.num_layers = block.slot.num_layers

    def layer_kv(self, layer):
        k, v = self.block.layer_kv(layer)
        return k[self.row : self.row + 1], v[self.row : self.row + 1]


def _row(block: pf.CachedBlock, row: int):
    import attrs

    return attrs.evolve(block, slot=_RowSlot(block, row))


def test_drop_overflow_drops_instead_of_archiving():
    engine = pf.build_engine(load("configs/packforcing.yaml", "policy.mid_overflow=drop", "sampler.steps=1"))
    block = list(engine.generate(14))[-1]
    assert engine.policy.dropped == [2, 3]
    assert engine.policy.archived == [] and block.stats.archive.bytes == 0
    assert block.stats.dropped_blocks == 2


def test_four_tier_yaml_variant():
    """sink / mid 32x / far 128x / recent, from YAML alone."""
    engine = pf.build_engine(load("configs/packforcing_4tier.yaml", "sampler.steps=1"))
    policy = engine.policy
    assert policy.tier_names == ["sink", "far", "mid", "recent"]
    num = 2 + 16 + 4 + 2 + 2
    block = list(engine.generate(num))[-1]
    full = engine.geometry.tokens_per_block
    assert full == 256
    mid, far = policy.tier_blocks("mid"), policy.tier_blocks("far")
    assert len(mid) == 4 and len(far) == 16 and len(policy.archived) == 2
    assert {b.grid for b in mid} == {(2, 2, 2)} and full // mid[0].num_tokens == 32
    assert {b.grid for b in far} == {(2, 1, 1)} and full // far[0].num_tokens == 128
    assert {b.fidelity for b in far} == {"pool"} and {b.fidelity for b in mid} == {"dual_branch"}
    assert [b.block_id for b in far] == list(range(4, 20)) and [b.block_id for b in policy.archived] == [2, 3]
    assert policy.plan(num).tiers == block.stats.tiers
    # the far tier is attended through the selector too: sink + 4 far + 4 mid + recent
    assert block.context_tokens == 2 * full + 4 * 2 + 4 * 8 + 2 * full


def test_packforcing_needs_a_compressor_and_a_selector():
    with pytest.raises(pf.ConfigError, match="configure a compressor"):
        pf.build_engine(load("configs/packforcing.yaml", "compressor=null"))
    with pytest.raises(pf.ConfigError, match="configure a selector"):
        pf.build_engine(load("configs/packforcing.yaml", "selector=null"))
    with pytest.raises(pf.ConfigError, match=r"policy\.mid_overflow: expected one of archive, drop"):
        load("configs/packforcing.yaml", "policy.mid_overflow=keep")
