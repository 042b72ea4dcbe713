"""core.weightfiles.read_header: a safetensors header safetensors itself would refuse is refused
in one line naming the file, never with a TypeError, and never accepted."""

from __future__ import annotations

import json
import struct

import pytest

from packforcing.core.errors import ParamError
from packforcing.core.weightfiles import read_header

ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write(path, header, data=b"\0" * 8):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"a": {**ENTRY, "data_offsets": ["0", "8"]}}, "corrupt header entry for tensor 'a'"),
        ({"a": {**ENTRY, "data_offsets": [0.0, 8.0]}}, "corrupt header entry for tensor 'a'"),
        ({"a": {**ENTRY, "dtype": ["F32"]}}, "corrupt header entry for tensor 'a'"),
        ({"a": {**ENTRY, "shape": "2"}}, "corrupt header entry for tensor 'a'"),
        ({"a": {**ENTRY, "shape": [True, 2]}}, "corrupt header entry for tensor 'a'"),
        ({"a": ENTRY, "b": ENTRY}, "corrupt: tensor 'b' starts at byte 0, expected 8"),
        ({"__metadata__": {"x": [1]}, "a": ENTRY}, "corrupt header: __metadata__ is not a mapping of strings"),
    ],
    ids=["str-offsets", "float-offsets", "list-dtype", "str-shape", "bool-dim", "overlap", "metadata"],
)
def test_a_header_safetensors_refuses_is_refused_in_one_line(tmp_path, header, problem):
    from safetensors.torch import load_file

    path = write(tmp_path / "w.safetensors", header)
    with pytest.raises(Exception):  # noqa: B017 - the oracle: safetensors' own reader refuses it too
        load_file(str(path))
    with pytest.raises(ParamError) as info:
        read_header(path)
    assert str(info.value).endswith(f"{path.name}: {problem}") and "\n" not in str(info.value), info.value


def test_a_valid_header_with_empty_tensors_is_read(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(0), "b": torch.ones(2, 3), "c": torch.zeros(0, 4)}, str(path), metadata={"k": "v"})
    tensors, meta = read_header(path)
    assert tensors == {"a": ("F32", (0,)), "b": ("F32", (2, 3)), "c": ("F32", (0, 4))} and meta == {"k": "v"}
