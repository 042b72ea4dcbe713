"""The PackForcing attention path makes no host-device synchronisation per layer.

On a GPU every host read of a tensor (``.tolist()``, ``bool()``, ``.item()``) and every ordinary
copy of host-made data to the device stalls the GPU until Python catches up; at Wan scale the
context runs 150 times per block. :class:`HostSyncCounter` counts those calls on the CPU, so
these tests pin down that a full PackForcing context attends every layer without one (one
asynchronous copy of the pass's layout on the first layer, one read of the pass's checks on
the last), and that this device-side path
gives exactly what the host path (picks read on the host) gives.
"""

from __future__ import annotations

import pytest
import torch

from packforcing.core.errors import PluginError
from packforcing.core.instrument import HostSyncCounter
from packforcing.core.interfaces import Selector
from packforcing.positional.identity import IdentityRealigner
from packforcing.positional.temporal_shift import TemporalRopeShift, TemporalRopeShiftParams

from .helpers import FULL_PACKFORCING_BLOCKS, full_packforcing_engine, layer_qkv

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
    ctx = engine.policy.context(engine.query(BLOCKS))
    layers = layer_qkv(engine, 0)
    with HostSyncCounter() as first:
        ctx.attend(0, *layers[0])
    # the pass's layout: one host-made tensor moved to the device (asynchronously on CUDA)
    assert sum(first.reads.values()) == 0, dict(first.reads)
    assert first.total <= 2, (dict(first.reads), dict(first.writes))
    with HostSyncCounter() as rest:
        for layer in range(1, len(layers) - 1):
            ctx.attend(layer, *layers[layer])
    assert rest.total == 0, (dict(rest.reads), dict(rest.writes))
    with HostSyncCounter() as last:  # the pass's device-side checks, read once
        ctx.attend(len(layers) - 1, *layers[-1])
    assert dict(last.reads) == {"__bool__": 1} and last.total == 1, (dict(last.reads), dict(last.writes))
    assert ctx.context_tokens > 0 and len(ctx.selections) == len(layers)


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


def test_device_side_checks_raise_at_the_end_of_the_pass_naming_the_layer(engine):
    """Bad picks are clamped for the gather (no device fault), checked on the device, and the
    pass's last layer raises the same PluginError as the host path, naming the bad layer."""
    policy = engine.policy
    saved = policy.selector
    policy.selector = OutOfRange(saved, bad_layer=1)
    try:
        ctx = policy.context(engine.query(BLOCKS))
        layers = layer_qkv(engine, 2)
        for layer in range(len(layers) - 1):
            ctx.attend(layer, *layers[layer])  # no error yet: nothing read on the host
        with pytest.raises(PluginError, match=r"layer 1: returned indices outside \[0, "):
            ctx.attend(len(layers) - 1, *layers[-1])
    finally:
        policy.selector = saved


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
        layers = layer_qkv(engine, 3)
        for layer in range(len(layers) - 1):
            ctx.attend(layer, *layers[layer])
        with pytest.raises(PluginError, match=r"layer 1: ") as info:
            ctx.attend(len(layers) - 1, *layers[-1])
        assert blamed in str(info.value)
    finally:
        policy.realigner = saved
