"""Wan checkpoints on disk that are broken in one way each: every one is refused in one line
naming the file, before any weight is loaded, and never loaded wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from packforcing.models.wan.checkpoints import CheckpointError
from tests.wan_fixtures import tiny_transformer

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def load(path: Path, *, plan_only: bool = False, dtype: torch.dtype = torch.float32):
    from packforcing.models.wan.adapter import build_transformer
    from packforcing.models.wan.params import WanParams

    transformer, _ = build_transformer(
        WanParams(path=str(path)), dtype=dtype, device=torch.device("cpu"), plan_only=plan_only
    )
    return transformer


def refused(path: Path, *, plan_only: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path, plan_only=plan_only)
    text = str(info.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wan") / "sharded"
    tiny_transformer().save_pretrained(str(folder), max_shard_size="60KB")
    return folder


def copy_with_index(sharded: Path, tmp: Path, edit) -> Path:
    folder = tmp / "copy"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / INDEX).read_text())
    (folder / INDEX).write_text(json.dumps(edit(index)))
    return folder


def test_a_tensor_in_two_shards_is_refused_not_taken_from_either(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "dup"
    shutil.copytree(sharded, folder)
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    first, second = sorted(set(weight_map.values()))[:2]
    name = next(k for k, v in weight_map.items() if v == first)
    tensors = load_file(str(folder / second))
    tensors[name] = load_file(str(folder / first))[name] + 1.0  # a stale copy, different values
    save_file(tensors, str(folder / second))
    text = refused(folder, plan_only=True)
    assert f"{folder / second}: tensor {name!r} is also in shard {first}" in text


def test_an_index_naming_the_wrong_shard_or_a_missing_shard_is_refused(sharded, tmp_path):
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    first = next(s for s in shards if list(weight_map.values()).count(s) > 1)  # still listed after the move
    second = next(s for s in shards if s != first)
    name = next(k for k, v in weight_map.items() if v == first)

    def move(index):
        index["weight_map"][name] = second
        return index

    text = refused(copy_with_index(sharded, tmp_path / "wrong", move), plan_only=True)
    assert f"{INDEX}: lists tensor {name!r} in shard {second}, but it is in {first}" in text

    folder = tmp_path / "missing"
    shutil.copytree(sharded, folder)
    (folder / second).unlink()
    assert f"{folder / INDEX}: shard {second} is listed but not in {folder}" in refused(folder, plan_only=True)


@pytest.mark.parametrize(
    "index",
    [{"weight_map": ["a", "b"]}, {"weight_map": {"a": 3}}, {"weight_map": {}}, ["weight_map"], {"metadata": {}}],
    ids=["list", "not-a-file-name", "empty", "not-a-mapping", "no-weight-map"],
)
def test_a_malformed_shard_index_is_one_line(sharded, tmp_path, index):
    folder = copy_with_index(sharded, tmp_path, lambda _: index)
    assert f"{folder / INDEX}: not a shard index" in refused(folder, plan_only=True)
