"""Finding and checking safetensors weight files without loading them.

:func:`resolve_weights_path` finds a configured file (relative paths: beside the config file
first, then the working directory). :func:`read_header` parses a safetensors header (8-byte
length, JSON) and checks that every tensor's byte range lies inside the file and matches its
dtype and shape, reading no tensor data; :func:`check_tensors` compares names and shapes with
what a module expects; :func:`load_into` loads a checked file into a module, refusing values
the run's dtype cannot hold, and :func:`cast_damage` checks what a library loaded and cast
itself (``from_pretrained(torch_dtype=...)``, from safetensors files or torch ``.bin`` ones) the
same way. Problems are ``ValueError("weights: <file>: <problem>")`` so a config error names
``<component>.weights`` and the file in one line. Nothing is ever unpickled but by torch's
``weights_only`` loader (tensors and plain containers: a ``.bin`` file the library read first).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from packforcing.core.config import file_label
from packforcing.core.errors import ParamError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
FLOAT_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
"""safetensors' floating-point dtype names → torch's."""


def resolve_weights_path(spec: str, config_source: str | os.PathLike[str] | None, *, package_dir: Path) -> Path:
    """Path of a ``weights:`` value: ``pkg:NAME`` (in ``package_dir``), absolute, or relative —
    beside the config file first, then in the working directory. The error says where it looked."""
    if spec.startswith("pkg:"):
        candidates = [package_dir / spec[4:]]
    else:
        path = Path(spec).expanduser()
        candidates = [path] if path.is_absolute() else []
        if not candidates:
            if config_source:
                candidates.append(Path(config_source).parent / path)
            candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    looked = " and ".join(str(c.absolute()) for c in dict.fromkeys(candidates))
    raise ParamError("weights", f"file not found: {spec} (looked for {looked})")


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``({tensor name: (dtype, shape)}, metadata)`` of a safetensors file, checked for
    truncation and corruption without reading tensor data."""
    label = file_label(path)

    def bad(problem: str) -> ParamError:
        return ParamError("weights", f"{label}: {problem}")

    try:
        info = path.stat()
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise bad("not a regular file")
    size = info.st_size
    if size == 0:
        raise bad("empty file")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise bad(f"truncated: {size} bytes, not a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise bad("not a safetensors file (corrupt or truncated header)")
            raw = handle.read(length)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file (header is not a mapping)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("corrupt header: __metadata__ is not a mapping of strings")
    data_bytes = size - 8 - length
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(dtype, str)
            or dtype not in DTYPE_BYTES
            or not isinstance(shape, list)
            or not all(_is_count(d) for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise bad(f"corrupt header entry for tensor {name!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f"corrupt: tensor {name!r} of shape {list(shape)} {dtype} does not fit its {end - begin} bytes")
        if end > data_bytes:
            raise bad(f"truncated: tensor {name!r} ends at byte {end} of {data_bytes} data bytes")
        spans.append((begin, end, name))
        tensors[name] = (dtype, tuple(shape))
    position = 0  # as safetensors requires: the tensors tile the data, no overlap, no gap
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"corrupt: tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != data_bytes:
        raise bad(f"corrupt: {data_bytes - position} bytes after the last tensor")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_tensors(
    path: Path, tensors: Mapping[str, tuple[str, tuple[int, ...]]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Names and shapes of ``tensors`` (from :func:`read_header`) against ``expected``."""
    label = file_label(path)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        if extra:
            parts.append(f"{len(extra)} unexpected tensors ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
        raise ParamError("weights", f"{label}: not weights for this architecture: {'; '.join(parts)}")
    for name, shape in expected.items():
        have = tensors[name][1]
        if tuple(have) != tuple(shape):
            raise ParamError("weights", f"{label}: tensor {name!r} has shape {list(have)}, expected {list(shape)}")


def load_into(module: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> None:
    """Load the safetensors ``path`` (names and shapes checked by :func:`check_tensors`) into
    ``module``, whose floating-point tensors are then cast to ``dtype``. A file value that the
    copy into the module's dtype or that cast would turn into ±Inf (float32 weights beyond
    float16's ±65504) is refused first, naming the tensor, and ``module`` is left unchanged."""
    from safetensors.torch import load_file

    from packforcing.core.finite import cast_problem, narrowest

    state = load_file(str(path))
    targets = {
        name: narrowest(t.dtype, dtype or t.dtype) for name, t in module.state_dict().items() if t.is_floating_point()
    }
    problem = cast_problem(state.items(), targets)
    if problem is not None:
        raise ParamError("weights", f"{file_label(path)}: {problem}")
    module.load_state_dict(state)


def safetensors_files(folder: Path, name: str) -> list[Path]:
    """The files of the weights ``name`` in ``folder``: that file, or the shards its
    ``<name>.index.json`` lists (none when neither is there or the index is unreadable). Any
    weights file name works: ``pytorch_model.bin`` and its ``.index.json`` too."""
    if (folder / name).is_file():
        return [folder / name]
    try:
        weight_map = json.loads((folder / f"{name}.index.json").read_text())["weight_map"]
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def weights_files(folder: Path, *names: str) -> list[Path]:
    """The files of the first of the weights ``names`` that ``folder`` holds (:func:`safetensors_files`
    of each in turn): what a library that prefers safetensors and falls back to torch's pickled
    ``.bin`` (diffusers, transformers) reads, given ``(NAME.safetensors, NAME.bin)``."""
    for name in names:
        files = safetensors_files(folder, name)
        if files:
            return files
    return []


def torch_load(file: Path) -> object:
    """What the torch file ``file`` holds, loaded on the CPU with ``weights_only`` (tensors and
    plain containers only: nothing else is unpickled) and memory-mapped where torch can (tensors
    are read when used); torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped and is
    read whole. Raises what ``torch.load`` raises (pickle errors, refused globals, a truncated
    file): the caller names the file in its own error."""
    import torch

    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "_use_new_zipfile_serialization" not in str(exc):
            raise
        return torch.load(str(file), map_location="cpu", weights_only=True)


def _stored(file: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of the torch weights file ``file`` (a ``.bin`` state dict), loaded by
    :func:`torch_load`, so that their dtypes are known and none is read until asked."""
    import torch

    try:
        data = torch_load(file)
    except Exception as exc:  # pickle errors, refused globals, truncated files
        problem = " ".join(str(exc).split())
        raise ParamError("weights", f"{file_label(file)}: not a readable torch weights file: {problem}") from None
    if not isinstance(data, Mapping):
        raise ParamError("weights", f"{file_label(file)}: not a state dict")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def cast_damage(loaded: Mapping[str, torch.Tensor], files: list[Path], unused: Collection[str] = ()) -> str | None:
    """``"<file>: <tensor> holds 7.1e+04, beyond float16's ±65504; ..."`` when a library that read
    ``files`` (safetensors, or torch ``.bin`` files: :func:`weights_files`) into ``loaded`` (a
    model's state dict) and cast them to the run's dtype turned a finite value into ±Inf, else
    ``None``. Only the tensors whose file dtype (from the safetensors headers, or a ``.bin`` file
    memory-mapped) :func:`~packforcing.core.finite.narrows` into their loaded dtype are read (one
    reduction each, on their device, one host read), so a load as wide as the files costs nothing;
    a non-finite one is read again from its file, to tell an overflow (reported) from a NaN or Inf
    the file holds itself (not the cast's doing: passed).

    A file tensor is found in ``loaded`` by its name, else (renamed on load: transformers adds
    or strips a model's base-model prefix, ``transformer.``) by the one loaded name that no file
    name matches, of its shape, that its name ends with or that ends with its name. One found by
    neither, and not among ``unused`` (the names the library reported it did not load), is read
    from its file and checked against the narrowest dtype of the loaded tensors of its shape
    that no file name matches (of all loaded tensors, when none is): a library's renaming can
    cost a read, or a refusal that a closer match would spare, but never skip the check."""
    import torch
    from safetensors import safe_open

    from packforcing.core.finite import cast_problem, largest_magnitude, narrowest, narrows

    sources: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
    pickled: dict[Path, Mapping[str, torch.Tensor]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            for name, (kind, shape) in read_header(file)[0].items():
                if kind in FLOAT_DTYPES:
                    sources.setdefault(name, (file, getattr(torch, FLOAT_DTYPES[kind]), shape))
        else:
            pickled[file] = _stored(file)
            for name, tensor in pickled[file].items():
                if tensor.is_floating_point():
                    sources.setdefault(name, (file, tensor.dtype, tuple(tensor.shape)))
    floating = {name: t for name, t in loaded.items() if t.is_floating_point()}
    unnamed = {name: t for name, t in floating.items() if name not in sources}
    found = {name: floating[name] for name in sources if name in floating}
    unfound: list[str] = []
    skipped = set(unused)
    for name, (_, _, shape) in sources.items():
        if name in loaded or name in skipped:
            continue
        like = [
            other
            for other, t in unnamed.items()
            if tuple(t.shape) == shape and (name.endswith(f".{other}") or other.endswith(f".{name}"))
        ]
        if len(like) == 1:
            found[name] = unnamed[like[0]]
        else:
            unfound.append(name)

    def stored_problem(name: str, dtype: torch.dtype) -> str | None:
        """The problem of file tensor ``name`` cast to ``dtype``, read from its file."""
        file = sources[name][0]
        if file in pickled:
            problem = cast_problem([(name, pickled[file][name])], dtype)
        else:
            with safe_open(str(file), framework="pt") as handle:
                problem = cast_problem([(name, handle.get_tensor(name))], dtype)
        return None if problem is None else f"{file_label(file)}: {problem}"

    suspects = [(name, t) for name, t in found.items() if narrows(sources[name][1], t.dtype)]
    largest = torch.stack([largest_magnitude(t).to(torch.float64) for _, t in suspects]).tolist() if suspects else []
    for (name, tensor), value in zip(suspects, largest, strict=True):
        if not math.isfinite(value):
            problem = stored_problem(name, tensor.dtype)
            if problem is not None:
                return problem
    for name in unfound:
        _, stored, shape = sources[name]
        targets = [t.dtype for t in unnamed.values() if tuple(t.shape) == shape] or [t.dtype for t in floating.values()]
        if targets and narrows(stored, narrowest(*targets)):
            problem = stored_problem(name, narrowest(*targets))
            if problem is not None:
                return problem
    return None
