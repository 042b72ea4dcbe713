"""Where the training verbs write their weights: checked before training, written atomically.

:func:`check_writable` runs before any training, so a run that could not save its result fails
at once, in one line naming the option, instead of after the training time is spent.
:func:`write_weights` writes safetensors to a temporary file beside the target and renames it
over the target, so a reader never sees a half-written file; the file is mode 0644 (readable by
others, like any other output of the command), whatever the temporary file was created with.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (or is a broken link)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_writable(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """``path`` as a :class:`Path`, or ``ValueError("<option>: <path>: <problem>")`` when weights
    cannot be written there: it is a directory, or its folder (the closest one that exists; the
    missing ones are created when writing) is not a directory or refuses a new file. Tried with a
    real file (removed at once), so read-only file systems and ACLs are seen too."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{option}: {out}: is a directory (give a file name, e.g. {out / 'weights.safetensors'})")
    folder = _nearest_existing(out.parent)
    if not folder.is_dir():
        raise ValueError(f"{option}: {out}: cannot write there: {folder} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ValueError(f"{option}: {out}: cannot write there: {exc.strerror or exc}") from None
    return out


def write_weights(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Write ``state`` as safetensors to ``path`` atomically (a temporary file in the same folder,
    then a rename; :func:`~packforcing.core.checkpoint.save_safetensors_atomic`), mode 0644; on
    failure the temporary file is removed and ``path`` is left as it was. Weights that are not
    finite are refused (``ValueError`` naming the file and tensor), ``path`` left as it was. A failure of the writer
    itself is raised as an ``OSError`` naming ``path``."""
    from packforcing.core.checkpoint import save_safetensors_atomic

    out = Path(path)
    bad = next((name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:  # never a file of NaN weights that loads without a word
        raise ValueError(f"{out}: not written: {bad} is not finite (training diverged: try a smaller --lr)")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_safetensors_atomic(state, out, metadata=metadata)
    except OSError:
        raise
    except Exception as exc:  # safetensors' own SafetensorError
        raise OSError(f"{out}: cannot write the weights: {exc}") from exc


def diverged(step: int, loss: float) -> str | None:
    """The one-line error of a training step whose ``loss`` is not finite, or ``None``."""
    if math.isfinite(loss):
        return None
    return f"training diverged at step {step}: the loss is {loss} (try a smaller --lr)"


def git_commit() -> str:
    """The commit of the source tree this runs from, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"
