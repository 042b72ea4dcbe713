"""Training data for the ``dual_branch`` compressor: what the frozen model itself attends.

:func:`collect` generates a few videos with a full cache and records, for every block, its clean
latents, its per-layer clean K/V (what the cache stores) and, for every sampler pass and the
clean pass, its rotated queries and its own keys/values (:class:`AttentionData`);
:func:`sample_batch` draws ``(X, Y, pass)`` examples from them (:class:`Batch`). The objective is
in :mod:`packforcing.training.objective`, the loop in :mod:`packforcing.training.compressor`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from packforcing.core.interfaces import AttentionBackend, AttentionContext, BlockModel
from packforcing.core.sampler import Sampler, block_noise, fresh_noise


class _RecordingContext(AttentionContext):
    """Full history at absolute positions; records the block's rotated ``q, k, v`` per layer."""

    def __init__(
        self,
        backend: AttentionBackend,
        history: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        position: float,
    ) -> None:
        self._backend = backend
        self._history = history
        self._position = position
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def position(self) -> float:
        return self._position

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.records.append((q, k, v))
        if self._history:
            hk, hv = self._history[layer]
            k, v = torch.cat([hk, k], dim=1), torch.cat([hv, v], dim=1)
        return self._backend.attend(q, k, v)


@attrs.frozen
class AttentionData:
    """Recorded tensors; ``S`` sequences (video × batch item) of ``nb`` blocks, ``P`` passes.

    ``latents [S, nb, C, F, H, W]``; ``keys``/``values`` ``[S, nb, L, N, H, D]`` (clean, stored
    at absolute position ``block * F``); ``q``/``k``/``v`` ``[S, nb, P, L, N, H, D]``.
    """

    latents: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    frames_per_block: int
    scenes: torch.Tensor | None = None
    """``[S, nb]`` each block's condition (scene index) when the clips bring per-block conditions,
    for models whose keys depend on it (``condition_in_keys``); else ``None``."""

    @property
    def num_sequences(self) -> int:
        return self.latents.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.latents.shape[1]

    @property
    def num_passes(self) -> int:
        return self.q.shape[2]


@torch.no_grad()
def collect(
    model: BlockModel,
    backend: AttentionBackend,
    sampler: Sampler,
    *,
    videos: int,
    blocks: int,
    batch: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clips: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    condition: Any = None,
) -> AttentionData:
    """Generate ``videos × batch`` sequences of ``blocks`` blocks with a full cache, recording
    what the objective needs (see the module docstring).

    ``clips(video)``, if given, supplies each video's clean latents ``[batch, C, blocks*F, H, W]``
    and per-frame conditions (``[batch, blocks*F]`` or ``None``): the sampler passes still run
    (their queries are recorded), but the clean latents committed are the clip's — teacher
    forcing on real data instead of the model's own samples. ``condition`` (a model condition
    object, e.g. a Wan prompt) is used for every block when the clips bring none."""
    g = model.geometry
    f = g.frames_per_block
    shape = (batch, g.latent_channels, f, g.latent_height, g.latent_width)
    per_video = []
    per_video_scenes: list[torch.Tensor] = []
    for video in range(videos):
        history: list[tuple[torch.Tensor, torch.Tensor]] = []
        lat: list[torch.Tensor] = []
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        kqs: list[torch.Tensor] = []
        vqs: list[torch.Tensor] = []
        clip, clip_conditions = clips(video) if clips is not None else (None, None)
        if clip_conditions is not None:
            per_video_scenes.append(clip_conditions[:, ::f][:, :blocks])  # [B, nb]
        for index in range(blocks):
            position = float(index * f)
            passes: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
            frames = slice(index * f, (index + 1) * f)
            block_condition = clip_conditions[:, frames] if clip_conditions is not None else condition

            def velocity(
                x: torch.Tensor,
                t: torch.Tensor,
                position: float = position,
                passes=passes,
                history=history,
                condition=block_condition,
            ) -> torch.Tensor:
                ctx = _RecordingContext(backend, history, position)
                out = model.denoise(x, t, ctx, condition=condition)
                passes.append(ctx.records)
                return out

            video_seed = seed * 7919 + video
            latents = sampler.sample(
                block_noise(video_seed, index, shape, dtype, device),
                velocity,
                fresh_noise(video_seed, index, shape, dtype, device),
            )
            if clip is not None:
                latents = clip[:, :, frames].to(device=device, dtype=dtype)
            ctx = _RecordingContext(backend, history, position)
            keys, values = model.clean_kv(latents, ctx, condition=block_condition)
            passes.append(ctx.records)
            layers = len(keys)
            history = [
                (torch.cat([history[i][0], keys[i]], 1), torch.cat([history[i][1], values[i]], 1))
                if history
                else (keys[i], values[i])
                for i in range(layers)
            ]
            lat.append(latents)
            ks.append(torch.stack(keys, 1))  # [B, L, N, H, D]
            vs.append(torch.stack(values, 1))
            for store, j in ((qs, 0), (kqs, 1), (vqs, 2)):
                store.append(torch.stack([torch.stack([rec[j] for rec in p], 1) for p in passes], 1))
        per_video.append([torch.stack(x, 1) for x in (lat, ks, vs, qs, kqs, vqs)])  # [B, nb, ...]
    latents_all, keys_all, values_all, q_all, k_all, v_all = (
        torch.cat([v[i] for v in per_video], 0).float() for i in range(6)
    )
    scenes = torch.cat(per_video_scenes, 0) if len(per_video_scenes) == videos else None
    return AttentionData(latents_all, keys_all, values_all, q_all, k_all, v_all, frames_per_block=f, scenes=scenes)


@attrs.frozen
class Batch:
    """One minibatch of ``(X, Y, pass)`` examples, ``M`` rows."""

    latents: torch.Tensor  # [M, C, F, H, W]
    keys: torch.Tensor  # [M, L, N, H, D], X's clean keys at its home position
    values: torch.Tensor
    home: torch.Tensor  # [M] X's home position
    target: torch.Tensor  # [M] where X is placed for the example
    q: torch.Tensor  # [M, L, N, H, D]
    k: torch.Tensor
    v: torch.Tensor
    scene: torch.Tensor | None = None  # [M] X's condition, if the data has per-block conditions


def sample_batch(
    data: AttentionData, sequences: Sequence[int], size: int, gen: torch.Generator, max_gap_blocks: int
) -> Batch:
    """``size`` random examples from ``sequences``: a block X, a later block Y, one of Y's passes,
    and X placed ``gap`` blocks before Y (``gap`` uniform in ``[0, max_gap_blocks]``)."""
    nb, npass, f = data.num_blocks, data.num_passes, data.frames_per_block
    seq = torch.tensor(sequences)[torch.randint(len(sequences), (size,), generator=gen)]
    y = torch.randint(1, nb, (size,), generator=gen)
    x = (torch.rand(size, generator=gen) * y).long()
    p = torch.randint(npass, (size,), generator=gen)
    gap = torch.randint(max_gap_blocks + 1, (size,), generator=gen)
    home = (x * f).double()
    target = ((y - 1 - gap) * f).double()
    return Batch(
        latents=data.latents[seq, x],
        keys=data.keys[seq, x],
        values=data.values[seq, x],
        home=home,
        target=target,
        q=data.q[seq, y, p],
        k=data.k[seq, y, p],
        v=data.v[seq, y, p],
        scene=data.scenes[seq, x] if data.scenes is not None else None,
    )
