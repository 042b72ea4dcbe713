"""Samplers are plugins: ``euler`` (the default) and Self-Forcing's re-noising sampler."""

from __future__ import annotations

import itertools

import pytest
import torch

import packforcing as pf
from packforcing.attention.backends import SdpaBackend
from packforcing.core.sampler import EulerSampler, SelfForcingSampler, block_noise, fresh_noise, step_noise
from packforcing.testing.reference import reference_generate

from .helpers import engine_for, generate


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_a_sampler_block_without_a_name_is_euler():
    config = pf.load_config({"policy": "full", "sampler": {"steps": 3, "shift": 2.0}})
    assert config.components["sampler"].name == "euler"
    assert config.sampler == EulerSampler(steps=3, shift=2.0)
    assert config.resolved()["sampler"] == {"name": "euler", "steps": 3, "shift": 2.0}
    named = pf.build_engine({**config.data, "sampler": {"name": "euler", "steps": 3, "shift": 2.0}})
    assert named.sampler == pf.build_engine(config).sampler
    assert pf.build_engine({"policy": "full"}).sampler == EulerSampler()


def test_euler_is_the_flow_matching_euler_integration():
    sampler = EulerSampler(steps=3, shift=5.0)
    sig = sampler.sigmas()
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 4
    assert sig[1] == pytest.approx(5 * (2 / 3) / (1 + 4 * (2 / 3)))
    noise = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    seen = []

    def velocity(x, t):  # the exact flow of the straight path noise -> target
        seen.append(float(t[0]))
        return noise - target

    out = sampler.sample(noise, velocity)
    assert torch.allclose(out, target, atol=1e-6)
    assert seen == pytest.approx([1000 * s for s in sig[:-1]])


def test_self_forcing_timesteps_are_warped_by_the_shift():
    assert SelfForcingSampler().sigmas() == pytest.approx([1.0, 0.9375, 2.5 / 3.0, 0.625])
    assert SelfForcingSampler(warp=False).sigmas() == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_self_forcing_predicts_x0_and_renoises_with_fresh_noise():
    sampler = SelfForcingSampler()
    shape = (2, 3, 2, 2, 2)
    noise = block_noise(0, 0, shape, torch.float32, "cpu")
    fresh = fresh_noise(0, 0, shape, torch.float32, "cpu")
    x0s = [torch.randn(shape, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    inputs, times = [], []

    def velocity(x, t):  # a model whose i-th call predicts x0s[i]: v = (x - x0) / sigma
        i = len(inputs)
        inputs.append(x.clone())
        times.append(float(t[0]))
        return (x - x0s[i]) / (t[0] / 1000.0)

    out = sampler.sample(noise, velocity, fresh)
    sig = sampler.sigmas()
    assert times == pytest.approx([1000 * s for s in sig])
    assert torch.equal(inputs[0], noise)
    for i in range(1, 4):
        expected = (1 - sig[i]) * x0s[i - 1] + sig[i] * fresh(i - 1)
        assert torch.allclose(inputs[i], expected, atol=1e-6)
    assert torch.allclose(out, x0s[3], atol=1e-5)
    with pytest.raises(ValueError, match="needs fresh"):
        sampler.sample(noise, velocity)


def test_step_noise_is_seeded_per_block_and_step_and_distinct():
    shape = (1, 2, 3, 4)
    draws = {
        (seed, block, step): step_noise(seed, block, step, shape, torch.float32, "cpu")
        for seed, block, step in itertools.product(range(2), range(3), range(3))
    }
    for key, value in draws.items():
        assert torch.equal(value, step_noise(*key, shape, torch.float32, "cpu"))
    for a, b in itertools.combinations(draws.values(), 2):
        assert not torch.equal(a, b)
    initial = [block_noise(s, b, shape, torch.float32, "cpu") for s in range(2) for b in range(3)]
    assert all(not torch.equal(a, b) for a in initial for b in draws.values())
    assert step_noise(0, 0, 0, shape, torch.float64, "cpu").dtype == torch.float64


def test_self_forcing_engine_is_seeded_and_matches_the_uncached_reference():
    engine = engine_for({"name": "full"}, sampler={"name": "self_forcing"})
    assert isinstance(engine.sampler, SelfForcingSampler)
    first = generate(engine, 3, seed=6)
    again = generate(engine, 3, seed=6)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(first, again, strict=True))
    reference = reference_generate(engine.model, SdpaBackend(), 3, range, sampler=engine.sampler, seed=6)
    for block, ref in zip(first, reference, strict=True):
        assert rel_err(block.latents, ref) <= 1e-5
    euler = generate(engine_for({"name": "full"}, sampler={"name": "euler", "steps": 4, "shift": 5.0}), 3, seed=6)
    assert rel_err(first[0].latents, euler[0].latents) > 1e-3  # re-noising is not Euler stepping


def test_sampler_name_override_replaces_the_euler_parameters():
    config = pf.load_config({"policy": "full", "sampler": {"steps": 2}}, ["sampler.name=self_forcing"])
    assert config.sampler == SelfForcingSampler()


def test_bad_sampler_parameters_are_one_line_config_errors():
    with pytest.raises(pf.ConfigError, match=r"^sampler\.timesteps: expected strictly decreasing timesteps"):
        pf.load_config({"policy": "full", "sampler": {"name": "self_forcing", "timesteps": [250, 500]}})
    with pytest.raises(pf.ConfigError, match=r"^sampler\.name: unknown sampler 'heun'; available: euler, self_forcing"):
        pf.load_config({"policy": "full", "sampler": {"name": "heun"}})
