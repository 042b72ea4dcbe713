"""The cache-free oracle: the same model over the whole sequence with a block mask.

Generation with any cache policy that keeps absolute positions must reproduce this reference:
for every block ``b`` and every sampler step, the model runs once over
``[clean_0, …, clean_{b-1}, noisy_b]`` (timestep 0 for the clean blocks), and token masks
let block ``i`` see exactly the blocks ``visible(i)`` plus itself. Clean blocks recompute the
K/V the cache would have stored, so no cache is involved at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from packforcing.core.context import MaskedContext
from packforcing.core.interfaces import AttentionBackend, BlockModel
from packforcing.core.sampler import EulerSampler, Sampler, block_noise, fresh_noise


def block_causal_mask(num_blocks: int, tokens_per_block: int, visible: Callable[[int], Iterable[int]]) -> torch.Tensor:
    """Boolean ``[N, N]`` mask (``N = num_blocks * tokens_per_block``): a token of block ``i``
    may attend the tokens of block ``i`` and of every block in ``visible(i)``."""
    allowed = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    for i in range(num_blocks):
        allowed[i, i] = True
        for j in visible(i):
            if not 0 <= j < i:
                raise ValueError(f"block {i} cannot see block {j}: only earlier blocks are visible")
            allowed[i, j] = True
    return allowed.repeat_interleave(tokens_per_block, 0).repeat_interleave(tokens_per_block, 1)


@torch.no_grad()
def reference_generate(
    model: BlockModel,
    backend: AttentionBackend,
    num_blocks: int,
    visible: Callable[[int], Iterable[int]],
    *,
    sampler: Sampler | None = None,
    seed: int = 0,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    condition: Any = None,
) -> list[torch.Tensor]:
    """Latents ``[B, C, F, H, W]`` of each block, generated without a cache.

    ``visible(i)`` lists the earlier blocks block ``i`` attends (``range(i)`` for a full cache).
    ``condition`` (an encoded condition object) applies to every block. Noise (initial and
    re-noising) is the engine's per-block seeded noise.
    """
    sampler = sampler or EulerSampler()
    g = model.geometry
    f = g.frames_per_block
    shape = (batch_size, g.latent_channels, f, g.latent_height, g.latent_width)
    clean: list[torch.Tensor] = []
    for b in range(num_blocks):
        mask = block_causal_mask(b + 1, g.tokens_per_block, visible).to(device)
        context = MaskedContext(backend, mask, position=0.0)

        def velocity(x: torch.Tensor, t: torch.Tensor, context: MaskedContext = context) -> torch.Tensor:
            seq = torch.cat([*clean, x], dim=2)
            steps = torch.zeros(batch_size, seq.shape[2], device=x.device, dtype=torch.float32)
            steps[:, -f:] = t[:, None]
            return model.denoise(seq, steps, context, condition=condition)[:, :, -f:]

        noise = block_noise(seed, b, shape, dtype, device)
        clean.append(sampler.sample(noise, velocity, fresh_noise(seed, b, shape, dtype, device)))
    return clean
