"""The PackForcing attention path makes no host-device synchronisation per layer.

On a GPU every host read of a tensor (``.tolist()``, ``bool()``, ``.item()``) and every ordinary
copy of host-made data to the device stalls the GPU until Python catches up; at Wan scale the
context runs 150 times per block. :class:`HostSyncCounter` counts those calls on the CPU, so
these tests pin down that a full PackForcing context attends every layer without one (one
asynchronous copy of the pass's layout on the first layer), that a block's passes are checked
in one read when the block settles (not one per pass), and that this device-side path gives
exactly what the host path (picks read on the host) gives.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from packforcing.attention.backends import SdpaBackend, SdpaParams
from packforcing.core.errors import PluginError
from packforcing.core.instrument import HostSyncCounter
from packforcing.core.interfaces import Selector
from packforcing.core.rope import Rope3D
from packforcing.positional.identity import IdentityRealigner
from packforcing.positional.temporal_shift import TemporalRopeShift, TemporalRopeShiftParams
from packforcing.selectors.topk import TopKSelector

from .helpers import (
    FULL_PACKFORCING_BLOCKS,
    assert_one_read_per_block,
    full_packforcing_engine,
    full_packforcing_session,
    layer_qkv,
    syncs_of_a_pass,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BLOCKS = FULL_PACKFORCING_BLOCKS


class HostPathShift(TemporalRopeShift):
    """``temporal_rope_shift`` without the capability flag: contexts read the picks on the host."""

    targets_from_frames = False


class HostPathIdentity(IdentityRealigner):
    rotates = True


@pytest.fixture(scope="module")
def engine():
    return full_packforcing_engine()


def test_a_full_packforcing_context_attends_without_host_syncs(engine):
    syncs = syncs_of_a_pass(engine.policy, engine.query(BLOCKS), layer_qkv(engine, 0))
    assert_one_read_per_block(syncs)
    assert syncs["context"].context_tokens > 0 and len(syncs["context"].selections) == engine.geometry.num_layers


def test_a_block_s_passes_are_checked_in_one_read(engine):
    """The sampler's passes of one block run without a host read between them; their checks
    are read together, once."""
    policy = engine.policy
    layers = layer_qkv(engine, 0)
    with HostSyncCounter() as passes:
        for _ in range(4):
            ctx = policy.context(engine.query(BLOCKS))
            for layer, qkv in enumerate(layers):
                ctx.attend(layer, *qkv)
    with HostSyncCounter() as settle:
        policy.settle()
    assert sum(passes.reads.values()) == 0, dict(passes.reads)
    assert dict(settle.reads) == {"__bool__": 1} and settle.total == 1


def test_host_reads_per_block_do_not_grow_with_sampler_steps():
    """A whole block through the session (the sampler's steps, the clean pass, the commit that
    compresses a block into the mid tier): one host read, the commit's, however many steps the
    sampler takes. K/V already checked (the commit's, the compressor's) or read from a store are
    not read again when stored."""
    reads = {}
    for steps in (1, 4):
        with full_packforcing_session(f"sampler.steps={steps}", batch_size=1) as (_, session):
            with HostSyncCounter() as counter:
                session.step()
        reads[steps] = dict(counter.reads)
    assert reads[4] == reads[1], reads
    # the block's held checks, its K/V's finiteness and the compressor's output's, together
    assert reads[4] == {"__bool__": 1}, reads


def test_the_old_path_is_what_the_counter_catches(engine):
    """The counter is not vacuous: the host path reads every layer's picks on the host."""
    policy = engine.policy
    saved = policy.realigner
    policy.realigner = HostPathShift(saved.params)
    try:
        ctx = policy.context(engine.query(BLOCKS))
        layers = layer_qkv(engine, 0)
        with HostSyncCounter() as counter:
            for layer, (q, k, v) in enumerate(layers):
                ctx.attend(layer, q, k, v)
    finally:
        policy.realigner = saved
    assert counter.reads["tolist"] >= len(layers) * 2  # one per layer and batch item


@pytest.mark.parametrize(
    ("device_side", "host_side"),
    [
        (TemporalRopeShift(), HostPathShift()),
        (
            TemporalRopeShift(TemporalRopeShiftParams(anchor="window")),
            HostPathShift(TemporalRopeShiftParams(anchor="window")),
        ),
        (IdentityRealigner(), HostPathIdentity()),
    ],
    ids=["absolute", "window", "identity"],
)
def test_device_side_picks_equal_host_side_picks(engine, device_side, host_side):
    """Same picks, same targets, same rotated keys: bit-identical attention outputs, per batch
    item (two items pick different blocks)."""
    policy = engine.policy
    saved = policy.realigner
    outputs = {}
    try:
        for name, realigner in (("device", device_side), ("host", host_side)):
            policy.realigner = realigner
            ctx = policy.context(engine.query(BLOCKS))
            outputs[name] = (
                [ctx.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(layer_qkv(engine, 1))],
                ctx.selections,
                ctx.position,
                ctx.context_tokens,
            )
    finally:
        policy.realigner = saved
    (dev, dev_sel, dev_pos, dev_tokens), (host, host_sel, host_pos, host_tokens) = outputs["device"], outputs["host"]
    assert (dev_pos, dev_tokens) == (host_pos, host_tokens)
    assert dev_sel.keys() == host_sel.keys()
    assert all(torch.equal(dev_sel[key], host_sel[key]) for key in dev_sel)
    assert any(not torch.equal(idx[0], idx[1]) for idx in dev_sel.values()), "items should pick differently"
    for a, b in zip(dev, host, strict=True):
        assert torch.equal(a, b)


class RecordsDeltas(TemporalRopeShift):
    """``temporal_rope_shift`` that records the shifts each layer's gather is given."""

    def __init__(self) -> None:
        super().__init__()
        self.given: list[torch.Tensor | None] = []

    def gather_shifted(self, keys, deltas, rope, tail):
        self.given.append(deltas)
        return super().gather_shifted(keys, deltas, rope, tail)


@pytest.mark.parametrize("split", [False, True], ids=["copy", "split"])
def test_picks_shared_across_layers_are_gathered_from_one_pass_layout(engine, split, monkeypatch):
    """With a selector shared across layers, the picks' slots and shifts are made on the pass's
    first layer and every later layer is given the very same shift tensor (no index, subtract or
    concatenation per layer), whose rotation table is then made once, and the outputs equal the
    host path's bit for bit."""
    tables: list[torch.Tensor] = []
    rotation = Rope3D.rotation
    monkeypatch.setattr(
        Rope3D, "rotation", staticmethod(lambda *a, **kw: tables.append(rotation(*a, **kw)) or tables[-1])
    )
    policy = engine.policy
    saved = policy.selector, policy.realigner, policy.backend
    policy.selector = TopKSelector(attrs.evolve(saved[0].params, shared_across_layers=True))
    policy.backend = SdpaBackend(SdpaParams(split_context=split))
    recorder = RecordsDeltas()
    outputs = {}
    made = []
    try:
        for name, realigner in (("device", recorder), ("host", HostPathShift())):
            policy.realigner = realigner
            ctx = policy.context(engine.query(BLOCKS))
            outputs[name] = []
            for layer, qkv in enumerate(layer_qkv(engine, 1)):
                outputs[name].append(ctx.attend(layer, *qkv))
                made.append(len(tables))
            policy.settle()
    finally:
        policy.selector, policy.realigner, policy.backend = saved
    layers = engine.geometry.num_layers
    assert len(recorder.given) == layers and recorder.given[0] is not None
    assert all(d is recorder.given[0] for d in recorder.given)
    assert made[0] > 0 and made[layers - 1] == made[0], "the device path made a rotation table after its first layer"
    for a, b in zip(outputs["device"], outputs["host"], strict=True):
        if split:  # merged by log-sum-exp: equal up to rounding
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides",
    [(), ("selector.shared_across_layers=true", "backend.split_context=true")],
    ids=["preset", "shared-split"],
)
def test_a_session_under_inference_mode_generates_what_it_does_under_no_grad(overrides):
    """Tensors made under ``torch.inference_mode`` have no version counter: the per-pass rotation
    table (kept by the shift tensor's version) is then made per layer, and the blocks are the same."""
    blocks = {}
    for name, mode in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        with mode(), full_packforcing_session(*overrides) as (_, session):
            blocks[name] = [session.step().latents for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(blocks["no_grad"], blocks["inference"], strict=True))


def test_picks_chosen_per_layer_get_their_own_shifts(engine):
    """The per-pass shifts are kept only when the selection is: with the preset's per-layer
    top-K every layer's gather is given its own picks' shifts."""
    policy = engine.policy
    saved = policy.realigner
    policy.realigner = recorder = RecordsDeltas()
    try:
        ctx = policy.context(engine.query(BLOCKS))
        for layer, qkv in enumerate(layer_qkv(engine, 1)):
            ctx.attend(layer, *qkv)
        policy.settle()
    finally:
        policy.realigner = saved
    assert len({id(d) for d in recorder.given}) == len(recorder.given) == engine.geometry.num_layers


class OutOfRange(Selector):
    """``topk`` whose picks at one layer point past the candidates (a plugin bug)."""

    name = "topk"

    def __init__(self, inner: Selector, bad_layer: int) -> None:
        self.inner, self.bad_layer = inner, bad_layer
        self.shared_across_layers = inner.shared_across_layers

    def budget(self, num_candidates):
        return self.inner.budget(num_candidates)

    def select(self, queries, candidates, layer):
        idx = self.inner.select(queries, candidates, layer)
        return idx + len(candidates) if layer == self.bad_layer else idx


def test_device_side_checks_raise_when_the_block_settles_naming_the_layer(engine):
    """Bad picks are clamped for the gather (no device fault), checked on the device, and
    settling the block raises the same PluginError as the host path, naming the bad layer."""
    policy = engine.policy
    saved = policy.selector
    policy.selector = OutOfRange(saved, bad_layer=1)
    try:
        ctx = policy.context(engine.query(BLOCKS))
        for layer, qkv in enumerate(layer_qkv(engine, 2)):
            ctx.attend(layer, *qkv)  # no error yet: nothing read on the host
        with pytest.raises(PluginError, match=r"layer 1: returned indices outside \[0, "):
            policy.settle()
        policy.settle()  # read once: nothing is held after an error
    finally:
        policy.selector = saved


def test_a_bad_pass_is_refused_at_commit_with_the_cache_unchanged():
    """Through a session, a pass's bad picks surface from ``step()`` (the commit settles before
    changing anything): the cache and the block count stay as they were, and the session goes
    on once the selector is fixed."""
    with full_packforcing_session() as (engine, session):
        policy = engine.policy
        saved = policy.selector
        before = (policy.stats(), session.blocks_done, [b.block_id for b in policy.full_resolution_blocks()])
        policy.selector = OutOfRange(saved, bad_layer=2)
        try:
            with pytest.raises(PluginError, match=r"selector.*layer 2: returned indices outside"):
                session.step()
            with pytest.raises(PluginError, match=r"selector.*layer 2: returned indices outside"):
                session.predict()  # passes without a commit are settled too
        finally:
            policy.selector = saved
        assert (policy.stats(), session.blocks_done, [b.block_id for b in policy.full_resolution_blocks()]) == before
        session.step()
        assert session.blocks_done == before[1] + 1


class NanAtLayer(TemporalRopeShift):
    """The device path's realigner, gathering NaN keys at one layer (and honest or not about
    ``keeps_finite``)."""

    def __init__(self, params, bad_layer: int, keeps_finite: bool) -> None:
        super().__init__(params)
        self.keeps_finite, self.bad_layer, self.calls = keeps_finite, bad_layer, 0

    def gather_shifted(self, keys, deltas, rope, tail):
        out = super().gather_shifted(keys, deltas, rope, tail)
        self.calls += 1
        return out.fill_(float("nan")) if self.calls - 1 == self.bad_layer else out


@pytest.mark.parametrize(("keeps_finite", "blamed"), [(False, "realigner"), (True, "backend")])
def test_gathered_keys_are_checked_unless_the_realigner_keeps_them_finite(engine, keeps_finite, blamed):
    """Without ``keeps_finite`` the gathered keys are checked too, and NaN keys name the realigner;
    a realigner that claims ``keeps_finite`` is trusted, and the NaN output names the backend."""
    policy = engine.policy
    saved = policy.realigner
    policy.realigner = NanAtLayer(saved.params, bad_layer=1, keeps_finite=keeps_finite)
    try:
        ctx = policy.context(engine.query(BLOCKS))
        for layer, qkv in enumerate(layer_qkv(engine, 3)):
            ctx.attend(layer, *qkv)
        with pytest.raises(PluginError, match=r"layer 1: ") as info:
            policy.settle()
        assert blamed in str(info.value)
    finally:
        policy.realigner = saved


class FailsInALaterPass(SdpaBackend):
    """SDPA that raises from the third forward pass on (a host-side failure after earlier passes
    left their checks on the device)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.calls, self.limit = 0, 2 * layers

    def attend(self, q, k, v, mask=None):
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError("device lost")
        return super().attend(q, k, v, mask)


def test_an_earlier_pass_s_bad_output_is_raised_before_a_later_failure():
    """A block that fails on the host after earlier passes went wrong on the device raises the
    first cause (the selector's picks at layer 1), chained to the later failure; nothing of the
    abandoned block stays held, so the next block goes through."""
    with full_packforcing_session() as (engine, session):
        policy = engine.policy
        saved = policy.selector, policy.backend
        done = session.blocks_done
        policy.selector = OutOfRange(saved[0], bad_layer=1)
        policy.backend = FailsInALaterPass(engine.geometry.num_layers)
        try:
            with pytest.raises(PluginError, match=r"selector.*layer 1: returned indices outside") as info:
                session.step()
        finally:
            policy.selector, policy.backend = saved
        assert isinstance(info.value.__context__, PluginError) and "device lost" in str(info.value.__context__)
        assert session.blocks_done == done
        session.step()
        assert session.blocks_done == done + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split", [False, True], ids=["copy", "split"])
def test_on_cuda_a_block_s_passes_never_synchronise(split):
    """On a GPU, what the counter counts on the CPU is checked for real: with CUDA's sync debug
    mode raising on any synchronising call, three forward passes over a full PackForcing context
    (every layer: selection, gather, rotation, attention, checks) run through; the block's one
    read is its settle, outside."""
    with full_packforcing_session("run.device=cuda", f"backend.split_context={str(split).lower()}") as (engine, _):
        policy = engine.policy
        layers = [tuple(t.cuda() for t in qkv) for qkv in layer_qkv(engine, 0)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                ctx = policy.context(engine.query(FULL_PACKFORCING_BLOCKS))
                outs = [ctx.attend(layer, *qkv) for layer, qkv in enumerate(layers)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        policy.settle()
    assert all(o.is_cuda and o.shape == layers[0][0].shape for o in outs)
