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


def test_a_config_of_another_model_is_named_as_such(tmp_path):
    from tests.wan_fixtures import OFFICIAL_CONFIG, write_diffusers, write_wan

    model = tiny_transformer()
    official = write_wan(model, tmp_path / "i2v")
    (official.parent / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "model_type": "i2v", "in_dim": 36}))
    text = refused(official, plan_only=True)
    assert f"{official.parent / 'config.json'}: model_type i2v: only text-to-video Wan (t2v) is supported" in text

    folder = write_diffusers(model, tmp_path / "vace")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "WanVACETransformer3DModel"}))
    text = refused(folder, plan_only=True)
    assert "config.json: the config of WanVACETransformer3DModel, not of Wan's WanTransformer3DModel" in text


def self_forcing_file(tmp_path: Path, data, **save) -> Path:
    from tests.wan_fixtures import OFFICIAL_CONFIG

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    torch.save(data, str(tmp_path / "ckpt.pt"), **save)
    return tmp_path / "ckpt.pt"


def test_a_self_forcing_file_in_torch_legacy_format_loads_the_same_weights(tmp_path):
    from tests.wan_fixtures import official_state

    model = tiny_transformer()
    state = {f"model.{k}": v for k, v in official_state(model).items()}
    file = self_forcing_file(tmp_path, {"generator_ema": state}, _use_new_zipfile_serialization=False)
    loaded = load(file).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_bare_state_dict_is_refused_listing_a_few_of_its_entries(tmp_path):
    from tests.wan_fixtures import official_state

    state = {f"model.{k}": v for k, v in official_state(tiny_transformer()).items()}
    file = self_forcing_file(tmp_path, state)
    text = refused(file, plan_only=True)
    assert "no generator_ema or generator entry (found: model." in text
    assert text.endswith(f", ... ({len(state)} entries))") and len(text) < 400, text


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (torch.zeros(0, 32), "prompt_embeds has shape [0, 32], expected [L, 32]"),
        (torch.ones(8, 32, dtype=torch.int64), "prompt_embeds is torch.int64, not text-encoder states (floats)"),
        (None, "a directory, not a file"),
    ],
    ids=["no-tokens", "integers", "directory"],
)
def test_prompt_embeds_that_are_not_text_encoder_states_are_refused(tmp_path, tensor, problem):
    from safetensors.torch import save_file

    from packforcing.core.errors import ParamError
    from packforcing.models.wan.adapter import read_prompt_embeds

    file = tmp_path / "embeds.safetensors"
    if tensor is None:
        file.mkdir()
    else:
        save_file({"prompt_embeds": tensor}, str(file))
    with pytest.raises(ParamError) as info:
        read_prompt_embeds(file, 32)
    assert str(info.value) == f"embeds: {file}: {problem}"


# ---------------------------------------------------------------------- tensors named as stored
SINGLE_FILE_PREFIX = {
    "wan": "",
    "comfy": "model.diffusion_model.",
    "self_forcing": "generator_ema.model.",
    "self_forcing_generator": "generator.model.",
}
"""What a single-file format puts before a tensor's official name: the names a user finds in
the file (a Self-Forcing file's under its ``generator_ema``, else its ``generator``, entry)."""


def write_official(state: dict[str, torch.Tensor], folder: Path, fmt: str, *, config: bool = True) -> Path:
    """``state`` (official names) written as ``fmt`` of :data:`SINGLE_FILE_PREFIX` (a Self-Forcing
    file's ``generator`` a decoy unless it is the one entry), with the official config beside it."""
    from safetensors.torch import save_file

    from tests.wan_fixtures import OFFICIAL_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    if fmt in ("wan", "comfy"):
        file = folder / "wan2.1_t2v.safetensors"
        save_file({f"{SINGLE_FILE_PREFIX[fmt]}{k}": v.contiguous() for k, v in state.items()}, str(file))
        return file
    file = folder / "self_forcing_dmd.pt"
    prefixed = {f"model.{k}": v for k, v in state.items()}
    if fmt == "self_forcing":
        torch.save({"generator_ema": prefixed, "generator": {k: v + 1.0 for k, v in prefixed.items()}}, str(file))
    else:
        torch.save({"generator": prefixed, "critic": {}}, str(file))
    return file


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    from tests.wan_fixtures import official_state

    return official_state(tiny_transformer())


@pytest.mark.parametrize("fmt", list(SINGLE_FILE_PREFIX))
@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", "missing tensor '{}blocks.1.ffn.2.bias'"),
        ("unexpected", "unexpected tensor '{}blocks.0.self_attn.lora.weight'"),
        ("shape", "tensor '{}head.head.weight' has shape [3, 64], expected [16, 64]"),
        ("norm", "tensor '{}blocks.1.norm3.weight' has shape [5], expected [64]"),  # diffusers' norm2
    ],
)
def test_a_single_file_checkpoint_s_bad_tensor_is_named_as_the_file_stores_it(
    official, tmp_path, fmt, problem, message
):
    """Not by its diffusers name (``blocks.1.ffn.net.2.bias``, ``proj_out.weight``), which the
    file does not hold: a missing tensor by the official name it would have there."""
    state = dict(official)
    if problem == "missing":
        del state["blocks.1.ffn.2.bias"]
    elif problem == "unexpected":
        state["blocks.0.self_attn.lora.weight"] = torch.zeros(2)  # diffusers: attn1.lora
    elif problem == "shape":
        state["head.head.weight"] = torch.zeros(3, 64)
    else:
        state["blocks.1.norm3.weight"] = torch.zeros(5)
    file = write_official(state, tmp_path / fmt, fmt)
    for plan_only in (True, False):
        text = refused(file, plan_only=plan_only)
        assert text == f"path: {file}: {message.format(SINGLE_FILE_PREFIX[fmt])}"


@pytest.fixture(scope="module")
def head_dim_128():
    """A tiny model whose architecture its shapes tell (Wan2.1's head dim 128, one head)."""
    from diffusers import WanTransformer3DModel

    from tests.wan_fixtures import CONFIG

    model = WanTransformer3DModel(**{**CONFIG, "num_attention_heads": 1, "attention_head_dim": 128})
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("fmt", list(SINGLE_FILE_PREFIX))
def test_a_tensor_needed_to_infer_the_architecture_is_named_as_the_file_stores_it(head_dim_128, tmp_path, fmt):
    """Without a config.json the shapes tell the architecture (and the model loads from them);
    the tensors read for it are named as stored too, and one of the wrong rank is one line, not
    an IndexError."""
    from tests.wan_fixtures import official_state

    prefix = SINGLE_FILE_PREFIX[fmt]
    state = official_state(head_dim_128)
    loaded = load(write_official(state, tmp_path / "whole", fmt, config=False)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in head_dim_128.state_dict().items())
    file = write_official(
        {k: v for k, v in state.items() if k != "head.head.weight"}, tmp_path / fmt, fmt, config=False
    )
    assert refused(file, plan_only=True) == (
        f"path: {file}: missing tensor '{prefix}head.head.weight' (needed to infer the architecture)"
    )
    flat = write_official({**state, "text_embedding.0.weight": torch.zeros(7)}, tmp_path / "flat", fmt, config=False)
    assert refused(flat, plan_only=True) == (
        f"path: {flat}: tensor '{prefix}text_embedding.0.weight' has shape [7], expected 2 sizes >= 1"
    )


def test_a_missing_tensor_is_named_by_its_official_name_only_when_the_converter_confirms_it():
    """The official name of a missing tensor is diffusers' converter's inverse, checked by it: a
    name with no known official one is said to be diffusers'."""
    from packforcing.models.wan.checkpoints import check_state, official_name
    from tests.wan_fixtures import official_state

    model = tiny_transformer()
    assert [official_name(name) for name in model.state_dict()] == list(official_state(model))
    with pytest.raises(CheckpointError) as info:
        check_state({"x.weight": (2,), "y.weight": (2,)}, {}, "f.safetensors", missing=lambda name: None)
    assert str(info.value) == (
        "path: f.safetensors: missing tensor 'x.weight' (diffusers' name: no official Wan name is known to convert "
        "to it) (and 1 more)"
    )


@pytest.mark.parametrize("fmt", ["comfy", "self_forcing"])
def test_two_stored_tensors_that_would_load_as_one_are_refused(official, tmp_path, fmt):
    """A prefixed and an unprefixed copy of one tensor: diffusers' converter (or the Self-Forcing
    prefix) would keep one of them silently; refused naming both, as a tensor in two shards is."""
    from safetensors.torch import save_file

    name = "blocks.0.self_attn.q.weight"
    if fmt == "comfy":
        file = write_official(official, tmp_path, "comfy")
        save_file(
            {**{f"model.diffusion_model.{k}": v for k, v in official.items()}, name: official[name] + 1}, str(file)
        )
        expected = f"tensors 'model.diffusion_model.{name}' and '{name}' both load as 'blocks.0.attn1.to_q.weight'"
    else:
        file = write_official(official, tmp_path, "self_forcing")
        torch.save(
            {"generator_ema": {**{f"model.{k}": v for k, v in official.items()}, name: official[name] + 1}}, str(file)
        )
        expected = f"tensors 'generator_ema.model.{name}' and 'generator_ema.{name}' both load as '{name}'"
    text = refused(file, plan_only=True)
    assert text == f"path: {file}: {expected}: which one is used would be arbitrary"
