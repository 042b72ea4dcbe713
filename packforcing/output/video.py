"""Streaming decoded frames to an MP4 file (ffmpeg from the imageio-ffmpeg wheel)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def pixel_frames(latent_frames: int, temporal_stride: int = 1) -> int:
    """Pixel frames decoded from ``latent_frames`` by a causal video VAE: the first latent frame
    is one pixel frame, each later one ``temporal_stride`` (Wan: ``1 + 4(F - 1)``)."""
    return 0 if latent_frames <= 0 else 1 + temporal_stride * (latent_frames - 1)


def latent_frame_of(second: float, fps: float, temporal_stride: int = 1) -> int:
    """The latent frame holding pixel frame ``round(second * fps)``."""
    pixel = round(second * fps)
    return 0 if pixel <= 0 else (pixel - 1) // temporal_stride + 1


def blocks_for_seconds(seconds: float, fps: float, frames_per_block: int, temporal_stride: int = 1) -> int:
    """Whole blocks whose decoded video lasts at least ``seconds`` at ``fps`` (at least one)."""
    pixels = max(1, math.ceil(seconds * fps - 1e-9))
    latent = 1 + math.ceil((pixels - 1) / temporal_stride)
    return max(1, math.ceil(latent / frames_per_block))


def temporal_stride_of(model: object) -> int:
    """Pixel frames per latent frame after the first: the model's ``pixel_frames_per_latent``, else
    its codec's ``temporal_stride``, else 1 (a codec that decodes one frame per latent frame)."""
    stride = getattr(model, "pixel_frames_per_latent", None)
    if stride is None:
        stride = getattr(getattr(model, "codec", None), "temporal_stride", 1)
    return int(stride)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """Pixels ``[3, T, H, W]`` in ``[-1, 1]`` → ``[T, H, W, 3]`` uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


class VideoWriter:
    """Appends frames to ``path`` as they come, so a video of any length streams to disk."""

    def __init__(self, path: str | Path, fps: float) -> None:
        import imageio.v2 as imageio

        self.path = Path(path)
        self._writer = imageio.get_writer(
            str(self.path), fps=fps, codec="libx264", quality=8, macro_block_size=8, ffmpeg_log_level="error"
        )
        self.frames = 0

    def append(self, frames: np.ndarray) -> None:
        """Write ``frames [T, H, W, 3]`` uint8."""
        for frame in frames:
            self._writer.append_data(frame)
            self.frames += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
