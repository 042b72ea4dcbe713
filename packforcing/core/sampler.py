"""Few-step flow-matching sampler (Euler), as in Self-Forcing / CausVid distilled models."""

from __future__ import annotations

import itertools

import attrs
import torch

from packforcing.core.validators import positive


@attrs.frozen
class FlowMatchSampler:
    """``x_σ = (1 - σ) x₀ + σ ε``; the model predicts ``v = ε - x₀``; Euler steps in σ.

    ``steps`` noise levels from σ = 1 down, warped by ``shift`` (Wan's timestep shift);
    model timesteps are ``1000 σ``.
    """

    steps: int = attrs.field(default=4, validator=positive)
    shift: float = 5.0

    def sigmas(self) -> list[float]:
        """Noise levels ``[σ₀ = 1, …, σ_{steps-1}, 0]`` (length ``steps + 1``)."""
        out = []
        for i in range(self.steps):
            s = 1.0 - i / self.steps
            out.append(self.shift * s / (1.0 + (self.shift - 1.0) * s))
        return [*out, 0.0]

    def sample(self, noise: torch.Tensor, velocity) -> torch.Tensor:
        """Integrate from ``noise [B, C, F, H, W]`` to a clean block.

        ``velocity(x, timesteps [B])`` is the model call for the current noisy block.
        """
        sig = self.sigmas()
        x = noise
        for s, s_next in itertools.pairwise(sig):
            t = torch.full((x.shape[0],), 1000.0 * s, device=x.device, dtype=torch.float32)
            v = velocity(x, t)
            x = x + (s_next - s) * v.to(x.dtype)
        return x


def block_noise(
    seed: int, block_id: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The initial noise of block ``block_id``: drawn on the CPU from a per-block generator,
    so it is the same on every device and independent of how many blocks came before."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + block_id) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
