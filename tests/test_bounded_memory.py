"""Memory is the product: once the tiers are full, nothing outside the cache grows either.

A bounded policy's cache bytes are checked elsewhere (stats against the plan; on CUDA
``max_memory_allocated`` per block, ``tests/test_device_runs.py``). Here, on the CPU, two
censuses taken at block N (every tier, and a bounded archive, full) and at a later block M
must be equal:

- **tensors**: every live ``torch.Tensor`` of the process (``gc.get_objects()``), counted as
  distinct storages (``untyped_storage().data_ptr()``) with their bytes, and as tensor objects
  (views included), the parameters and buffers of every ``nn.Module`` set apart (counted, not
  added). This sees the cache, and also anything else: the engine, the session, the sampler,
  the model (Wan's cross-attention K/V per condition and layer), compressors' and selectors'
  scratch, the realigner's and RoPE's tables, the backend, and in the CLI's run loop the video
  writer, the streaming VAE decoder's causal cache, the return tracker and the checkpoints;
- **bookkeeping**: the Python objects reachable from the session (or the CLI's
  :class:`~packforcing.cli.run_files.RunFiles`), numbers and strings aside, and the entries of
  every container among them: a dict keyed by block id or a list appended per block grows
  here even when it holds no tensor (the tiered policy's block locations and dropped ids did,
  one entry each per block, until they were kept for held blocks only and as runs).

Grows by design, and is checked or bounded apart:

- ``report.json``'s per-block records (``RunReport.blocks``: one per block) and returns
  (``RunReport.returns``: one per cut back to an earlier condition, so at most one per block):
  left out of the bookkeeping census, counted instead;
- the archive when ``archive_max_blocks`` is ``null`` (the ``packforcing`` preset's default:
  mid overflow kept outside the budget, reported as ``archive_bytes``): the tensor census grows
  by exactly the archive store's new pages, nothing else;
- the ``full`` policy (its cache is the video) and ``--save-latents`` (every block's latents,
  kept on the host for ``latents.safetensors``) are not run here;
- bounded by construction: the return tracker's one decoded frame per distinct condition of
  the schedule (the schedules here show all of theirs before block N), RoPE's ``lru_cache``
  tables (at most 64 and 16 entries), the ``topk`` selector's key means (weakly keyed by the
  block, gone with it), Wan's cross-attention K/V (per condition of the open session's
  schedule and per layer).

A planted leak (each block's latents kept in a list) is seen by both censuses: the test of it
keeps the census honest (``gc.get_objects()`` must see tensors for any of this to mean
something).
"""

from __future__ import annotations

import gc
import itertools
import json
import types
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import packforcing as pf
from packforcing.cli import generate
from packforcing.cli.run_files import RunFiles
from packforcing.policies.layout import IdRuns

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PRESET = ["run.device=cpu", "backend.name=sdpa", "sampler.steps=2"]  # fewer steps: the same memory, sooner


@attrs.frozen
class Tensors:
    storages: int
    """Distinct storages of live tensors, weights aside."""
    nbytes: int
    """Their bytes."""
    objects: int
    """Live tensor objects (views included, weights aside)."""
    weights: int
    """Distinct storages of modules' parameters and buffers."""


@attrs.frozen
class Census:
    tensors: Tensors
    objects: int
    """Python objects reachable from the roots, numbers and strings aside."""
    entries: int
    """Entries of the containers among them (dict, list, tuple, set, deque)."""


def tensor_census() -> Tensors:
    """Every live tensor of the process; holds no reference once it returns."""
    gc.collect()
    weights: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    objects = 0
    live = [obj for obj in gc.get_objects() if issubclass(type(obj), (torch.Tensor, torch.nn.Module))]
    for obj in live:
        if isinstance(obj, torch.nn.Module):
            held = itertools.chain(obj.parameters(recurse=False), obj.buffers(recurse=False))
            weights.update(t.untyped_storage().data_ptr() for t in held)
    for obj in live:
        if isinstance(obj, torch.nn.Module):
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage of its own (sparse, functional)
            continue
        if storage.data_ptr() in weights:
            continue
        objects += 1
        if storage.nbytes():
            storages[(obj.device.type, storage.data_ptr())] = storage.nbytes()
    del live
    return Tensors(len(storages), sum(storages.values()), objects, len(weights))


ATOMS = (int, float, complex, str, bytes, bool, type(None))
OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
)
CONTAINERS = (dict, list, tuple, set, frozenset, deque)


def bookkeeping(roots: Iterable[Any], apart: Iterable[Any] = ()) -> tuple[int, int]:
    """``(objects, entries)`` reachable from ``roots`` (not through ``apart``, nor into tensors,
    modules' code, functions or classes): numbers and strings are not counted (small ints are
    shared, larger ones not, so their count depends on the values), containers' entries are."""
    seen = {id(obj) for obj in apart}
    stack = list(roots)
    objects = entries = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, OPAQUE):
            continue
        if not isinstance(obj, ATOMS):
            objects += 1
        if isinstance(obj, CONTAINERS):
            entries += len(obj)
        if not isinstance(obj, torch.Tensor):
            stack.extend(gc.get_referents(obj))
    return objects, entries


def census(roots: Iterable[Any], apart: Iterable[Any] = ()) -> Census:
    tensors = tensor_census()
    return Census(tensors, *bookkeeping(roots, apart))


def session_census(
    engine: Any, n: int, m: int, *, conditions: Any = None, recache: bool = False, planted: bool = False
) -> dict[int, Census]:
    """Censuses at blocks ``n`` and ``m`` of one session on ``engine``; ``planted``: keep every
    block's latents in a list on the session (a leak)."""
    taken: dict[int, Census] = {}
    with engine.session(seed=0, conditions=conditions, recache=recache) as session:
        session.planted = []
        while session.blocks_done < m:
            block = session.step()
            if planted:
                session.planted.append(block.latents)
            if session.blocks_done in (n, m):
                taken[session.blocks_done] = census([engine, session])
    return taken


def scenes(blocks: int, count: int) -> list[dict[str, int]]:
    """A schedule cutting to the next of ``count`` scenes at every block (each seen by block
    ``count``, every block after that a return)."""
    return [{"from_block": b, "scene": b % count} for b in range(blocks)]


# n: the tiers (and a bounded archive of 2) are full and blocks are dropped: packforcing's 2 sink
# + 8 mid + 2 recent blocks and 2 archived, sink_recent's 2 sink + 2 recent; m - n: whole turns
# of the scenes. sink_recent re-caches its blocks at every cut (the session keeps the latents of
# the blocks held at full resolution).
CASES = {
    "packforcing": ("packforcing", ["policy.archive_max_blocks=2"], 16, 20, False),
    "sink_recent": ("sink_recent", [], 6, 10, True),
}


@pytest.mark.parametrize("case", CASES)
def test_a_session_holds_the_same_tensors_and_bookkeeping_at_block_n_and_m(case):
    preset, overrides, n, m, recache = CASES[case]
    engine = pf.build_engine(pf.load_config(preset, overrides=[*PRESET, *overrides]))
    taken = session_census(engine, n, m, conditions=scenes(m, 2), recache=recache)
    assert taken[m] == taken[n], f"{case}: block {n} {taken[n]}, block {m} {taken[m]}"
    assert taken[n].tensors.storages > 0 and taken[n].entries > 0  # the census sees something


def test_the_census_sees_a_planted_leak():
    """Each block's latents kept in a list: ``m - n`` more storages of a block's latents'
    bytes, ``m - n`` more entries and tensor objects."""
    preset, overrides, n, m, _ = CASES["sink_recent"]
    engine = pf.build_engine(pf.load_config(preset, overrides=[*PRESET, *overrides]))
    taken = session_census(engine, n, m, planted=True)
    grew = m - n
    latents = 4 * torch.Size(engine.block_shape(1)).numel()  # float32
    before, after = taken[n].tensors, taken[m].tensors
    assert (after.storages - before.storages, after.nbytes - before.nbytes) == (grew, grew * latents)
    assert after.objects - before.objects == grew
    assert taken[m].entries - taken[n].entries == grew


def test_an_unbounded_archive_is_all_that_grows():
    """The ``packforcing`` preset as shipped (``archive_max_blocks: null``): the tensor census
    grows by the archive store's new pages (a tensor and a storage each) and their bytes,
    nothing else."""
    engine = pf.build_engine(pf.load_config("packforcing", overrides=PRESET))
    policy = engine.policy
    n, m = 13, 17
    archive: dict[int, tuple[int, int]] = {}
    taken: dict[int, Tensors] = {}
    with engine.session(seed=0) as session:
        while session.blocks_done < m:
            session.step()
            if session.blocks_done in (n, m):
                store = policy.archive_store
                archive[session.blocks_done] = (len(store.pages), store.nbytes)
                taken[session.blocks_done] = tensor_census()
    pages, nbytes = (archive[m][i] - archive[n][i] for i in range(2))
    assert pages > 0 and len(policy.archived) == m - 12  # all but 2 sink, 8 mid and 2 recent
    grew = taken[m]
    less = attrs.evolve(grew, storages=grew.storages - pages, nbytes=grew.nbytes - nbytes, objects=grew.objects - pages)
    assert less == taken[n], f"block {n} {taken[n]}, block {m} {grew}, the archive {pages} pages, {nbytes} bytes more"


class RecordedRunFiles(RunFiles):
    """The run's writer, remembered (``last``) so the census can start from it."""

    last: RunFiles | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordedRunFiles.last = self


def run_census(
    monkeypatch, config: Any, out: Path, n: int, m: int, overrides: list[str], *, checkpoint_every: int
) -> dict[int, Census]:
    """Censuses at blocks ``n`` and ``m`` of ``packforcing generate``'s run loop
    (:func:`~packforcing.cli.generate.run_job`, checkpointing every ``checkpoint_every`` blocks),
    from its
    :class:`RunFiles`: the session, engine, report, video writers, decoder and return tracker;
    the report's per-block records and returns apart (they grow by design: checked here)."""
    monkeypatch.setattr(generate, "RunFiles", RecordedRunFiles)
    taken: dict[int, Census] = {}

    def on_block(done: int) -> None:
        if done in (n, m):
            files = RecordedRunFiles.last
            assert files is not None
            report = files.report
            assert len(report.blocks) == done and len(report.returns) < done
            taken[done] = census([files], apart=[report.blocks, report.returns])

    # one block past m: a checkpoint is written after block m as after block n (none after the last)
    overrides = [f"run.blocks={m + 1}", f"run.checkpoint_every={checkpoint_every}", *overrides]
    report = generate.run_job(config, out, overrides=overrides, on_block=on_block)
    assert report["status"] == "complete" and report["returns"]  # the tracker measured returns
    RecordedRunFiles.last = None
    return taken


def test_the_cli_run_loop_holds_the_same_tensors_and_bookkeeping_at_block_n_and_m(tmp_path, monkeypatch):
    n, m = 6, 12  # m - n: whole checkpoint periods (3) and turns of the scenes (3)
    overrides = [*PRESET, f"run.prompts={json.dumps(scenes(m + 1, 3))}"]
    taken = run_census(monkeypatch, "sink_recent", tmp_path / "run", n, m, overrides, checkpoint_every=3)
    assert taken[m] == taken[n], f"block {n} {taken[n]}, block {m} {taken[m]}"


def test_a_wan_run_holds_the_same_tensors_and_bookkeeping_at_block_n_and_m(tmp_path, monkeypatch):
    """The tiny random Wan transformer and VAE (streamed decoding: its causal cache carries
    across blocks), two prompts taking turns (their cross-attention K/V cached per layer),
    the ``packforcing`` policy with ``pool`` and ``topk``."""
    from .tiny_wan_io import write_tiny_vae
    from .wan_fixtures import tiny_transformer, write_diffusers, write_embeds

    root = write_diffusers(tiny_transformer(), tmp_path / "wan", pipeline=True)
    write_tiny_vae(root, pipeline=True)
    prompts = [write_embeds(tmp_path / f"prompt_{seed}.safetensors", seed=seed) for seed in (1, 2)]
    # n: 1 sink + 2 mid + 1 recent + 1 archived block, and one dropped; m - n: a checkpoint
    # period, a turn of the prompts
    n, m = 6, 8
    config = {
        "model": {"name": "wan", "path": str(root), "frames_per_block": 2, "latent_height": 4, "latent_width": 6},
        "policy": {
            "name": "packforcing",
            "sink_frames": 2,
            "recent_frames": 2,
            "mid_capacity_blocks": 2,
            "archive_max_blocks": 1,
        },
        "compressor": {"name": "pool", "window": [2, 2, 2]},
        "selector": {"name": "topk", "k": 2, "min_queries": 4},
        "backend": "sdpa",
        "sampler": {"name": "self_forcing"},
        "run": {
            "device": "cpu",
            "dtype": "float32",
            "fps": 16,
            "prompts": [{"from_block": b, "embeds": str(prompts[b % 2])} for b in range(m + 1)],
        },
    }
    taken = run_census(monkeypatch, config, tmp_path / "run", n, m, [], checkpoint_every=2)
    assert taken[m] == taken[n], f"block {n} {taken[n]}, block {m} {taken[m]}"


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
    tensors, meta = policy.state_dict()  # a checkpoint holds them as runs too
    assert meta["dropped"] == [[1, 38]]
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


def test_a_numpy_integer_id_is_located_as_before_the_runs():
    """``location`` took any id a dict keyed by ``int`` finds (a numpy integer: ids from
    ``np.arange``, an array of block indices): a dropped block's too, now that those are runs."""
    import numpy as np

    from .helpers import engine_for

    engine = engine_for({"name": "sink_recent", "sink_frames": 4, "window_frames": 8}, steps=1)
    policy = engine.policy
    list(engine.generate(6, seed=0))
    ids = np.arange(6)
    assert [policy.location(b) for b in ids] == [policy.location(int(b)) for b in ids]
    assert policy.location(ids[2]) == "drop" and np.int64(2) in policy._dropped
    with pytest.raises(ValueError, match=r"block 2 is not held at full resolution \(it is in drop\)"):
        policy.replace_kv(ids[2], [], [], position=0.0)
    assert 2.5 not in policy._dropped and "2" not in policy._dropped


@given(st.lists(st.integers(0, 40), max_size=60))
def test_id_runs_from_their_runs_are_the_same_ids(ids):
    runs = IdRuns(ids)
    again = IdRuns.from_runs(runs.runs)
    assert again.runs == runs.runs and list(again) == list(runs) and len(again) == len(runs)
    split = [(i, i + 1) for i in runs]  # adjacent runs are joined
    assert IdRuns.from_runs(split).runs == runs.runs


@pytest.mark.parametrize(("runs", "message"), [([(3, 3)], "empty"), ([(0, 5), (4, 8)], "is not after")])
def test_id_runs_from_runs_refuses_empty_or_unsorted_runs(runs, message):
    with pytest.raises(ValueError, match=message):
        IdRuns.from_runs(runs)


SLIDING = {"name": "sliding_window", "window_frames": 8}
"""Two blocks of 4 frames: from block 2 on, every commit drops a block."""


def sliding_session(blocks: int) -> tuple[Any, Any]:
    """A sliding-window engine (one sampler step: the same cache, sooner) and its open session
    after ``blocks`` blocks."""
    from .helpers import engine_for

    engine = engine_for(SLIDING, steps=1)
    session = engine.session(seed=3)
    for _ in range(blocks):
        session.step()
    return engine, session


@pytest.mark.parametrize("form", ["runs", "ids"])
def test_a_checkpoint_keeps_dropped_ids_as_runs_and_resumes_bit_exactly(tmp_path, form):
    """A checkpoint saves the dropped ids as runs ``[start, stop)`` and resumes bit-exactly from
    them; one in the form earlier versions wrote (``"dropped"``: every id, ``[0, 1, ..., 9]``),
    written to disk here, resumes bit-exactly too, with the same runs in the policy."""
    from packforcing.core.checkpoint import load_checkpoint, save_checkpoint

    from .helpers import engine_for

    engine, session = sliding_session(12)
    state = engine.state_dict()
    assert state["meta"]["cache"]["dropped"] == [[0, 10]]
    if form == "ids":
        state["meta"]["cache"]["dropped"] = engine.policy.dropped  # what earlier versions saved
        assert state["meta"]["cache"]["dropped"] == list(range(10))
    save_checkpoint(tmp_path, state)
    saved = json.loads((tmp_path / "state.json").read_text())["meta"]["cache"]["dropped"]
    assert saved == ([[0, 10]] if form == "runs" else list(range(10)))
    rest = [session.step().latents for _ in range(4)]
    session.close()
    other = engine_for(SLIDING, steps=1)
    resumed = other.load_state_dict(load_checkpoint(tmp_path)[0])
    other.policy.audit()
    assert other.policy.dropped_runs == [(0, 10)] and other.policy.dropped == list(range(10))
    assert other.policy.location(9) == "drop" and other.policy.stats().dropped_blocks == 10
    again = [resumed.step().latents for _ in range(4)]
    assert [x.numpy().tobytes() for x in again] == [x.numpy().tobytes() for x in rest]
    assert other.policy.dropped_runs == engine.policy.dropped_runs == [(0, 14)]
    assert other.state_dict()["meta"]["cache"]["dropped"] == [[0, 14]]  # saved as runs from now on
    resumed.close()


MALFORMED_DROPPED = [
    ("not_a_list", 5, r"malformed dropped blocks: 5 is not a list of runs \[start, stop\)$"),
    ("null", None, r"malformed dropped blocks: None is not a list of runs"),
    ("empty_run", [[4, 4]], r"malformed dropped blocks: run 0 \[4, 4\) is empty or starts below 0$"),
    ("reversed_run", [[0, 2], [6, 3]], r"run 1 \[6, 3\) is empty or starts below 0$"),
    ("negative_run", [[-1, 2]], r"run 0 \[-1, 2\) is empty or starts below 0$"),
    ("overlapping", [[0, 5], [4, 8]], r"run 1 \[4, 8\) overlaps or comes before run 0 \[0, 5\) \(runs are sorted"),
    ("unsorted", [[6, 8], [0, 2]], r"run 1 \[0, 2\) overlaps or comes before run 0 \[6, 8\)"),
    ("three_numbers", [[0, 5, 7]], r"entry 0 \[0, 5, 7\] is not a run \[start, stop\) of two ints$"),
    ("a_string", [[0, "5"]], r"entry 0 \[0, '5'\] is not a run \[start, stop\) of two ints$"),
    ("a_float", [[0, 5.0]], r"entry 0 \[0, 5.0\] is not a run"),
    ("a_bool", [[True, 5]], r"entry 0 \[True, 5\] is not a run"),
    (
        "mixed",
        [0, [1, 3]],
        r"a list of block ids \(entry 0: 0\) and of runs \[start, stop\) \(entry 1: \[1, 3\]\) at once",
    ),
    ("repeated_id", [0, 1, 1], r"malformed dropped blocks: block id 1 is listed twice$"),
    ("negative_id", [-1, 0], r"malformed dropped blocks: block id -1 is negative$"),
    ("after_the_last", [[0, 100]], r"checkpoint: dropped blocks \[0, 100\) come after the last block 11$"),
    ("held", [[0, 11]], r"checkpoint: blocks \[10\] are both held and dropped$"),
    ("held_id", [*range(10), 11], r"checkpoint: blocks \[11\] are both held and dropped$"),
]


@pytest.mark.parametrize(
    ("value", "message"), [c[1:] for c in MALFORMED_DROPPED], ids=[c[0] for c in MALFORMED_DROPPED]
)
def test_malformed_dropped_ids_are_refused_in_one_line_with_the_cache_unchanged(value, message):
    """A checkpoint's ``"dropped"`` that is not sorted, disjoint, non-empty runs of ids ``>= 0``
    (nor a list of distinct ids, the earlier form), or that names a held block or one after the
    last, is refused with one line naming what is wrong, and the cache is as it was."""
    engine, session = sliding_session(12)
    policy = engine.policy
    tensors, meta = policy.state_dict()
    assert meta["dropped"] == [[0, 10]] and [b.block_id for b in policy.tier_blocks("window")] == [10, 11]
    with pytest.raises(ValueError, match=message) as caught:
        policy.load_state_dict(tensors, {**meta, "dropped": value})
    assert str(caught.value).startswith("checkpoint: ") and "\n" not in str(caught.value)
    policy.audit()
    assert policy.dropped_runs == [(0, 10)] and [b.block_id for b in policy.tier_blocks("window")] == [10, 11]
    session.close()


def test_a_checkpoint_s_metadata_does_not_grow_with_the_blocks_dropped(tmp_path):
    """A sliding window drops a block per block: a checkpoint's ``state.json`` listing their ids
    grew by a line per block (thousands in a long run). As runs it is the same size at block 16
    and at block 512 (but for a few more digits in the ids, frames and positions it names)."""
    from packforcing.core.checkpoint import save_checkpoint

    engine, session = sliding_session(0)
    sizes, dropped = {}, {}
    for done in range(1, 513):
        session.step()
        if done in (16, 64, 512):
            save_checkpoint(tmp_path / str(done), engine.state_dict())
            sizes[done] = (tmp_path / str(done) / "state.json").stat().st_size
            dropped[done] = json.loads((tmp_path / str(done) / "state.json").read_text())["meta"]["cache"]["dropped"]
    session.close()
    assert max(sizes.values()) - min(sizes.values()) <= 16, sizes  # listing the ids: over 4 kB more
    assert dropped == {done: [[0, done - 2]] for done in sizes}
