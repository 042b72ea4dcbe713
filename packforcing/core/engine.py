"""The generation engine: block-by-block sampling over a pluggable cache policy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from packforcing.core.interfaces import BlockModel, CachePolicy
from packforcing.core.records import BlockCommit, BlockQuery, CacheStats
from packforcing.core.sampler import FlowMatchSampler, block_noise


@attrs.frozen(eq=False)
class GeneratedBlock:
    """One finished block: ``latents [B, C, F, H, W]`` plus what generating it cost."""

    index: int
    start_frame: int
    latents: torch.Tensor
    seconds: float
    context_tokens: int
    stats: CacheStats


class GenerationEngine:
    """Generates a video block by block.

    Per block: a few-step flow-matching sampler whose every step attends to the policy's
    context; then one clean pass at timestep 0 whose per-layer K/V is committed to the
    policy. The engine never inspects the policy: it only asks for contexts and commits.
    """

    def __init__(
        self,
        model: BlockModel,
        policy: CachePolicy,
        sampler: FlowMatchSampler | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: Any = None,
    ) -> None:
        self.model = model
        self.config = config
        """The :class:`~packforcing.core.config.Config` it was built from, if any."""
        self.policy = policy
        self.sampler = sampler or FlowMatchSampler()
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def geometry(self):
        return self.model.geometry

    def block_shape(self, batch_size: int) -> tuple[int, int, int, int, int]:
        g = self.geometry
        return (batch_size, g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width)

    @torch.no_grad()
    def generate(self, num_blocks: int, *, seed: int = 0, batch_size: int = 1) -> Iterator[GeneratedBlock]:
        """Yield ``num_blocks`` finished blocks, one at a time (the cache starts empty)."""
        if num_blocks < 0 or batch_size < 1:
            raise ValueError("num_blocks must be >= 0 and batch_size >= 1")
        g = self.geometry
        self.policy.reset()
        for index in range(num_blocks):
            started = time.perf_counter()
            query = BlockQuery(
                block_id=index,
                start_frame=index * g.frames_per_block,
                num_frames=g.frames_per_block,
                grid=g.block_grid,
            )
            noise = block_noise(seed, index, self.block_shape(batch_size), self.dtype, self.device)

            def velocity(x: torch.Tensor, t: torch.Tensor, query: BlockQuery = query) -> torch.Tensor:
                return self.model.denoise(x, t, self.policy.context(query))

            latents = self.sampler.sample(noise, velocity)
            clean_context = self.policy.context(query)
            keys, values = self.model.clean_kv(latents, clean_context)
            self.policy.commit(
                BlockCommit(
                    block_id=index,
                    start_frame=query.start_frame,
                    num_frames=query.num_frames,
                    grid=query.grid,
                    position=clean_context.position,
                    keys=keys,
                    values=values,
                    latents=latents,
                )
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            yield GeneratedBlock(
                index=index,
                start_frame=query.start_frame,
                latents=latents,
                seconds=time.perf_counter() - started,
                context_tokens=clean_context.context_tokens,
                stats=self.policy.stats(),
            )
