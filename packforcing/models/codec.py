"""A small, exactly invertible latent codec for the built-in model.

Each latent pixel ``[C]`` maps to a ``stride × stride`` RGB patch through a fixed, seeded
matrix with orthonormal rows (``C <= 3 * stride²``), so ``encode(decode(z)) == z`` up to
float rounding and ``decode`` is a faithful, if untrained, picture of the latents. Time is
not strided: one latent frame decodes to one pixel frame.
"""

from __future__ import annotations

import torch


class LinearPatchCodec:
    """Latents ``[B, C, T, H, W]`` ↔ pixels ``[B, 3, T, H*s, W*s]`` in roughly ``[-1, 1]``."""

    def __init__(self, latent_channels: int = 16, stride: int = 8, seed: int = 0, gain: float = 2.0) -> None:
        patch = 3 * stride * stride
        if latent_channels > patch:
            raise ValueError(f"codec needs latent_channels <= 3*stride^2 ({patch}), got {latent_channels}")
        gen = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(patch, latent_channels, generator=gen, dtype=torch.float64))
        self.stride = stride
        self.latent_channels = latent_channels
        self.gain = gain
        self._decode = (basis.T * gain).to(torch.float32)  # [C, 3*s*s]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _c, t, h, w = latents.shape
        s = self.stride
        m = self._decode.to(device=latents.device, dtype=latents.dtype)
        patches = torch.einsum("bcthw,cp->bthwp", latents, m)  # p = (3, s, s)
        patches = patches.reshape(b, t, h, w, 3, s, s)
        return patches.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 3, t, h * s, w * s)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, ch, t, hs, ws = pixels.shape
        s = self.stride
        if ch != 3 or hs % s or ws % s:
            raise ValueError(f"pixels must be [B, 3, T, H*{s}, W*{s}], got {tuple(pixels.shape)}")
        h, w = hs // s, ws // s
        patches = pixels.reshape(b, 3, t, h, s, w, s).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t, h, w, 3 * s * s)
        m = self._decode.to(device=pixels.device, dtype=pixels.dtype)
        # rows of m are orthogonal with norm `gain`: the pseudo-inverse is m.T / gain²
        z = torch.einsum("bthwp,cp->bcthw", patches, m) / (self.gain**2)
        return z
