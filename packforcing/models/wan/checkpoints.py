"""Reading Wan2.1 transformer checkpoints from disk (nothing is downloaded).

Three formats, each turned into diffusers' ``WanTransformer3DModel`` config and state dict:

- ``diffusers``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
  its sharded ``.index.json``): a pipeline root with ``transformer/`` or that folder itself.
- ``wan``: the official single ``.safetensors`` file (``blocks.0.self_attn.q.weight``,
  ``head.modulation``, …), converted by diffusers' own ``convert_wan_transformer_to_diffusers``.
- ``self_forcing``: a Self-Forcing / CausVid training checkpoint, a torch file holding
  ``generator_ema`` (preferred) or ``generator`` with keys ``model.<official name>``. It is read
  with ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
  objects.

For the single-file formats the architecture comes from a ``config.json`` next to the file
(official names ``dim``, ``num_heads``, … or diffusers names), else from the tensor shapes with
Wan2.1's head dim of 128. Every problem is a ``ParamError`` at ``path`` (``"path: <file>: <problem>"``) naming
the first bad tensor, which the builder reports as one line at ``model.path``. A tensor is named as
the file stores it (``blocks.0.self_attn.q.weight``, ``model.diffusion_model.…``,
``generator_ema.model.…``), not by the diffusers name it loads as; a missing one by the official
name diffusers' converter would take it from, when that is known.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from packforcing.core.errors import ParamError
from packforcing.core.weightfiles import torch_load
from packforcing.models.wan.imports import diffusers_quietly

TRANSFORMER_SUBFOLDER = "transformer"
TRANSFORMER_CLASS = "WanTransformer3DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SELF_FORCING_KEYS = ("generator_ema", "generator")
SELF_FORCING_PREFIX = "model."
COMFY_PREFIX = "model.diffusion_model."
"""The prefix of an official file's tensor names as ComfyUI saves them (diffusers' converter drops it)."""
WAN21_HEAD_DIM = 128
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

OFFICIAL_CONFIG = {
    "dim": None,  # -> num_attention_heads * attention_head_dim
    "num_heads": "num_attention_heads",
    "num_layers": "num_layers",
    "ffn_dim": "ffn_dim",
    "freq_dim": "freq_dim",
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "text_dim": "text_dim",
    "eps": "eps",
    "patch_size": "patch_size",
    "cross_attn_norm": "cross_attn_norm",
}
"""Official Wan ``config.json`` keys → diffusers ``WanTransformer3DModel`` arguments."""


class CheckpointError(ParamError):
    """A checkpoint that cannot be read: a :class:`ParamError` at ``path`` (``model.path`` once
    placed); ``str()`` is ``"path: <file>: <problem>"``."""

    def __init__(self, file: str | Path, problem: str) -> None:
        self.file = str(file)
        self.problem = problem
        super().__init__("path", f"{file}: {problem}")


@attrs.frozen
class Checkpoint:
    """A checkpoint found on disk: its ``format``, the ``file`` (or folder) and where its config is."""

    format: str
    file: Path
    config_file: Path | None

    def config(self) -> dict[str, Any]:
        """diffusers ``WanTransformer3DModel`` config (from the config file or the tensor shapes)."""
        if self.config_file is not None:
            return _read_config(self.config_file)
        shapes, stored = self.named_shapes()
        return infer_config(shapes, self.file, stored=stored, missing=self.missing_name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name (diffusers naming) → shape, from file headers (no tensor data is read)."""
        return {k: tuple(v.shape) for k, v in self.state_dict(meta=True).items()}

    def state_dict(self, *, meta: bool = False) -> dict[str, torch.Tensor]:
        """Tensors in diffusers naming (``meta``: shapes only, as meta-device tensors)."""
        if self.format == "diffusers":
            return _read_diffusers(self.file, meta)
        if self.format == "wan":
            return to_diffusers_names(_read_safetensors(self.file, meta), self.file)
        return to_diffusers_names(_read_self_forcing(self.file, meta=meta), self.file)

    def named_shapes(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """``(shapes, stored)``: :meth:`shapes`, and each tensor's name as stored in its file (a
        diffusers folder's is its own; a single-file format's is its official name as written
        there, a Self-Forcing file's as ``generator_ema.model.<official name>``). Only file
        headers are read. Two tensors of the file that diffusers' converter would load as one
        are refused (which one it keeps is arbitrary)."""
        if self.format == "diffusers":
            shapes = self.shapes()
            return shapes, {name: name for name in shapes}
        stored, labels, _ = self._official()
        # diffusers' converter renames, handing each tensor on as it is: its identity leads back
        by_id = {id(tensor): labels[key] for key, tensor in stored.items()}
        renamed = to_diffusers_names(stored, self.file)
        names = {name: by_id[id(t)] for name, t in renamed.items() if id(t) in by_id}
        kept = set(names.values())
        for key, tensor in stored.items():
            if labels[key] in kept:
                continue
            # a tensor the converter replaced (reshaped or split) or dropped for another of the
            # same name: converted alone, its name tells which
            for name in to_diffusers_names({key: tensor}, self.file, check=False):
                if name in names and names[name] != labels[key]:
                    raise _same_name(self.file, names[name], labels[key], name)
                names[name] = labels[key]
        return {name: tuple(t.shape) for name, t in renamed.items()}, names

    def missing_name(self, name: str) -> str | None:
        """The name the tensor ``name`` (diffusers naming) would have in this file, which lacks
        it: itself in a diffusers folder; in a single-file format the official name diffusers'
        converter turns into ``name`` (with the file's prefix, as :meth:`named_shapes` names
        tensors), or ``None`` when no known official name converts to it."""
        if self.format == "diffusers":
            return name
        official = official_name(name)
        return None if official is None else self._official()[2] + official

    def origin(self, name: str) -> tuple[Path, str]:
        """``(file, stored name)``: the file that holds the tensor ``name`` (diffusers naming) and
        its name there, for a message about its value. A diffusers folder's tensor is in
        :data:`WEIGHTS` or the shard its index lists; a single-file format's is in that file under
        its official name (a Self-Forcing file's as ``generator_ema.model.<official name>``).
        Only file headers are read (the index, a safetensors header, a memory-mapped torch file)."""
        if self.format == "diffusers":
            single = self.file / WEIGHTS
            if single.is_file():
                return single, name
            shard = _read_index(self.file / WEIGHTS_INDEX).get(name)
            return (self.file / shard if shard is not None else self.file), name
        return self.file, self.named_shapes()[1].get(name, name)

    def _official(self) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
        """A single-file checkpoint's tensors (meta-device) under the official names diffusers'
        converter takes, each one's name as stored in the file, and the prefix a tensor's
        official name has there (``model.diffusion_model.`` in a ComfyUI file,
        ``generator_ema.model.`` in a Self-Forcing file)."""
        if self.format == "wan":
            tensors = _read_safetensors(self.file, meta=True)
            prefix = COMFY_PREFIX if any(key.startswith(COMFY_PREFIX) for key in tensors) else ""
            return tensors, {key: key for key in tensors}, prefix
        entry, state = _self_forcing_entry(self.file)
        stored: dict[str, torch.Tensor] = {}
        labels: dict[str, str] = {}
        for key, tensor in state.items():
            short = key.removeprefix(SELF_FORCING_PREFIX)
            label = f"{entry}.{key}"
            if short in labels:
                raise _same_name(self.file, labels[short], label, short)
            stored[short], labels[short] = torch.empty(tensor.shape, device="meta"), label
        prefixed = any(key.startswith(SELF_FORCING_PREFIX) for key in state)
        return stored, labels, f"{entry}.{SELF_FORCING_PREFIX if prefixed else ''}"

    def check(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """:func:`check_state` of this checkpoint's tensors against ``expected`` (diffusers
        naming), each tensor named as stored in the file (:meth:`named_shapes`, :meth:`missing_name`)."""
        shapes, stored = self.named_shapes()
        check_state(expected, shapes, self.file, stored=stored, missing=self.missing_name)


def _same_name(file: Path, first: str, second: str, name: str) -> CheckpointError:
    """Two tensors of ``file`` that would load as one, ``name``: refused rather than one guessed."""
    problem = f"tensors {first!r} and {second!r} both load as {name!r}: which one is used would be arbitrary"
    return CheckpointError(file, problem)


def locate(path: str | Path, fmt: str = "auto") -> Checkpoint:
    """The checkpoint at ``path`` in format ``fmt`` (``auto``: decided by what is on disk)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(path, "no such file or directory")
    if root.is_dir():
        if fmt not in ("auto", "diffusers"):
            raise CheckpointError(path, f"format {fmt} expects a file, got a directory")
        folder = root / TRANSFORMER_SUBFOLDER if (root / TRANSFORMER_SUBFOLDER / "config.json").is_file() else root
        if not (folder / "config.json").is_file():
            raise CheckpointError(path, f"not a diffusers folder: no config.json here or in {TRANSFORMER_SUBFOLDER}/")
        if not ((folder / WEIGHTS).is_file() or (folder / WEIGHTS_INDEX).is_file()):
            variants = sorted(p.name for p in folder.glob("diffusion_pytorch_model.*.safetensors*"))
            hint = (
                f" (it holds a variant, {variants[0]}: name or link it {WEIGHTS}, or its index {WEIGHTS_INDEX})"
                if variants
                else ""
            )
            raise CheckpointError(folder, f"no {WEIGHTS} (or its .index.json) next to config.json{hint}")
        return Checkpoint("diffusers", folder, folder / "config.json")
    if fmt == "diffusers":
        raise CheckpointError(path, "format diffusers expects a folder, got a file")
    if fmt == "auto":
        fmt = _sniff(root)
    beside = root.parent / "config.json"
    return Checkpoint(fmt, root, beside if beside.is_file() else None)


def _sniff(file: Path) -> str:
    with open(file, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or file.suffix in TORCH_SUFFIXES:
        return "self_forcing"
    if len(head) == 8 and int.from_bytes(head, "little") < 100_000_000 and file.suffix == ".safetensors":
        return "wan"
    raise CheckpointError(
        file, "not a diffusers folder, an official Wan .safetensors file or a Self-Forcing torch file"
    )


def _read_config(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(file, f"unreadable config: {' '.join(str(exc).split())}") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(file, "config.json is not a JSON object")
    if "dim" in data or "num_heads" in data:  # official naming (its _class_name is WanModel)
        kind = data.get("model_type", "t2v")
        if kind != "t2v":
            raise CheckpointError(file, f"model_type {kind}: only text-to-video Wan (t2v) is supported")
        out: dict[str, Any] = {}
        for key, target in OFFICIAL_CONFIG.items():
            if target is not None and key in data:
                out[target] = data[key]
        if "num_heads" not in data or "dim" not in data:
            raise CheckpointError(file, "official config needs both dim and num_heads")
        out["attention_head_dim"] = int(data["dim"]) // int(data["num_heads"])
        data = out
    elif data.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS:
        raise CheckpointError(file, f"the config of {data['_class_name']}, not of Wan's {TRANSFORMER_CLASS}")
    if data.get("image_dim") is not None or data.get("added_kv_proj_dim") is not None:
        raise CheckpointError(file, "image-conditioned Wan (I2V) is not supported; use a text-to-video checkpoint")
    with diffusers_quietly():
        from diffusers import WanTransformer3DModel

    allowed = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    return {k: v for k, v in data.items() if k in allowed}


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    file: Path,
    *,
    stored: Mapping[str, str] | None = None,
    missing: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """A diffusers config from tensor shapes (diffusers naming), assuming Wan2.1's head dim 128.
    A tensor it needs is named as :func:`check_state` names it (``stored``, ``missing``)."""

    def shape(name: str, dims: int) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(file, f"{_missing(name, missing)} (needed to infer the architecture)")
        if len(shapes[name]) != dims or not all(shapes[name]):
            label = _stored_name(name, stored)
            raise CheckpointError(file, f"tensor {label!r} has shape {list(shapes[name])}, expected {dims} sizes >= 1")
        return shapes[name]

    dim, in_channels, *patch = shape("patch_embedding.weight", 5)
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if re.match(r"blocks\.\d+\.", k)), default=-1)
    if dim % WAN21_HEAD_DIM:
        raise CheckpointError(file, f"hidden size {dim} is not a multiple of 128: put a config.json next to the file")
    return {
        "patch_size": list(patch),
        "num_attention_heads": dim // WAN21_HEAD_DIM,
        "attention_head_dim": WAN21_HEAD_DIM,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight", 2)[0] // (patch[0] * patch[1] * patch[2]),
        "text_dim": shape("condition_embedder.text_embedder.linear_1.weight", 2)[1],
        "freq_dim": shape("condition_embedder.time_embedder.linear_1.weight", 2)[1],
        "ffn_dim": shape("blocks.0.ffn.net.0.proj.weight", 2)[0],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm2.weight" in shapes,
    }


def _read_safetensors(file: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not meta:
            return load_file(str(file))
        with safe_open(str(file), framework="pt") as handle:
            return {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(file, f"not a readable safetensors file: {' '.join(str(exc).split())}") from None


def _read_diffusers(folder: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    single = folder / WEIGHTS
    if single.is_file():
        return _read_safetensors(single, meta)
    index_file = folder / WEIGHTS_INDEX
    weight_map = _read_index(index_file)
    state: dict[str, torch.Tensor] = {}
    found_in: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise CheckpointError(index_file, f"shard {shard} is listed but not in {folder}")
        tensors = _read_safetensors(folder / shard, meta)
        for name in tensors:
            if name in found_in:  # which copy wins would be arbitrary: refuse rather than guess
                raise CheckpointError(folder / shard, f"tensor {name!r} is also in shard {found_in[name]}")
            found_in[name] = shard
        state.update(tensors)
    for name, shard in weight_map.items():
        if found_in.get(name) != shard:
            where = f"it is in {found_in[name]}" if name in found_in else "no shard holds it"
            raise CheckpointError(index_file, f"lists tensor {name!r} in shard {shard}, but {where}")
    return state


def _read_index(index_file: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file) of a sharded checkpoint's index."""
    try:
        data = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(index_file, f"unreadable shard index: {' '.join(str(exc).split())}") from None
    weight_map = data.get("weight_map") if isinstance(data, Mapping) else None
    if (
        not isinstance(weight_map, Mapping)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items())
    ):
        raise CheckpointError(index_file, 'not a shard index: expected {"weight_map": {tensor name: shard file}}')
    return dict(weight_map)


def _self_forcing_entry(file: Path) -> tuple[str, Mapping[str, torch.Tensor]]:
    """``(key, state dict)`` of a Self-Forcing file: its ``generator_ema`` (else ``generator``),
    every value checked to be a tensor (memory-mapped where torch can)."""
    try:
        data = torch_load(file)
    except Exception as exc:  # pickle errors, refused globals, truncated files
        raise CheckpointError(
            file, f"not a readable torch checkpoint (weights only): {' '.join(str(exc).split())}"
        ) from None
    if not isinstance(data, Mapping):
        raise CheckpointError(file, f"expected a dict holding {' or '.join(SELF_FORCING_KEYS)}")
    for key in SELF_FORCING_KEYS:
        if key in data:
            state = data[key]
            break
    else:
        found = [str(k) for k in data]
        listed = ", ".join(found[:5]) + (f", ... ({len(found)} entries)" if len(found) > 5 else "")
        raise CheckpointError(file, f"no {' or '.join(SELF_FORCING_KEYS)} entry (found: {listed or 'nothing'})")
    if not isinstance(state, Mapping):
        raise CheckpointError(file, f"{key} is not a state dict")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(file, f"{key}.{name} is not a tensor")
    return key, state


def _read_self_forcing(file: Path, *, meta: bool) -> dict[str, torch.Tensor]:
    _, state = _self_forcing_entry(file)
    return {
        name.removeprefix(SELF_FORCING_PREFIX): torch.empty(tensor.shape, device="meta") if meta else tensor
        for name, tensor in state.items()
    }


_TO_OFFICIAL = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm([23])\.", lambda m: f"{m[1]}.norm{5 - int(m[2])}."),
)
"""diffusers' names of a text-to-video Wan2.1 → the official ones (the inverse of diffusers'
converter, which :func:`official_name` asks to confirm each)."""


def official_name(name: str) -> str | None:
    """The official Wan name that diffusers' converter turns into ``name`` (diffusers naming),
    ``None`` when none is known (the converter is asked: a guess it would not convert back is
    not given)."""
    official = name
    for pattern, repl in _TO_OFFICIAL:
        official = re.sub(pattern, repl, official)
    converted = to_diffusers_names({official: torch.empty(0, device="meta")}, Path(), check=False)
    return official if list(converted) == [name] else None


def to_diffusers_names(state: Mapping[str, torch.Tensor], file: Path, *, check: bool = True) -> dict[str, torch.Tensor]:
    """Official Wan tensor names → diffusers', with diffusers' own converter (``check``: refusing
    a ``state`` with no official block tensor, not a Wan checkpoint)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if check and not any(k.startswith("blocks.") or k.startswith(f"{COMFY_PREFIX}blocks.") for k in state):
        raise CheckpointError(file, "no official Wan tensors (blocks.N.self_attn...) found")
    return convert_wan_transformer_to_diffusers(dict(state))


def _missing(name: str, missing: Callable[[str], str | None] | None) -> str:
    """``"missing tensor NAME"``, NAME as the file would store it (``missing``), else said to be
    diffusers' name."""
    label = name if missing is None else missing(name)
    if label is None:
        return f"missing tensor {name!r} (diffusers' name: no official Wan name is known to convert to it)"
    return f"missing tensor {label!r}"


def _stored_name(name: str, stored: Mapping[str, str] | None) -> str:
    """The found tensor ``name`` (diffusers naming) as its file stores it (``stored``), else ``name``."""
    return name if stored is None else stored.get(name, name)


def check_state(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    file: str | Path,
    *,
    stored: Mapping[str, str] | None = None,
    missing: Callable[[str], str | None] | None = None,
) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped tensor.
    ``expected`` and ``found`` are in diffusers naming; a found tensor is named as ``stored`` (its
    name in the file, default its name in ``found``), a missing one as ``missing(name)`` names it
    (the name the file would give it; ``None``: unknown, said to be diffusers' name)."""
    for name, shape in expected.items():
        if name not in found:
            more = sum(1 for n in expected if n not in found) - 1
            extra = f" (and {more} more)" if more else ""
            raise CheckpointError(file, f"{_missing(name, missing)}{extra}")
        if tuple(found[name]) != tuple(shape):
            label = _stored_name(name, stored)
            raise CheckpointError(file, f"tensor {label!r} has shape {list(found[name])}, expected {list(shape)}")
    for name in found:
        if name not in expected:
            raise CheckpointError(file, f"unexpected tensor {_stored_name(name, stored)!r}")
