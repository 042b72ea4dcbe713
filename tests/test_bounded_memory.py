"""The tiered policy's bookkeeping does not grow with the video: block locations for the blocks
it holds only, dropped ids as runs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from packforcing.policies.layout import IdRuns

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_the_tiered_policy_keeps_locations_of_held_blocks_only_and_dropped_ids_as_runs():
    """The fix the census found: a location per block ever committed and a list of every
    dropped id grew by an entry each per block. Now: a location per held block, the dropped
    ids one run, and the same answers (``location``, ``dropped``, ``dropped_blocks``)."""
    from .helpers import engine_for

    engine = engine_for({"name": "sink_recent", "sink_frames": 4, "window_frames": 8}, steps=1)
    policy = engine.policy
    blocks = list(engine.generate(40, seed=0))
    policy.audit()
    held = [b.block_id for t in policy.tiers for b in t.blocks]
    assert held == [0, 38, 39] and sorted(policy._where) == held  # a sink block, a window of 2
    assert policy._dropped.runs == [(1, 38)]
    assert policy.dropped == list(range(1, 38)) and blocks[-1].stats.dropped_blocks == 37
    assert [policy.location(b) for b in (0, 1, 37, 38)] == ["sink", "drop", "drop", "recent"]
    with pytest.raises(KeyError):
        policy.location(40)
    with pytest.raises(ValueError, match=r"block 3 is not held at full resolution \(it is in drop\)"):
        policy.replace_kv(3, [], [], position=0.0)
    tensors, meta = policy.state_dict()  # a checkpoint lists them, as before
    assert meta["dropped"] == list(range(1, 38))
    policy.load_state_dict(tensors, meta)
    policy.audit()
    assert policy._dropped.runs == [(1, 38)] and sorted(policy._where) == held


@given(st.lists(st.integers(0, 40), max_size=60))
def test_id_runs_are_the_set_of_ids_added(ids):
    runs = IdRuns(ids)
    assert list(runs) == sorted(set(ids)) and len(runs) == len(set(ids))
    assert all((i in runs) == (i in ids) for i in range(-1, 42))
    starts = [i for i in sorted(set(ids)) if i - 1 not in ids]
    assert [start for start, _ in runs.runs] == starts  # maximal runs: one per gap
