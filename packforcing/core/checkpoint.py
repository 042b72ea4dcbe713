"""Checkpoints on disk: a session's state as safetensors (tensors) plus JSON (everything else).

Layout of a checkpoint directory::

    state.json                     {"tensors": "state-<n>.safetensors", "meta": {...}, "extra": {...}}
    state-<n>.safetensors          the tensors, n = blocks done

The tensor file is written first under a new name, then ``state.json`` is replaced atomically
(``os.replace``) to point at it, then older tensor files are removed: a crash at any moment
leaves the previous checkpoint or the new one, never a mix. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

STATE_JSON = "state.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as safetensors to ``path`` as :func:`write_atomic` writes bytes: a
    temporary file beside it, synced, mode 0644, renamed over ``path``; removed on any failure,
    so a full disk leaves no partial file behind."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, state: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` (``{"tensors": ..., "meta": ...}``, see
    :meth:`~packforcing.core.session.GenerationSession.state_dict`) and JSON-able ``extra``."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{int(state['meta']['blocks_done'])}.safetensors"
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state["tensors"].items()}
    save_safetensors_atomic(tensors, directory / name)
    document = {"tensors": name, "meta": state["meta"], "extra": dict(extra or {})}
    write_atomic(directory / STATE_JSON, (json.dumps(document, indent=1) + "\n").encode())
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, extra)`` saved by :func:`save_checkpoint`; ``ValueError`` naming the file if it
    is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / STATE_JSON
    try:
        document = json.loads(index.read_text())
        tensor_file = directory / str(document["tensors"])
        meta = document["meta"]
    except FileNotFoundError:
        raise ValueError(f"{directory}: no checkpoint here (no {STATE_JSON})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: unreadable checkpoint ({type(exc).__name__})") from None
    if tensor_file.parent != directory or not tensor_file.is_file():
        raise ValueError(f"{index}: its tensor file {document['tensors']!r} is missing")
    try:
        tensors: dict[str, torch.Tensor] = load_file(str(tensor_file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{tensor_file}: unreadable checkpoint tensors ({' '.join(str(exc).split())})") from None
    return {"tensors": tensors, "meta": meta}, dict(document.get("extra") or {})
