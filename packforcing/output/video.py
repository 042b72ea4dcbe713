"""Streaming decoded frames to an MP4 file (ffmpeg from the imageio-ffmpeg wheel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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
