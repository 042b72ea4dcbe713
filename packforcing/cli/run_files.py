"""The files of one ``packforcing generate`` run, and the writer that keeps them whole.

- :func:`check_output` / :func:`prepare_output`: the run directory, checked before anything
  expensive happens, then created (or cleared of an earlier run with ``--overwrite``);
- :class:`RunFiles`: each block streamed into ``video.mp4`` (one per batch item), ``report.json``
  rewritten (:func:`report_due`), the latents kept for ``--save-latents``, per-return fidelity measured; the
  checkpoint that resumes all of it (saved once per state); the run's last word (``complete``,
  ``interrupted``, ``failed``) with ``memory.png``;
- :func:`writing`: a write error (a full disk) as one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a run starts, not by `packforcing --help`
    import torch


class RunError(ValueError):
    """A problem with the run directory or the run's inputs (one line, exit status 1)."""


class OutputError(OSError):
    """An output file could not be written (a full disk, a lost permission): one line naming it,
    ``out/video.mp4: cannot write: no space left on device``."""

    def __str__(self) -> str:
        return f"{self.filename}: cannot write: {self.strerror}"


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an :class:`OSError` with no file named (``[Errno 28] No space left on device``
    from a write or fsync) into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        if exc.errno is None or not exc.strerror:
            raise  # a message of its own (it names its file)
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
        raise OutputError(exc.errno, reason, str(path)) from exc


REPORT_EVERY_BLOCK = 64
"""``report.json`` is rewritten after each of a run's first ``2 * REPORT_EVERY_BLOCK`` blocks,
then ever less often (:func:`report_due`)."""


def report_due(blocks_done: int) -> bool:
    """Whether ``report.json`` is rewritten after block ``blocks_done`` (counted from 1): after
    each of the first ``2 * REPORT_EVERY_BLOCK``, then after every 2nd up to 4×, every 4th up to
    8×, … — ``REPORT_EVERY_BLOCK`` rewrites each time the run doubles. Each rewrite serialises
    every block's record, so rewriting it after every block would cost each block more the longer
    the run (0.24 s a block at 10,000 blocks: 5 MB of JSON); this way a block's share stays about
    ``REPORT_EVERY_BLOCK`` records' worth however long the run (~530 rewrites in 10,000 blocks)
    and the file lags the run by at most 1/64 of its blocks. A checkpoint and the run's last
    word (complete, interrupted, failed) always rewrite it; the block that ends the run (its
    last, or the one a stop was asked during) leaves its rewrite to that last word, which
    follows at once (:meth:`RunFiles.after_block`)."""
    interval = 1 << max(0, (blocks_done // REPORT_EVERY_BLOCK).bit_length() - 1)
    return blocks_done % interval == 0


RUN_FILES = ("report.json", "memory.png", "latents.safetensors", "video.mp4")
CHECKPOINT_DIR = "checkpoint"


def existing_run_files(out: Path) -> list[Path]:
    """The files of a run in ``out`` (only names this job writes)."""
    found = [out / name for name in (*RUN_FILES, CHECKPOINT_DIR) if (out / name).exists()]
    found += sorted(p for p in out.glob("video_*.mp4") if p.name[6:-4].isdigit())
    return found


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check the run directory before anything expensive happens, changing nothing: it must be
    creatable and writable; an existing run is refused unless ``overwrite`` or ``resume`` (which
    needs a checkpoint)."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    if resume:
        if not (out / CHECKPOINT_DIR / "state.json").is_file():
            what = "no run here" if not out.exists() else "no checkpoint here"
            raise RunError(f"{out}: nothing to resume ({what}; checkpoints are written on interruption and every "
                           "run.checkpoint_every blocks)")  # fmt: skip
    elif out.exists():
        existing = existing_run_files(out)
        if existing and not overwrite:
            names = ", ".join(p.name for p in existing[:4])
            raise RunError(
                f"{out}: already holds a run ({names}); pass --overwrite to replace it or --resume to continue it"
            )
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise RunError(f"{out}: cannot create the output directory: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"{out}: cannot create or write the output directory ({parent} is not writable)")


def prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create the run directory; with ``overwrite``, first remove the earlier run's files (only
    names this job writes), so no stale file of it is left beside the new ones."""
    if overwrite and out.is_dir():
        for path in existing_run_files(out):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{out}: cannot create the output directory: {exc.strerror}") from None


class ReturnTracker:
    """Per-return fidelity of a run: at each cut back to a condition seen before, the PSNR of
    the block's first frame against the last frame generated under that condition (for a
    world whose off-screen scenes are frozen, they should match)."""

    def __init__(self, report: Any) -> None:
        self.report = report
        self.last: dict[str, tuple[int, Any]] = {}
        self.previous: str | None = None

    def add(self, index: int, condition: Any, pixels: Any) -> None:
        """Block ``index`` under ``condition``, decoded ``pixels [B, 3, F, H, W]``."""
        from packforcing.core.conditions import spec_key

        if condition is None or pixels.shape[2] == 0:
            return
        key = spec_key(condition)
        if key != self.previous and key in self.last:
            seen, frame = self.last[key]
            frame = frame.to(pixels.device)
            mse = float((pixels[:, :, 0].clamp(-1, 1) - frame.clamp(-1, 1)).pow(2).mean())
            self.report.add_return(index, condition, index - seen, 10 * math.log10(4.0 / max(mse, 1e-10)))
        self.last[key] = (index, pixels[:, :, -1].clone())
        self.previous = key

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, info)`` for a checkpoint: the last frame under each condition seen, and
        (JSON-able) their keys, blocks and the previous block's key."""
        keys = list(self.last)
        tensors = {str(i): self.last[key][1] for i, key in enumerate(keys)}
        return tensors, {"keys": keys, "blocks": [self.last[key][0] for key in keys], "previous": self.previous}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next return is measured as in an uninterrupted run."""
        keys, blocks = list(info["keys"]), list(info["blocks"])
        self.last = {key: (int(blocks[i]), tensors[str(i)]) for i, key in enumerate(keys)}
        self.previous = info.get("previous")


class RunFiles:
    """What a run writes in ``out`` as its blocks come, resumable from its checkpoint.

    Per block (:meth:`add`): the latents decoded (through the codec's streaming decoder when it
    has one: the Wan VAE's causal cache carries across blocks) and appended to one fragmented
    MP4 per batch item, playable after every block; the return fidelity (:class:`ReturnTracker`);
    the latents kept with ``save_latents``; the block's record in the report. Then
    (:meth:`after_block`) ``report.json`` is rewritten when :func:`report_due`, or with a
    checkpoint.
    :meth:`checkpoint` saves the session and all of that (decoder cache, bytes and frames of each
    MP4, report, tracker), and a writer built with the checkpoint's ``state``/``extra`` goes on
    exactly where it stopped. A checkpoint already on disk at the run's :meth:`position` (saved
    by this writer, or the one it resumed from) is not saved again.

    ``keep``: what a resume needs to rebuild the run (config source, data, overrides, ...),
    stored in the checkpoint as is.
    """

    def __init__(
        self,
        out: Path,
        *,
        engine: Any,
        session: Any,
        report: Any,
        keep: Mapping[str, Any],
        fps: float,
        save_latents: bool,
        state: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        from packforcing.output.video import FragmentedMP4Writer

        extra = extra or {}
        self.out = out
        self.session = session
        self.report = report
        self.keep = dict(keep)
        self.save_latents = save_latents or bool(extra.get("save_latents"))
        self.latents: list[torch.Tensor] = []
        self.policy = engine.policy
        done = session.blocks_done
        if state is not None:
            report.restore(extra.get("report_blocks", []), extra.get("report_returns"))
            tensors = state["tensors"]
            self.latents = [tensors[f"run.latents.{i}"] for i in range(done) if f"run.latents.{i}" in tensors]
            if self.save_latents and len(self.latents) != done:
                raise RunError(f"{out}: --save-latents, but the run was started without it")
        self.keep["save_latents"] = self.save_latents
        self.codec = engine.model.codec
        # a codec that decodes across blocks (the Wan VAE's causal cache) streams; others decode per block
        make_stream = getattr(self.codec, "streaming_decoder", None)
        self.decoder = make_stream() if callable(make_stream) else self.codec
        if state is not None and self.streaming and "decoder" not in extra:
            raise RunError(
                f"{out}: the checkpoint lacks the video decoder's causal state (written by an older version)"
            )
        if state is not None and "decoder" in extra:
            # the causal decoder's cache as it was at the checkpoint: the frames after it follow exactly
            try:
                self.decoder.load_state_dict(_prefixed(state, "run.decoder."), extra["decoder"])
            except (AttributeError, ValueError, KeyError) as exc:
                raise RunError(f"{out}: the checkpoint's video decoder state does not fit this model ({exc})") from None
        g = engine.geometry
        # pixel frames written per video: a causal codec decodes 1 + 4(F - 1) frames for F latent ones
        self.video_frames = int(extra.get("video_frames", done * g.frames_per_block)) if state is not None else 0
        self.writers: list[FragmentedMP4Writer] = []
        if self.codec is not None:
            sizes = extra.get("video_bytes", [])
            for item in range(session.batch_size):
                name = "video.mp4" if item == 0 else f"video_{item}.mp4"
                resume_bytes = sizes[item] if state is not None and item < len(sizes) else None
                frames = self.video_frames if resume_bytes else 0
                self.writers.append(
                    FragmentedMP4Writer(out / name, fps, resume_bytes=resume_bytes, resume_frames=frames)
                )
        self.returns = ReturnTracker(report)
        if state is not None and "returns" in extra:  # where each condition was last seen, for the next return
            self.returns.load_state_dict(_prefixed(state, "run.returns."), extra["returns"])
        self.decoded = done
        """Blocks whose frames are in the video (and in the decoder's state)."""
        self.checkpointed: tuple[Any, ...] | None = None
        """:meth:`position` when the checkpoint on disk was saved (``None``: not known to hold this run's state)."""
        if state is not None and _same_json(self.keep, {key: extra.get(key) for key in self.keep}):
            # the checkpoint resumed from holds exactly this state (a resume that changes the
            # run's length records it in the checkpoint: that one is saved again)
            self.checkpointed = self.position()

    @property
    def streaming(self) -> bool:
        """Whether the video decoder carries state across blocks (saved in the checkpoint)."""
        return self.decoder is not self.codec

    def add(self, block: Any) -> dict[str, Any]:
        """Write :class:`~packforcing.core.engine.GeneratedBlock` ``block`` out; its report record."""
        from packforcing.output.video import to_uint8_frames

        if self.writers:
            pixels = self.decoder.decode(block.latents.float())  # [B, 3, T, H, W]
            for item, writer in enumerate(self.writers):
                with writing(writer.path):
                    writer.append(to_uint8_frames(pixels[item]))
            self.video_frames += pixels.shape[2]
            self.returns.add(block.index, block.condition, pixels)
        self.decoded += 1
        if self.save_latents:
            self.latents.append(block.latents.detach().to("cpu", copy=True))
        return self.report.add(block)

    def after_block(self, *, checkpoint: bool, ending: bool) -> None:
        """After :meth:`add`: save a checkpoint (``checkpoint``: ``run.checkpoint_every``'s),
        rewriting ``report.json`` with it, else rewrite the report when :func:`report_due`.
        ``ending``: the run's last word comes next (``complete`` after the last block,
        ``interrupted`` after a stop asked during this block) and writes the report with its
        status, so it is not written here too."""
        if checkpoint:
            self.checkpoint(report=not ending)
        elif not ending and report_due(len(self.report.blocks)):
            self.write_report()

    def write_report(self) -> None:
        with writing(self.out / "report.json"):
            self.report.write(self.out / "report.json")

    def consistent(self) -> bool:
        """Every output holds exactly the blocks the session has made (so a checkpoint is whole)."""
        done = self.session.blocks_done
        last = getattr(self.policy, "last_block_id", done - 1)
        return (
            last == done - 1
            and len(self.report.blocks) == done
            and self.decoded == done
            and all(w.frames == self.video_frames for w in self.writers)
            and (not self.save_latents or len(self.latents) == done)
        )

    def position(self) -> tuple[Any, ...]:
        """Where the session and every output stand: its blocks and last block id, the blocks
        decoded, each MP4's bytes and frames, the latents kept, the report's blocks and returns.
        Nothing a checkpoint holds changes without one of these (a commit aborted by an
        interrupt leaves the cache as it was)."""
        return (
            self.session.blocks_done,
            getattr(self.policy, "last_block_id", None),
            self.decoded,
            self.video_frames,
            tuple((w.nbytes, w.frames) for w in self.writers),
            len(self.latents),
            len(self.report.blocks),
            len(self.report.returns),
        )

    def checkpoint(self, *, report: bool = True) -> None:
        """Save the session and every output's position to ``out/checkpoint`` (atomically), then
        rewrite ``report.json`` with every block the checkpoint has; ``report=False`` leaves that
        to the caller's next step (an interrupted run's :meth:`finish`, which writes the same
        blocks with its status: the report is written once on the way out, not twice).

        A checkpoint already on disk at this :meth:`position` is left as it is: an interrupt
        right after a ``run.checkpoint_every`` checkpoint (or before a resumed run's first block)
        does not write the same gigabytes again."""
        position = self.position()
        if position != self.checkpointed or not (self.out / CHECKPOINT_DIR / "state.json").is_file():
            self.checkpointed = None  # until the new one is whole
            self._save_checkpoint()
            self.checkpointed = position
        if report:
            self.write_report()  # the report on disk has every block the checkpoint has

    def _save_checkpoint(self) -> None:
        from packforcing.core.checkpoint import save_checkpoint

        saved = self.session.state_dict()
        if self.save_latents:
            saved["tensors"].update({f"run.latents.{i}": t for i, t in enumerate(self.latents)})
        info = {
            **self.keep,
            "report_blocks": self.report.blocks,
            "report_returns": self.report.returns,
            "video_bytes": [w.nbytes for w in self.writers],
            "video_frames": self.video_frames,
        }
        tracked, info["returns"] = self.returns.state_dict()
        saved["tensors"].update({f"run.returns.{k}": t for k, t in tracked.items()})
        if self.streaming:  # its causal cache continues the video
            cached, info["decoder"] = self.decoder.state_dict()
            saved["tensors"].update({f"run.decoder.{k}": t for k, t in cached.items()})
        with writing(self.out / CHECKPOINT_DIR):
            save_checkpoint(self.out / CHECKPOINT_DIR, saved, info)

    def complete(self, keep_checkpoint: bool) -> None:
        """Every block is made: the latents, then ``report.json`` and ``memory.png`` say
        ``complete``; the checkpoint goes unless ``keep_checkpoint``."""
        if self.save_latents:
            save_latents(self.out / "latents.safetensors", self.latents)
        self.finish("complete")
        if (self.out / CHECKPOINT_DIR).exists() and not keep_checkpoint:
            shutil.rmtree(self.out / CHECKPOINT_DIR)

    def finish(self, status: str, error: str | None = None) -> None:
        """Write report.json and memory.png with ``status``; for ``failed``, each as far as it
        can be written (the error that failed the run is the one raised)."""
        from packforcing.output.plot import plot_memory

        report = self.report
        report.status, report.error = status, error
        for name, write in (
            ("report.json", report.write),
            ("memory.png", lambda path: plot_memory(report.as_dict(), path, report.full_bytes_per_block)),
        ):
            try:
                with writing(self.out / name):
                    write(self.out / name)
            except OSError:
                if status != "failed":
                    raise


def _same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are written as the same JSON (``b`` read back from a checkpoint)."""
    try:
        return json.dumps(a) == json.dumps(b)
    except (TypeError, ValueError):
        return False


def _prefixed(state: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under ``prefix``, without it."""
    return {k[len(prefix) :]: t for k, t in state["tensors"].items() if k.startswith(prefix)}


def save_latents(path: Path, latents: Sequence[torch.Tensor]) -> None:
    """Write every block's latents, concatenated in time, atomically to ``path``."""
    import torch

    from packforcing.core.checkpoint import save_safetensors_atomic

    with writing(path):
        blocks = torch.cat(list(latents), dim=2).contiguous()
        save_safetensors_atomic({"latents": blocks}, path, metadata={"blocks": str(len(latents))})
