"""A small, exactly invertible latent codec for the built-in model.

Each latent pixel ``[C]`` maps to a ``stride × stride`` RGB patch through a fixed matrix with
orthonormal rows (``C <= 3 * stride²``), so ``encode(decode(z)) == z`` up to float rounding.
Two bases:

- ``random`` (the default): a seeded random orthonormal basis; ``decode`` is a faithful, if
  untrained, picture of the latents (noise-like patches).
- ``dct``: the lowest spatial frequencies of the 8×8 DCT-II, luminance first, then the two
  opponent chroma channels, so ``decode(encode(pixels))`` is a recognisable low-pass
  picture of ``pixels`` (for C = 16: luminance up to diagonal 3, chroma up to diagonal 1).

Time is not strided: one latent frame decodes to one pixel frame.
"""

from __future__ import annotations

import math

import torch

BASES = ("random", "dct")


def _dct_basis(latent_channels: int, stride: int) -> torch.Tensor:
    """``[3*s*s, C]`` orthonormal columns: colour vector ⊗ 2-D DCT vector, low frequencies first.

    Column order: ascending ``fy + fx + 2·[chroma]``, then colour (luma, chroma 1, chroma 2),
    then ``fy``. Rows are indexed ``(colour, y, x)`` to match the patch layout.
    """
    s = stride
    n = torch.arange(s, dtype=torch.float64)
    dct = torch.stack(
        [torch.cos(math.pi * (n + 0.5) * k / s) * (math.sqrt(1 / s) if k == 0 else math.sqrt(2 / s)) for k in range(s)]
    )  # [k, n], orthonormal rows
    colours = torch.tensor(
        [[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64
    )  # luma, two opponent chroma channels
    colours = colours / colours.norm(dim=1, keepdim=True)
    order = sorted(
        ((fy + fx + (2 if c else 0), c, fy, fx) for c in range(3) for fy in range(s) for fx in range(s)),
    )[:latent_channels]
    cols = [torch.einsum("c,y,x->cyx", colours[c], dct[fy], dct[fx]).reshape(-1) for _, c, fy, fx in order]
    return torch.stack(cols, dim=1)


class LinearPatchCodec:
    """Latents ``[B, C, T, H, W]`` ↔ pixels ``[B, 3, T, H*s, W*s]`` in roughly ``[-1, 1]``."""

    def __init__(
        self,
        latent_channels: int = 16,
        stride: int = 8,
        seed: int = 0,
        gain: float = 2.0,
        basis: str = "random",
    ) -> None:
        patch = 3 * stride * stride
        if latent_channels > patch:
            raise ValueError(f"codec needs latent_channels <= 3*stride^2 ({patch}), got {latent_channels}")
        if basis == "random":
            gen = torch.Generator().manual_seed(seed)
            columns, _ = torch.linalg.qr(torch.randn(patch, latent_channels, generator=gen, dtype=torch.float64))
        elif basis == "dct":
            columns = _dct_basis(latent_channels, stride)
        else:
            raise ValueError(f"codec basis must be one of {list(BASES)}, got {basis!r}")
        self.stride = stride
        self.latent_channels = latent_channels
        self.gain = gain
        self.basis = basis
        self._decode = (columns.T * gain).to(torch.float32)  # [C, 3*s*s]

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
