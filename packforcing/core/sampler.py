"""Few-step flow-matching samplers and the per-block seeded noise they draw.

Convention (Wan, Self-Forcing, CausVid): ``x_σ = (1 - σ) x₀ + σ ε`` and the model predicts the
flow ``v = ε - x₀`` at timestep ``1000 σ``. A sampler turns a block's initial noise into a clean
block by calling ``velocity(x, timesteps [B])``; every call attends the same cache context.
Samplers are plugins (kind ``sampler``); the built-ins are :class:`EulerSampler` (``euler``) and
:class:`SelfForcingSampler` (``self_forcing``).
"""

from __future__ import annotations

import abc
import hashlib
import itertools
from collections.abc import Callable, Iterable

import attrs
import torch

from packforcing.core.errors import ParamError
from packforcing.core.transfer import to_device
from packforcing.core.validators import positive, wrap_seed

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity(x [B, C, F, H, W], timesteps [B]) -> v [B, C, F, H, W]``: one model call."""

FreshNoise = Callable[[int], torch.Tensor]
"""``fresh(step) -> ε [B, C, F, H, W]``: new seeded noise for re-noising after sampler step ``step``."""


def shifted_sigma(sigma: float, shift: float) -> float:
    """Wan's timestep shift ``σ' = s σ / (1 + (s - 1) σ)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class Sampler(abc.ABC):
    """Integrates one block from noise to clean latents (component kind ``sampler``)."""

    name: str = "abstract"

    @abc.abstractmethod
    def sample(self, noise: torch.Tensor, velocity: Velocity, fresh: FreshNoise | None = None) -> torch.Tensor:
        """Clean block ``[B, C, F, H, W]`` from ``noise [B, C, F, H, W]``.

        ``velocity`` is the model call; ``fresh(step)`` gives new per-block seeded noise for
        samplers that re-noise (same shape, dtype and device as ``noise``).
        """


@attrs.frozen
class EulerSampler(Sampler):
    """Euler steps in σ: ``steps`` noise levels from σ = 1 down, warped by ``shift`` (Wan's
    timestep shift), then σ = 0. Deterministic given the initial noise."""

    name = "euler"

    steps: int = attrs.field(default=4, validator=positive)
    shift: float = 5.0

    def sigmas(self) -> list[float]:
        """Noise levels ``[σ₀ = 1, …, σ_{steps-1}, 0]`` (length ``steps + 1``)."""
        return [*(shifted_sigma(1.0 - i / self.steps, self.shift) for i in range(self.steps)), 0.0]

    def sample(self, noise: torch.Tensor, velocity: Velocity, fresh: FreshNoise | None = None) -> torch.Tensor:
        x = noise
        for s, s_next in itertools.pairwise(self.sigmas()):
            t = torch.full((x.shape[0],), 1000.0 * s, device=x.device, dtype=torch.float32)
            v = velocity(x, t)
            x = x + (s_next - s) * v.to(x.dtype)
        return x


FlowMatchSampler = EulerSampler
"""The former name of :class:`EulerSampler`."""


def _timesteps(value: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _descending_in_range(instance: object, attribute: attrs.Attribute, value: tuple[float, ...]) -> None:
    if not value:
        raise ParamError(attribute.name, "expected at least one timestep")
    if any(not 0 < t <= 1000 for t in value) or any(a <= b for a, b in itertools.pairwise(value)):
        raise ParamError(attribute.name, f"expected strictly decreasing timesteps in (0, 1000], got {list(value)}")


@attrs.frozen
class SelfForcingSampler(Sampler):
    """Self-Forcing's few-step sampler (``CausalInferencePipeline``).

    Timesteps ``timesteps`` (on the 0–1000 scale), warped by ``shift`` when ``warp`` is true
    (``t' = 1000 σ'(t / 1000)``: ``[1000, 750, 500, 250]`` → ``[1000, 937.5, 833.3, 625]``). At each
    step the model's flow prediction gives ``x₀ = x_t - σ_t v``; before the next step ``x₀`` is
    re-noised with fresh seeded noise, ``x = (1 - σ_next) x₀ + σ_next ε``. The result is the last
    step's ``x₀`` (the engine then runs the clean pass at timestep 0).
    """

    name = "self_forcing"

    timesteps: tuple[float, ...] = attrs.field(
        default=(1000.0, 750.0, 500.0, 250.0), converter=_timesteps, validator=_descending_in_range
    )
    shift: float = 5.0
    warp: bool = True

    def sigmas(self) -> list[float]:
        """Noise level of each step (length ``len(timesteps)``)."""
        return [shifted_sigma(t / 1000.0, self.shift) if self.warp else t / 1000.0 for t in self.timesteps]

    def sample(self, noise: torch.Tensor, velocity: Velocity, fresh: FreshNoise | None = None) -> torch.Tensor:
        sigmas = self.sigmas()
        if fresh is None and len(sigmas) > 1:
            raise ValueError("sampler self_forcing re-noises between steps: it needs fresh(step) noise")
        x = noise
        x0 = noise
        for step, sigma in enumerate(sigmas):
            t = torch.full((x.shape[0],), 1000.0 * sigma, device=x.device, dtype=torch.float32)
            v = velocity(x, t)
            x0 = x - sigma * v.to(x.dtype)
            if step + 1 < len(sigmas):
                assert fresh is not None
                s_next = sigmas[step + 1]
                x = (1.0 - s_next) * x0 + s_next * fresh(step).to(x0.dtype)
        return x0


def block_noise(
    seed: int, block_id: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The initial noise of block ``block_id``: drawn on the CPU from a per-block generator,
    so it is the same on every device and independent of how many blocks came before."""
    gen = torch.Generator().manual_seed(wrap_seed(seed * 1_000_003 + block_id))
    return to_device(torch.randn(shape, generator=gen, dtype=torch.float32), device, dtype)


def step_noise(
    seed: int, block_id: int, step: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Fresh noise for re-noising after sampler step ``step`` of block ``block_id``: drawn on the
    CPU from a generator keyed by ``(seed, block_id, step)`` (a hash, so it never coincides with
    another block's or step's stream), then moved to ``device``."""
    digest = hashlib.blake2b(f"packforcing:{seed}:{block_id}:{step}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return to_device(torch.randn(shape, generator=gen, dtype=torch.float32), device, dtype)


def fresh_noise(
    seed: int, block_id: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> FreshNoise:
    """``fresh(step)`` for block ``block_id`` (see :func:`step_noise`)."""
    return lambda step: step_noise(seed, block_id, step, shape, dtype, device)
