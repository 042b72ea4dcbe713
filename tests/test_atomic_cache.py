"""The cache is atomic and plugin outputs are checked at the boundary.

A plugin failing during a commit (raising, NaN, wrong shape, grid, layer count, batch, dtype or
device) leaves the cache exactly as it was; the error is one :class:`PluginError` naming the
plugin (kind, name, distribution) and the block, with the plugin's own exception chained.
Selector, realigner and backend outputs are checked on every call.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
import torch

import packforcing as pf
from packforcing.core.errors import PluginError
from packforcing.core.interfaces import CachePolicy
from packforcing.core.store import NonFiniteError, TierStore

from .faults import (
    BACKEND_FAULTS,
    COMPRESSOR_FAULTS,
    KV_FAULTS,
    REALIGNER_FAULTS,
    SELECTOR_FAULTS,
    Boom,
    faulty,
    spoil_kv,
)
from .helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CONFIG: dict[str, Any] = {
    "model": TINY_MODEL,  # 4 frames x (2 x 3) tokens per block
    "policy": {
        "name": "packforcing",
        "sink_frames": 4,
        "recent_frames": 4,
        "mid_capacity_blocks": 3,
        "mid_overflow": "archive",
        "page_blocks": 2,
    },
    "compressor": {"name": "pool", "window": [2, 1, 1]},
    "selector": {"name": "topk", "k": 2, "min_queries": 2},
    "realigner": "temporal_rope_shift",
    "backend": "sdpa",
    "sampler": {"steps": 2},
    "run": {"device": "cpu", "dtype": "float32"},
}
BLOCKS = 9
# block 0 -> sink; from block 2 on, the block leaving recent is compressed into mid;
# from block 5 on, mid's oldest block is also archived in the same commit


class Recording(CachePolicy):
    """Delegates to a policy and keeps every commit it receives."""

    def __init__(self, inner: CachePolicy) -> None:
        self.inner, self.name = inner, inner.name
        self.commits: list[pf.BlockCommit] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.inner.reset()

    def commit(self, commit):
        self.commits.append(commit)
        self.inner.commit(commit)

    def context(self, query):
        return self.inner.context(query)

    def plan(self, num_blocks, batch_size=1):
        return self.inner.plan(num_blocks, batch_size)

    def stats(self):
        return self.inner.stats()


@pytest.fixture(scope="module")
def reference():
    """Every commit of an uninterrupted run, and the cache it ends with."""
    holder: dict[str, Recording] = {}

    def wrap(kind, component):
        if kind == "policy":
            holder["policy"] = Recording(component)
            return holder["policy"]
        return component

    engine = pf.build_engine(CONFIG, wrap=wrap)
    list(engine.generate(BLOCKS, seed=3))
    policy = holder["policy"]
    return policy.commits, snapshot(policy.inner)


def snapshot(policy) -> dict[str, Any]:
    """Everything observable about the cache: blocks per tier with their records, slots and K/V,
    archive, each store's free slots, dropped, locations and stats."""

    def blocks(held):
        return [
            (
                b.block_id,
                b.fidelity,
                b.grid,
                b.position,
                b.temporal_stride,
                b.condition,
                (b.slot.page, b.slot.index),
                [t.clone() for t in (*b.keys, *b.values)],
            )
            for b in held
        ]

    archive = policy._archive_store
    return {
        "tiers": {name: blocks(policy.tier_blocks(name)) for name in policy.tier_names},
        "archive": blocks(policy.archived),
        "free": {
            **{t.name: t.store.free_slots() for t in policy.tiers},
            "archive": archive.free_slots() if archive is not None else [],
        },
        "dropped": policy.dropped,
        "where": dict(policy._where),
        "stats": policy.stats(),
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(p, q) for p, q in zip(x, y, strict=True))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y

    return eq(a, b)


def faulty_engine():
    made: dict[str, Any] = {}
    engine = pf.build_engine(CONFIG, wrap=faulty(made))
    return engine, made


@pytest.mark.parametrize("at", [2, 6], ids=["first-compression", "while-archiving"])
@pytest.mark.parametrize("fault", COMPRESSOR_FAULTS)
def test_failing_compressor_leaves_the_cache_exactly_as_before(reference, fault, at):
    commits, final = reference
    engine, made = faulty_engine()
    policy = engine.policy
    for commit in commits[:at]:
        policy.commit(commit)
    before = snapshot(policy)
    made["compressor"].fault = fault
    with pytest.raises(PluginError) as caught:
        policy.commit(commits[at])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"compressor 'pool' (distribution packforcing), block {at - 1}: "), message
    assert (caught.value.kind, caught.value.name, caught.value.block) == ("compressor", "pool", at - 1)
    if fault == "raise":
        assert isinstance(caught.value.__cause__, Boom)
    assert same(snapshot(policy), before)
    policy.audit()
    assert policy.stats().tiers == policy.plan(at).tiers
    with pytest.raises(KeyError):
        policy.location(at)
    # the same commit goes through once the plugin behaves, and nothing was lost on the way
    made["compressor"].fault = None
    for commit in commits[at:]:
        policy.commit(commit)
    policy.audit()
    assert same(snapshot(policy), final)


def test_one_read_per_commit_raises_the_block_s_own_k_v_before_the_compressor_s_output(reference):
    """The block's K/V and the compressor's output are read together, after the compressor ran:
    when both are non-finite the block's own K/V are named (its checks come first), and a NaN
    compression alone still names the compressor; the cache is unchanged either way."""
    from packforcing.core.instrument import HostSyncCounter
    from packforcing.core.store import NonFiniteError

    commits, _ = reference
    engine, made = faulty_engine()
    policy = engine.policy
    for commit in commits[:2]:
        policy.commit(commit)
    before = snapshot(policy)
    made["compressor"].fault = "nan"
    poisoned = attrs.evolve(commits[2], keys=[k.clone().fill_(float("nan")) for k in commits[2].keys])
    with pytest.raises(NonFiniteError, match="block 2"):
        policy.commit(poisoned)
    assert same(snapshot(policy), before)
    with HostSyncCounter() as counter, pytest.raises(PluginError, match=r"compressor 'pool'.*non-finite"):
        policy.commit(commits[2])
    assert counter.reads["__bool__"] >= 1 and same(snapshot(policy), before)
    made["compressor"].fault = None
    with HostSyncCounter() as counter:
        policy.commit(commits[2])  # compresses block 1 into mid
    assert dict(counter.reads) == {"__bool__": 1}, dict(counter.reads)


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("nan", "non-finite"),
        ("int64", "torch.int64, expected torch.float32"),
        ("float64", "torch.float64, expected torch.float32"),
        ("grid", "produced grid (3, 2, 3), planned (2, 2, 3)"),
        ("layers", "returned 1 layers of keys and 1 of values, expected 2"),
        ("batch", "have batch 2, expected 1"),
        ("device", "is on meta, expected cpu"),
        ("tokens", "has shape (1, 11, 2, 16), expected (1, 12, 2, 16)"),
        ("type", "returned a list, expected a CompressedKV"),
    ],
)
def test_compressor_output_problems_are_named(reference, fault, problem):
    commits, _ = reference
    engine, made = faulty_engine()
    for commit in commits[:2]:
        engine.policy.commit(commit)
    made["compressor"].fault = fault
    with pytest.raises(PluginError, match="compressor 'pool'") as caught:
        engine.policy.commit(commits[2])
    assert problem in str(caught.value)


def test_generation_stops_with_the_plugin_error_and_keeps_the_cache():
    """The issue's case through the engine: the compressor fails while blocks are generated."""
    engine, made = faulty_engine()
    stream = engine.generate(BLOCKS, seed=3)
    done = [next(stream) for _ in range(6)]
    before = snapshot(engine.policy)
    made["compressor"].fault = "raise"
    with pytest.raises(PluginError, match=r"^compressor 'pool' \(distribution packforcing\), block 5: raised Boom"):
        next(stream)
    assert same(snapshot(engine.policy), before)
    assert len(done) == 6
    engine.policy.audit()


def _spoil(tensors: dict[str, torch.Tensor], meta: dict[str, Any], fault: str, monkeypatch) -> None:
    """Spoil a checkpoint of the cache after 7 blocks (sink [0], mid [3, 4, 5] filling its one
    page, recent [6], archive [1, 2]) as ``fault`` names, in place."""
    mid, recent = meta["tiers"]["mid"], meta["tiers"]["recent"]
    key = f"{recent[-1]['key']}.kv"
    kv = tensors[key]  # [2, L, B, N, H, D]
    if fault == "out_of_memory":  # the third page the load allocates (mid's, after sink's and recent's)
        pages = []
        new_page = TierStore._new_page

        def failing(store):
            pages.append(store.name)
            if len(pages) == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            new_page(store)

        monkeypatch.setattr(TierStore, "_new_page", failing)
    elif fault == "missing":
        del tensors[key]
    elif fault in ("nan", "inf"):
        tensors[key] = kv.clone().index_fill_(3, torch.tensor([0]), float(fault))
    elif fault == "record":
        del recent[-1]["grid"]
    elif fault == "repeated_id":
        recent[-1]["block_id"] = 0
    elif fault == "slot_taken":
        mid[1]["slot"] = mid[0]["slot"]
    elif fault == "slot_off_page":
        mid[0]["slot"] = [1, 0]
    elif fault == "free":
        meta["free"]["mid"] = [[0, 0]]
    else:
        tensors[key] = {
            "heads": lambda: kv[..., :1, :],
            "head_dim": lambda: kv[..., :-2],
            "layers": lambda: kv[:, :1],
            "tokens": lambda: kv[:, :, :, :-1],
            "batch": lambda: torch.cat([kv, kv], dim=2),
            "float64": kv.double,
        }[fault]()


CHECKPOINT_FAULTS = [
    ("heads", ValueError, r"block 6: K/V \(2, 2, 1, 24, 1, 16\), expected \[2, 2, B, 24, 2, 16\]"),
    ("head_dim", ValueError, r"block 6: K/V \(2, 2, 1, 24, 2, 14\), expected"),
    ("layers", ValueError, r"block 6: K/V \(2, 1, 1, 24, 2, 16\), expected"),
    ("tokens", ValueError, r"block 6: K/V \(2, 2, 1, 23, 2, 16\), expected"),
    ("batch", ValueError, r"block 6: K/V of batch 2, block 0's of batch 1"),
    ("float64", ValueError, r"block 6: K/V are torch.float64, the cache holds torch.float32"),
    ("nan", NonFiniteError, r"checkpoint: tier 'recent', layer 0: refusing non-finite"),
    ("inf", NonFiniteError, r"checkpoint: tier 'recent', layer 0: refusing non-finite"),
    ("missing", ValueError, r"block 6: K/V missing"),
    ("record", ValueError, r"a malformed block record \(KeyError: 'grid'\)"),
    ("repeated_id", ValueError, r"block ids \[0, 0, 1, 2, 3, 4, 5\] repeat"),
    ("slot_taken", ValueError, r"tier 'mid': slots .* are not 3 distinct slots of 1 page\(s\) of 3"),
    ("slot_off_page", ValueError, r"tier 'mid': slots \[\(1, 0\), .* are not 3 distinct slots"),
    ("free", ValueError, r"tier 'mid': free slots \[\(0, 0\)\] are not the slots left over"),
    ("out_of_memory", RuntimeError, r"out of memory"),
]


@pytest.mark.parametrize(("fault", "error", "message"), CHECKPOINT_FAULTS, ids=[f[0] for f in CHECKPOINT_FAULTS])
def test_a_bad_checkpoint_is_refused_with_the_cache_exactly_as_before(reference, monkeypatch, fault, error, message):
    """Loading a checkpoint is all or nothing: one that does not fit (a block's K/V of another
    head count, head size, layer count, token count, batch or dtype; non-finite or missing; a
    malformed record, a block id twice, slots taken twice or off the pages, a wrong free list)
    or whose pages cannot be allocated is refused with one clear error, and the cache is
    exactly as before: the same blocks, K/V, slots and stats. The good checkpoint then loads
    and the run goes on to the uninterrupted run's cache."""
    commits, final = reference
    engine, _ = faulty_engine()
    policy = engine.policy
    for commit in commits[:7]:
        policy.commit(commit)
    tensors, meta = policy.state_dict()
    before = snapshot(policy)
    bad_tensors, bad_meta = dict(tensors), copy.deepcopy(meta)
    _spoil(bad_tensors, bad_meta, fault, monkeypatch)
    with pytest.raises(error, match=message):
        policy.load_state_dict(bad_tensors, bad_meta)
    monkeypatch.undo()
    assert same(snapshot(policy), before)
    policy.audit()
    policy.load_state_dict(tensors, meta)
    assert same(snapshot(policy), before)
    for commit in commits[7:]:
        policy.commit(commit)
    assert same(snapshot(policy), final)


@pytest.mark.parametrize("fault", KV_FAULTS)
def test_replace_kv_refuses_what_a_commit_refuses(reference, fault):
    """A re-cache's new K/V for a block are checked as a commit's are (layers, tokens, batch,
    dtype, device, finiteness): refused with a ValueError naming the block and the problem, and
    the cache exactly as before."""
    commits, _ = reference
    engine, _ = faulty_engine()
    policy = engine.policy
    for commit in commits[:3]:
        policy.commit(commit)
    block = policy.full_resolution_blocks()[-1]
    keys, values = spoil_kv([k.clone() for k in block.keys], [v.clone() for v in block.values], fault)
    before = snapshot(policy)
    with pytest.raises(ValueError, match=f"block {block.block_id}") as caught:
        policy.replace_kv(block.block_id, keys, values, position=block.position + 1, condition={"scene": 1})
    problem = {"int64": "torch.int64, expected torch.float32", "float64": "torch.float64, expected torch.float32"}
    assert problem.get(fault, "") in str(caught.value)
    assert same(snapshot(policy), before)


def _run_until_selection(fault_kind: str, fault: str, blocks: int = 6):
    engine, made = faulty_engine()
    made[fault_kind].fault = fault
    with pytest.raises(PluginError) as caught:
        list(engine.generate(blocks, seed=1))
    return caught.value


@pytest.mark.parametrize("fault", SELECTOR_FAULTS)
def test_selector_output_is_checked(fault):
    # mid holds 3 blocks (k=2) from block 4 on: selection with a real choice
    err = _run_until_selection("selector", fault)
    assert str(err).startswith("selector 'topk' (distribution packforcing), block ")
    expected = {
        "raise": "raised Boom",
        "out_of_range": "outside [0, ",
        "negative": "outside [0, ",
        "duplicate": "duplicate indices",
        "reversed": "not in increasing (time) order",
        "float": "torch.float32 indices, expected int64",
        "shape": "expected (1, ",
    }[fault]
    assert expected in str(err), str(err)


@pytest.mark.parametrize("fault", REALIGNER_FAULTS)
def test_realigner_output_is_checked(fault):
    err = _run_until_selection("realigner", fault)
    assert str(err).startswith("realigner 'temporal_rope_shift' (distribution packforcing), block "), str(err)
    expected = {
        "raise": "raised Boom",
        "targets": "targets for",
        "nan_target": "must be a finite number",
        "shape": "gather() keys has shape",
        "dtype": "gather() keys is torch.float64",
        "nan_keys": "non-finite",
    }[fault]
    assert expected in str(err), str(err)


@pytest.mark.parametrize("fault", BACKEND_FAULTS)
def test_backend_output_is_checked(fault):
    err = _run_until_selection("backend", fault, blocks=1)
    assert str(err).startswith("backend 'sdpa' (distribution packforcing), block 0: "), str(err)
    expected = {"raise": "raised Boom", "nan": "non-finite", "shape": "has shape", "dtype": "torch.float64"}[fault]
    assert expected in str(err), str(err)
