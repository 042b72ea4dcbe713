"""The timing wrappers of :mod:`packforcing.core.instrument` change nothing but the clock."""

from __future__ import annotations

import pytest
import torch

import packforcing as pf
from packforcing.core.instrument import SectionTimer, timing_wrapper
from packforcing.core.interfaces import AttentionBackend, Compressor, PositionalRealigner, Selector


def _flipped(interface: type) -> object:
    """An instance of ``interface`` with every capability flag set against its default (and its
    abstract methods stubbed: only the flags are looked at)."""
    body = {flag: not getattr(interface, flag) for flag in interface.CAPABILITIES}
    body.update({name: lambda *a, **k: None for name in interface.__abstractmethods__})
    return type(f"Flipped{interface.__name__}", (interface,), body)()


@pytest.mark.parametrize(
    ("kind", "interface"),
    [
        ("backend", AttentionBackend),
        ("selector", Selector),
        ("realigner", PositionalRealigner),
        ("compressor", Compressor),
    ],
)
def test_a_timed_component_keeps_every_capability_flag(kind, interface):
    """A capability flag decides a context's path (device-side picks, split attention ...): a
    wrapper that dropped one would time a different path than the one it wraps."""
    inner = _flipped(interface)
    wrapped = timing_wrapper(SectionTimer(sync=False))(kind, inner)
    assert wrapped is not inner and interface.CAPABILITIES
    for flag in interface.CAPABILITIES:
        assert getattr(wrapped, flag) == getattr(inner, flag) != getattr(interface, flag), flag


def test_a_timed_split_engine_attends_in_parts_and_times_them():
    config = pf.load_config(
        "configs/packforcing.yaml", overrides=["run.device=cpu", "backend.name=sdpa", "backend.split_context=true"]
    )
    timer = SectionTimer(sync=False)
    engine = pf.build_engine(config, wrap=timing_wrapper(timer))
    calls = []
    inner = engine.policy.backend.inner
    original = inner.attend_lse
    inner.attend_lse = lambda q, k, v: calls.append(k.shape[1]) or original(q, k, v)
    with torch.no_grad():
        list(engine.generate(13, seed=0))
    assert calls and timer.calls["backend"] >= len(calls) and timer.calls["realign"] > 0
