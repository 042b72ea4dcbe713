"""Streaming decoded frames to an MP4 file (ffmpeg from the imageio-ffmpeg wheel)."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from packforcing.core.geometry import latent_frames_for


def pixel_frames(latent_frames: int, temporal_stride: int = 1) -> int:
    """Pixel frames decoded from ``latent_frames`` by a causal video VAE: the first latent frame
    is one pixel frame, each later one ``temporal_stride`` (Wan: ``1 + 4(F - 1)``)."""
    return 0 if latent_frames <= 0 else 1 + temporal_stride * (latent_frames - 1)


def latent_frame_of(second: float, fps: float, temporal_stride: int = 1) -> int:
    """The latent frame holding pixel frame ``round(second * fps)``."""
    pixel = round(second * fps)
    return 0 if pixel <= 0 else (pixel - 1) // temporal_stride + 1


def blocks_for_seconds(seconds: float, fps: float, frames_per_block: int, temporal_stride: int = 1) -> int:
    """Whole blocks whose decoded video lasts at least ``seconds`` at ``fps`` (at least one);
    the latent frames are :func:`~packforcing.core.geometry.latent_frames_for`'s."""
    return -(-latent_frames_for(seconds, fps, temporal_stride) // frames_per_block)


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


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[str, int, int]]:
    """``(type, offset, size)`` of the ISO-BMFF boxes in ``data[start:end]``."""
    end = len(data) if end is None else end
    out = []
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        if size == 1:
            size = struct.unpack(">Q", data[i + 8 : i + 16])[0]
        elif size == 0:
            size = end - i
        if size < 8 or i + size > end:
            raise OSError("ffmpeg produced a malformed MP4 box")
        out.append((kind.decode("latin-1"), i, size))
        i += size
    return out


def _child(data: bytes, box: tuple[str, int, int], path: Sequence[str]) -> tuple[str, int, int] | None:
    """The box at ``path`` (types) below container ``box``."""
    for name in path:
        header = 8
        found = next((b for b in _boxes(data, box[1] + header, box[1] + box[2]) if b[0] == name), None)
        if found is None:
            return None
        box = found
    return box


class FragmentedMP4Writer:
    """An MP4 that is playable after every block, even if every process is killed.

    Each :meth:`append` encodes one block's frames with ffmpeg (the imageio-ffmpeg binary) into
    a fragmented MP4, keeps the header (``ftyp``/``moov``) of the first block only, renumbers the
    fragments (``mfhd`` sequence, ``tfdt`` decode time) to follow the ones already written, appends
    them and fsyncs. The file is always a complete fragmented MP4 of the blocks appended so far
    (an append that fails, e.g. on a full disk, cuts the file back to them);
    :attr:`nbytes` after a block lets a resumed run cut the file back to that block
    (``resume_bytes``/``resume_frames``).
    """

    def __init__(
        self, path: str | Path, fps: float, *, resume_bytes: int | None = None, resume_frames: int = 0, crf: int = 18
    ) -> None:
        import imageio_ffmpeg

        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self._exe = imageio_ffmpeg.get_ffmpeg_exe()
        self.frames = 0
        self._sequence = 0
        self._frame_ticks: int | None = None
        if resume_bytes:
            data = self.path.read_bytes()[:resume_bytes]
            if len(data) != resume_bytes:
                raise OSError(f"{self.path}: shorter ({len(data)} bytes) than the checkpoint recorded ({resume_bytes})")
            self._sequence = sum(1 for b in _boxes(data) if b[0] == "moof")
            self._frame_ticks = self._ticks(data)
            self.frames = resume_frames
            with self.path.open("r+b") as handle:
                handle.truncate(resume_bytes)
        else:
            self.path.write_bytes(b"")
            os.chmod(self.path, 0o644)
        self.nbytes = self.path.stat().st_size

    def _ticks(self, data: bytes) -> int:
        moov = next((b for b in _boxes(data) if b[0] == "moov"), None)
        mdhd = _child(data, moov, ("trak", "mdia", "mdhd")) if moov else None
        if mdhd is None:
            raise OSError("ffmpeg produced an MP4 without a movie header")
        version = data[mdhd[1] + 8]
        at = mdhd[1] + 12 + (16 if version == 1 else 8)
        timescale = struct.unpack(">I", data[at : at + 4])[0]
        ticks = timescale / self.fps
        if ticks != int(ticks):
            raise OSError(f"MP4 timescale {timescale} is not a multiple of {self.fps} fps")
        return int(ticks)

    def _encode(self, frames: np.ndarray) -> bytes:
        t, h, w, _ = frames.shape
        cmd = [
            self._exe, "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
            "-r", f"{self.fps}", "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264",
            "-preset", "veryfast",
            "-pix_fmt", "yuv420p", "-bf", "0", "-g", str(max(1, t)), "-crf", str(self.crf),
            "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-f", "mp4", "-",
        ]  # fmt: skip
        done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, check=False)
        if done.returncode != 0:
            raise OSError(
                f"ffmpeg failed encoding {self.path}: {' '.join(done.stderr.decode(errors='replace').split())}"
            )
        return done.stdout

    def append(self, frames: np.ndarray) -> None:
        """Encode ``frames [T, H, W, 3]`` uint8 and append them durably."""
        if len(frames) == 0:
            return
        data = bytearray(self._encode(frames))
        boxes = _boxes(bytes(data))
        out = bytearray()
        if self.nbytes == 0:
            self._frame_ticks = self._ticks(bytes(data))
            out += b"".join(bytes(data[o : o + s]) for kind, o, s in boxes if kind in ("ftyp", "moov"))
        assert self._frame_ticks is not None
        offset = self.frames * self._frame_ticks
        for kind, o, s in boxes:
            if kind not in ("moof", "mdat"):
                continue
            if kind == "moof":
                self._sequence += 1
                mfhd = _child(bytes(data), (kind, o, s), ("mfhd",))
                if mfhd is not None:
                    struct.pack_into(">I", data, mfhd[1] + 12, self._sequence)
                tfdt = _child(bytes(data), (kind, o, s), ("traf", "tfdt"))
                if tfdt is not None:
                    if data[tfdt[1] + 8] == 1:
                        value = struct.unpack_from(">Q", data, tfdt[1] + 12)[0]
                        struct.pack_into(">Q", data, tfdt[1] + 12, value + offset)
                    else:
                        value = struct.unpack_from(">I", data, tfdt[1] + 12)[0]
                        struct.pack_into(">I", data, tfdt[1] + 12, value + offset)
            out += data[o : o + s]
        try:
            with self.path.open("ab") as handle:
                handle.write(out)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:  # a full disk, a signal mid-write: cut back to the blocks before
            with contextlib.suppress(OSError):
                os.truncate(self.path, self.nbytes)
            raise
        self.nbytes += len(out)
        self.frames += len(frames)

    def close(self) -> None:
        """Nothing to finish: the file is complete after every :meth:`append`."""
