"""Tensors read from files and cast to the run's narrower dtype: a value the dtype cannot hold
(float32 or bfloat16 weights beyond float16's ±65504) is refused in one line naming the file and
the first such tensor, with its largest magnitude and the dtype's limit, never turned into ±Inf
(and a NaN video). Every load path is checked on tiny files in the real formats: the Wan
transformer (three formats), its VAE and UMT5 text encoder, prompt embeddings, tiny_dit and
dual_branch weights, train-model's ``--init`` and a resumed run's checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import packforcing as pf
from packforcing.cli import main
from packforcing.core import finite
from packforcing.core.finite import cast_problem
from packforcing.core.yamlfile import file_label

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BIG = 7.1e4
"""Beyond float16's ±65504, well inside bfloat16's and float32's range."""
F16 = "beyond float16's ±65504; run in bfloat16 or float32"
SHIPPED = Path(pf.__file__).parent / "weights"


def spoil(file: Path, name: str, value: float = BIG) -> Path:
    """Rewrite the safetensors ``file`` with one element of tensor ``name`` set to ``value`` (the
    other tensors, dtypes and metadata as they were)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    tensor = tensors[name].clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    tensors[name] = tensor
    save_file(tensors, str(file), metadata=metadata)
    return file


# ---------------------------------------------------------------------- the check itself
def test_a_value_is_refused_exactly_when_the_cast_makes_it_infinite():
    tensors = {"fits": torch.ones(3), "big": torch.tensor([1.0, -BIG, 2.0]), "after": torch.tensor([1e6])}
    assert cast_problem(tensors.items(), torch.float16) == f"big holds 7.1e+04, {F16}"
    assert cast_problem(tensors.items(), torch.bfloat16) is None
    assert cast_problem(tensors.items(), torch.float32) is None
    # float16 rounds up to 65504 below 65520: only what the cast really makes infinite is refused
    assert cast_problem([("x", torch.tensor([65519.0]))], torch.float16) is None
    assert cast_problem([("x", torch.tensor([65520.0]))], torch.float16) == f"x holds 6.6e+04, {F16}"
    assert cast_problem([("x", torch.tensor([BIG]).bfloat16())], torch.float16) == f"x holds 7.1e+04, {F16}"
    # bfloat16's largest value is a little below float32's: a float32 file can overflow it too
    assert cast_problem([("x", torch.tensor([3.4e38]))], torch.bfloat16) == (
        "x holds 3.4e+38, beyond bfloat16's ±3.38953e+38; run in float32 or float64"
    )
    assert cast_problem([("x", torch.tensor([1e300], dtype=torch.float64))], torch.float32) == (
        "x holds 1e+300, beyond float32's ±3.40282e+38; run in float64"
    )
    assert (
        cast_problem([("x", torch.tensor([BIG]))], torch.float16, suggest=False)
        == "x holds 7.1e+04, beyond float16's ±65504"
    )
    # per-name dtypes (a module kept in float32); names without one keep their own dtype
    assert cast_problem(tensors.items(), {"big": torch.float32, "fits": torch.float16}) is None
    assert cast_problem([("x", torch.arange(3))], torch.float16) is None  # integers are not cast


def test_the_problem_found_names_its_tensor_for_the_caller_to_rename():
    """:func:`finite.find_cast_problem` tells which tensor it is (the caller finds its file and its
    name there); its line is :func:`cast_problem`'s, under either name."""
    tensors = [("a", torch.ones(2)), ("blocks.0.w", torch.tensor([BIG])), ("nan", torch.tensor([float("nan")]))]
    found = finite.find_cast_problem(tensors, torch.float16)
    assert found == finite.CastProblem("blocks.0.w", f"holds 7.1e+04, {F16}")
    assert found.line() == cast_problem(tensors, torch.float16) == f"blocks.0.w holds 7.1e+04, {F16}"
    assert found.line("model.blocks.0.weight") == f"model.blocks.0.weight holds 7.1e+04, {F16}"
    assert finite.find_cast_problem(tensors[2:], torch.float16, finite=True) == ("nan", "holds NaN or Inf")
    assert finite.find_cast_problem(tensors[:1], torch.float16) is None


def test_nan_or_inf_in_the_file_is_not_the_cast_s_doing_unless_asked():
    nan = [("a", torch.tensor([float("nan")])), ("b", torch.tensor([-BIG]))]
    assert cast_problem(nan, torch.float16) == f"b holds 7.1e+04, {F16}"
    assert cast_problem(nan, torch.float16, finite=True) == "a holds NaN or Inf"
    assert cast_problem([("a", torch.tensor([float("-inf")]))], torch.float32, finite=True) == "a holds NaN or Inf"
    assert cast_problem([("e", torch.zeros(0, 4))], torch.float16, finite=True) is None


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_float8_tensors_are_read_too(dtype):
    """torch has no float8 ``aminmax``: a float8 tensor that must be read (``finite``, or a cast to
    a float8 dtype) is read in float32, not a NotImplementedError."""
    values = torch.tensor([1.0, -3.0, 0.5]).to(dtype)
    assert cast_problem([("x", values)], torch.bfloat16, finite=True) is None
    assert finite.largest_magnitude(values).item() == 3.0
    nan = torch.tensor([1.0, float("nan")]).to(dtype)
    assert cast_problem([("x", nan)], torch.float16, finite=True) == "x holds NaN or Inf"


def test_float8_prompt_embeds_load_as_before(tmp_path):
    """A float8_e5m2 ``prompt_embeds`` file loaded before the cast check (``isfinite`` takes it)
    and still does; its NaN is still refused."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from packforcing.core.errors import ParamError
    from packforcing.models.wan.adapter import read_prompt_embeds

    file = tmp_path / "e8.safetensors"
    save_file({"prompt_embeds": torch.randn(7, 16).to(torch.float8_e5m2)}, str(file))
    assert read_prompt_embeds(file, 16, torch.bfloat16).dtype == torch.float8_e5m2
    save_file({"prompt_embeds": torch.full((7, 16), float("nan")).to(torch.float8_e5m2)}, str(file))
    with pytest.raises(ParamError, match=r"prompt_embeds holds NaN or Inf$"):
        read_prompt_embeds(file, 16, torch.bfloat16)


def test_a_load_as_wide_as_the_file_reads_no_tensor(monkeypatch):
    def read(x):
        raise AssertionError("read a tensor whose cast cannot overflow")

    monkeypatch.setattr(finite, "largest_magnitude", read)
    tensors = [("a", torch.full((4,), 1e30)), ("b", torch.ones(2, dtype=torch.bfloat16)), ("c", torch.ones(2).half())]
    assert cast_problem(tensors, torch.float32) is None
    assert cast_problem(tensors, {"a": torch.float64, "b": torch.bfloat16, "c": torch.float32}) is None


# ---------------------------------------------------------------------- Wan transformer
def build_transformer(path: Path, dtype: torch.dtype):
    from packforcing.models.wan.adapter import build_transformer
    from packforcing.models.wan.params import WanParams

    return build_transformer(WanParams(path=str(path)), dtype=dtype, device=torch.device("cpu"))[0]


WAN_NAME = "blocks.1.ffn.net.0.proj.weight"
"""The tensor spoiled in the Wan checkpoints, by diffusers' name; officially ``blocks.1.ffn.0.weight``."""
WAN_STORED = {
    "diffusers": WAN_NAME,
    "sharded": WAN_NAME,
    "wan": "blocks.1.ffn.0.weight",
    "self_forcing": "generator_ema.model.blocks.1.ffn.0.weight",
}
"""Its name in the file of each format (a Self-Forcing file's under ``generator_ema``)."""


def write_checkpoint(model, folder: Path, fmt: str) -> tuple[Path, Path]:
    """``(path to configure, file holding tensor WAN_NAME)`` of ``model`` written in ``fmt``
    (``sharded``: a diffusers folder of several ``.safetensors`` shards and their index)."""
    from packforcing.models.wan.checkpoints import WEIGHTS, WEIGHTS_INDEX
    from tests.wan_fixtures import write_diffusers, write_self_forcing, write_wan

    if fmt == "diffusers":
        return write_diffusers(model, folder), folder / WEIGHTS
    if fmt == "sharded":
        model.save_pretrained(str(folder), max_shard_size="60KB")
        shard = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"][WAN_NAME]
        assert len(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values())) > 2
        return folder, folder / shard
    file = write_wan(model, folder) if fmt == "wan" else write_self_forcing(model, folder)
    return file, file


@pytest.mark.parametrize("fmt", ["diffusers", "sharded", "wan", "self_forcing"])
def test_a_wan_checkpoint_value_beyond_float16_is_refused_naming_the_file_and_tensor(tmp_path, fmt):
    """The file is the one holding the tensor (a folder's weights file, or its shard), and the
    tensor is named as it is stored there (a single-file format's official name)."""
    pytest.importorskip("diffusers")
    from packforcing.models.wan.checkpoints import CheckpointError
    from tests.wan_fixtures import tiny_transformer

    model = tiny_transformer()
    with torch.no_grad():
        model.blocks[1].ffn.net[0].proj.weight[3, 5] = -BIG
    path, named = write_checkpoint(model, tmp_path / fmt, fmt)
    with pytest.raises(CheckpointError) as info:
        build_transformer(path, torch.float16)
    assert str(info.value) == f"path: {named}: {WAN_STORED[fmt]} holds 7.1e+04, {F16}"
    assert info.value.file == str(named)
    loaded = build_transformer(path, torch.bfloat16)  # bfloat16 holds it
    weight = loaded.blocks[1].ffn.net[0].proj.weight
    assert weight.dtype == torch.bfloat16 and bool(torch.isfinite(weight).all())


def test_a_sharded_wan_checkpoint_beyond_float16_is_one_config_error_line_naming_the_shard(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tests.wan_fixtures import tiny_transformer

    model = tiny_transformer()
    with torch.no_grad():
        model.blocks[1].ffn.net[0].proj.weight[0, 0] = BIG
    folder, shard = write_checkpoint(model, tmp_path / "sharded", "sharded")
    config = tmp_path / "wan.yaml"
    config.write_text(
        f"model: {{name: wan, path: '{folder}', frames_per_block: 2, latent_height: 4, latent_width: 6}}\n"
        "policy: full\nbackend: sdpa\nsampler: {name: self_forcing}\nrun: {device: cpu, dtype: float16}\n"
    )
    out = tmp_path / "out"
    assert main(["generate", "--config", str(config), "--blocks", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {file_label(config)}: model.path: {shard}: {WAN_NAME} holds 7.1e+04, {F16}\n"
    assert not out.exists()


def test_a_wan_refusal_names_the_stored_tensor_under_the_comfy_prefix_too(tmp_path):
    """An official file whose names carry ``model.diffusion_model.`` (as ComfyUI saves them) is
    named with that prefix: the name a user finds in the file."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from packforcing.models.wan.checkpoints import CheckpointError
    from tests.wan_fixtures import OFFICIAL_CONFIG, official_state, tiny_transformer

    model = tiny_transformer()
    with torch.no_grad():
        model.blocks[0].attn1.to_k.weight[0, 1] = BIG
    tmp_path.mkdir(exist_ok=True)
    file = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in official_state(model).items()}, str(file))
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    with pytest.raises(CheckpointError) as info:
        build_transformer(file, torch.float16)
    assert str(info.value) == f"path: {file}: model.diffusion_model.blocks.0.self_attn.k.weight holds 7.1e+04, {F16}"


def test_a_wan_module_diffusers_keeps_in_float32_may_hold_any_float32_value(tmp_path):
    pytest.importorskip("diffusers")
    from tests.wan_fixtures import tiny_transformer, write_diffusers

    model = tiny_transformer()
    with torch.no_grad():
        model.condition_embedder.time_embedder.linear_1.weight[0, 0] = BIG
    loaded = build_transformer(write_diffusers(model, tmp_path / "d"), torch.float16)
    kept = loaded.condition_embedder.time_embedder.linear_1.weight
    assert kept.dtype == torch.float32 and kept[0, 0].item() == BIG
    assert loaded.blocks[0].attn1.to_q.weight.dtype == torch.float16


def test_prompt_embeds_beyond_the_model_dtype_are_refused(tmp_path):
    pytest.importorskip("diffusers")
    from packforcing.core.errors import ParamError
    from packforcing.models.wan.adapter import WanBlockModel, read_prompt_embeds
    from packforcing.models.wan.params import WanParams
    from tests.wan_fixtures import TEXT_DIM, tiny_transformer, write_diffusers, write_embeds

    file = spoil(write_embeds(tmp_path / "e.safetensors"), "prompt_embeds")
    assert read_prompt_embeds(file, TEXT_DIM).shape == (7, TEXT_DIM)  # in the file's own dtype: it fits
    assert read_prompt_embeds(file, TEXT_DIM, torch.bfloat16).shape == (7, TEXT_DIM)
    with pytest.raises(ParamError) as info:
        read_prompt_embeds(file, TEXT_DIM, torch.float16)
    assert str(info.value) == f"embeds: {file}: prompt_embeds holds 7.1e+04, {F16}"
    # NaN or Inf in the file is refused whatever the dtype, as before
    nan = spoil(write_embeds(tmp_path / "nan.safetensors"), "prompt_embeds", float("nan"))
    with pytest.raises(ParamError, match=r"prompt_embeds holds NaN or Inf$"):
        read_prompt_embeds(nan, TEXT_DIM)
    # the model passes its own dtype
    params = WanParams(path=str(write_diffusers(tiny_transformer(), tmp_path / "d")), latent_height=4, latent_width=4)
    wan = WanBlockModel(build_transformer(Path(params.path), torch.float16), params, torch.float16)
    with pytest.raises(ParamError, match=f"^embeds: {file}: prompt_embeds holds 7.1e"):
        wan.encode_condition({"embeds": str(file)})


# ---------------------------------------------------------------------- Wan VAE and text encoder
@pytest.mark.parametrize("layout", ["one-file", "sharded", "bin"])
def test_a_vae_weight_beyond_float16_is_refused_naming_the_file(tmp_path, layout):
    """The file holding it: the weights file, the shard its index lists, or the torch ``.bin``
    file diffusers reads when there is no safetensors file (which was not checked at all)."""
    pytest.importorskip("diffusers")
    from packforcing.models.wan.vae import VAE_TORCH_WEIGHTS, VAE_WEIGHTS, load_wan_vae
    from tests.tiny_wan_io import tiny_vae

    root, name = tmp_path / "pipe", "decoder.conv_in.weight"
    folder = root / "vae"
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.view(-1)[7] = BIG
    if layout == "one-file":
        vae.save_pretrained(str(folder))
        file = folder / VAE_WEIGHTS
    elif layout == "sharded":
        vae.save_pretrained(str(folder), max_shard_size="100KB")
        file = folder / json.loads((folder / f"{VAE_WEIGHTS}.index.json").read_text())["weight_map"][name]
    else:
        vae.save_pretrained(str(folder), safe_serialization=False)
        file = folder / VAE_TORCH_WEIGHTS
    assert file.is_file()
    with pytest.raises(ValueError) as info:
        load_wan_vae(root, dtype=torch.float16)
    assert str(info.value) == f"{file_label(file)}: {name} holds 7.1e+04, {F16}"
    assert load_wan_vae(root, dtype=torch.float32).decoder.conv_in.weight.dtype == torch.float32


@pytest.mark.parametrize("layout", ["one-file", "sharded", "bin"])
def test_a_text_encoder_weight_beyond_float16_is_refused_naming_its_shard(tmp_path, layout):
    """As the VAE's: ``bin`` is a ``pytorch_model.bin`` in place of ``model.safetensors``."""
    pytest.importorskip("transformers")
    from packforcing.models.wan.text import ENCODER_TORCH_WEIGHTS, ENCODER_WEIGHTS, TextEncoder
    from tests.tiny_wan_io import tiny_umt5, write_tokenizer

    root = tmp_path / "pipe"
    folder = root / "text_encoder"
    model = tiny_umt5()
    model.save_pretrained(str(folder), max_shard_size="20KB" if layout == "sharded" else "5GB")
    write_tokenizer(root / "tokenizer")
    name = "encoder.block.1.layer.0.SelfAttention.q.weight"
    # transformers keeps UMT5's feed-forward output (wo) in float32: any float32 value fits there
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    if layout == "bin":  # transformers (5) saves safetensors only: written as an older version did
        (folder / ENCODER_WEIGHTS).unlink()
        state = dict(model.state_dict())
        for key in (name, wo):
            state[key] = state[key].clone()
            state[key].view(-1)[state[key].numel() // 2] = BIG
        torch.save(state, str(folder / ENCODER_TORCH_WEIGHTS))
        file = folder / ENCODER_TORCH_WEIGHTS
    else:
        index = folder / f"{ENCODER_WEIGHTS}.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if layout == "sharded" else {}
        file = spoil(folder / weight_map.get(name, ENCODER_WEIGHTS), name)
        spoil(folder / weight_map.get(wo, ENCODER_WEIGHTS), wo)
    with pytest.raises(ValueError) as info:
        TextEncoder.from_path(root, dtype=torch.float16)
    assert str(info.value) == f"{file_label(file)}: {name} holds 7.1e+04, {F16}"
    with TextEncoder.from_path(root, dtype=torch.bfloat16) as encoder:
        assert encoder.model.dtype == torch.bfloat16


def test_a_text_encoder_file_whose_names_transformers_renames_on_load_is_still_checked(tmp_path):
    """transformers strips UMT5's base-model prefix (``transformer.``) from a checkpoint's names on
    load: each tensor is checked all the same, named as stored, in the dtype it was loaded in (the
    feed-forward output kept in float32 may hold any float32 value)."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from packforcing.models.wan.text import ENCODER_WEIGHTS, TextEncoder
    from tests.tiny_wan_io import write_text_encoder

    root = write_text_encoder(tmp_path / "pipe")
    file = root / "text_encoder" / ENCODER_WEIGHTS
    tensors = load_file(str(file))
    name, wo = "encoder.block.1.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    save_file({f"transformer.{k}": v for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    spoil(file, f"transformer.{wo}")
    with TextEncoder.from_path(root, dtype=torch.float16) as encoder:  # loaded, renamed: wo is float32
        assert encoder.model.state_dict()[wo].dtype == torch.float32
    spoil(file, f"transformer.{name}")
    with pytest.raises(ValueError) as info:
        TextEncoder.from_path(root, dtype=torch.float16)
    assert str(info.value) == f"{file_label(file)}: transformer.{name} holds 7.1e+04, {F16}"


def test_a_file_tensor_loaded_under_a_name_unlike_its_own_is_checked_against_its_shape_s_narrowest_dtype(tmp_path):
    """No loaded name tells where it went: the narrowest dtype of the loaded tensors of its shape
    that no file name matches is assumed; a tensor the library reported unused is not read."""
    from safetensors.torch import save_file

    from packforcing.core.weightfiles import cast_damage

    file = tmp_path / "w.safetensors"
    big = torch.full((2, 3), BIG)
    save_file({"kept": torch.ones(4), "a.w": big, "b.w": big.T.contiguous()}, str(file))
    loaded = {"kept": torch.ones(4).half(), "x": big.half(), "y": big.T.float()}
    assert cast_damage(loaded, [file]) == f"{file_label(file)}: a.w holds 7.1e+04, {F16}"
    assert cast_damage({**loaded, "x": big.float()}, [file]) is None  # b.w went to float32 too
    assert cast_damage(loaded, [file], unused={"a.w"}) is None
    # of no loaded tensor's shape: the narrowest loaded dtype
    save_file({"c.w": torch.full((5,), BIG)}, str(file))
    assert cast_damage(loaded, [file]) == f"{file_label(file)}: c.w holds 7.1e+04, {F16}"


def floating_names(files: list[Path]) -> set[str]:
    """The floating-point tensors of safetensors or torch ``.bin`` weights files."""
    from packforcing.core.weightfiles import FLOAT_DTYPES, read_header

    names: set[str] = set()
    for file in files:
        if file.suffix == ".safetensors":
            names |= {name for name, (kind, _) in read_header(file)[0].items() if kind in FLOAT_DTYPES}
        else:
            state = torch.load(str(file), weights_only=True)
            names |= {name for name, t in state.items() if t.is_floating_point()}
    return names


@pytest.mark.parametrize("layout", ["one-file", "sharded", "bin"])
def test_diffusers_loads_every_vae_file_tensor_under_its_own_name(tmp_path, layout):
    """With the pinned diffusers, ``AutoencoderKLWan.from_pretrained`` renames nothing (its only
    renaming, of deprecated attention blocks, does not apply to Wan's VAE): the cast check finds
    every tensor by name. A diffusers that renames fails here, before the check gets costlier."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLWan

    from packforcing.core.weightfiles import weights_files
    from packforcing.models.wan.vae import VAE_TORCH_WEIGHTS, VAE_WEIGHTS
    from tests.tiny_wan_io import tiny_vae

    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(
        str(folder), max_shard_size="100KB" if layout == "sharded" else "5GB", safe_serialization=layout != "bin"
    )
    vae, info = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=torch.float16, output_loading_info=True)
    files = weights_files(folder, VAE_WEIGHTS, VAE_TORCH_WEIGHTS)
    assert len(files) == (1 if layout != "sharded" else len(files)) and files
    assert not info["unexpected_keys"] and floating_names(files) <= set(vae.state_dict())


@pytest.mark.parametrize("layout", ["one-file", "sharded", "bin", "encoder-decoder"])
def test_transformers_loads_every_used_umt5_file_tensor_under_its_own_name(tmp_path, layout):
    """As the VAE's, for ``UMT5EncoderModel.from_pretrained`` and the layouts a Wan text encoder
    comes in (a whole UMT5's decoder is reported unused): only a prefixed file is renamed
    (:func:`test_a_text_encoder_file_whose_names_transformers_renames_on_load_is_still_checked`)."""
    pytest.importorskip("transformers")
    from transformers import UMT5EncoderModel, UMT5ForConditionalGeneration

    from packforcing.core.weightfiles import weights_files
    from packforcing.models.wan.text import ENCODER_TORCH_WEIGHTS, ENCODER_WEIGHTS
    from tests.tiny_wan_io import randomize, tiny_umt5

    folder = tmp_path / "text_encoder"
    model = tiny_umt5()
    if layout == "encoder-decoder":
        model = randomize(UMT5ForConditionalGeneration(model.config), 3)
    model.save_pretrained(str(folder), max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "bin":  # transformers (5) saves safetensors only: written as an older version did
        (folder / ENCODER_WEIGHTS).unlink()
        torch.save(dict(model.state_dict()), str(folder / ENCODER_TORCH_WEIGHTS))
    loaded, info = UMT5EncoderModel.from_pretrained(str(folder), torch_dtype=torch.float16, output_loading_info=True)
    files = weights_files(folder, ENCODER_WEIGHTS, ENCODER_TORCH_WEIGHTS)
    assert (len(files) > 1) == (layout == "sharded")
    unused = set(info["unexpected_keys"])
    assert all(name.startswith(("decoder.", "lm_head.")) for name in unused)
    assert bool(unused) == (layout == "encoder-decoder")
    assert floating_names(files) - unused <= set(loaded.state_dict())


# ---------------------------------------------------------------------- tiny_dit, dual_branch, --init
def test_tiny_dit_weights_beyond_the_run_dtype_are_a_config_error_naming_the_file(tmp_path, capsys):
    file = tmp_path / "m.safetensors"
    shutil.copy(SHIPPED / "world_tiny.safetensors", file)
    spoil(file, "layers.0.mlp.0.weight")
    sets = ["--set", f"model.weights={file}", "--set", "run.device=cpu"]
    argv = ["generate", "--config", "packforcing", *sets, "--blocks", "1", "--out", str(tmp_path / "out")]
    assert main([*argv, "--set", "run.dtype=float16"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --set: model.weights: {file_label(file)}: layers.0.mlp.0.weight holds 7.1e+04, {F16}\n"
    assert not (tmp_path / "out").exists()
    overrides = [f"model.weights={file}", "run.device=cpu", "run.dtype=bfloat16", "compressor.weights=null"]
    assert pf.build_engine(pf.load_config("configs/packforcing.yaml", overrides)).model.geometry.dtype == "bfloat16"


def test_dual_branch_weights_beyond_the_run_dtype_are_a_config_error_naming_the_file(tmp_path):
    file = tmp_path / "c.safetensors"
    shutil.copy(SHIPPED / "dual_branch_world.safetensors", file)
    spoil(file, "hr.0.weight")
    config = pf.load_config(
        "configs/packforcing.yaml", [f"compressor.weights={file}", "run.device=cpu", "run.dtype=float16"]
    )
    with pytest.raises(pf.ConfigError) as info:
        pf.build_engine(config)
    assert str(info.value).endswith(f"compressor.weights: {file_label(file)}: hr.0.weight holds 7.1e+04, {F16}")


def test_init_weights_beyond_the_run_dtype_are_refused_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from tests.test_train_model import small_config

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    model = pf.build_engine(pf.load_config(str(config))).model
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(init))
    name = "layers.1.q.weight"
    spoil(init, name)
    out = tmp_path / "w.safetensors"
    argv = ["train-model", "--config", str(config), "--out", str(out), "--init", str(init), "--steps", "1"]
    assert main([*argv, "--no-progress", "--set", "run.dtype=float16"]) == 1
    assert capsys.readouterr().err == f"error: --init: {file_label(init)}: {name} holds 7.1e+04, {F16}\n"
    assert not out.exists()


# ---------------------------------------------------------------------- a resumed run's checkpoint
def test_checkpoint_latents_beyond_the_cache_dtype_are_refused_and_the_cache_kept(recwarn):
    from tests.helpers import TINY_MODEL

    engine = pf.build_engine(
        {
            "model": {**TINY_MODEL, "latent_height": 8, "latent_width": 8},
            "policy": {"name": "packforcing", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 3},
            "compressor": {"name": "dual_branch", "weights": None},
            "selector": {"name": "topk", "k": 2, "min_queries": 2},
            "backend": "sdpa",
            "sampler": {"steps": 2},
            "run": {"device": "cpu", "dtype": "float32"},
        }
    )
    list(engine.generate(3, seed=3))
    tensors, meta = engine.policy.state_dict()
    before = engine.policy.stats()
    bad = dict(tensors)
    bad["tier.recent.0.latents"] = tensors["tier.recent.0.latents"].double().index_fill_(0, torch.tensor([0]), 1e300)
    with pytest.raises(ValueError) as info:
        engine.policy.load_state_dict(bad, meta)
    # no "run in float64": a run resumes in the dtype it was saved from (generate --resume refuses another)
    assert str(info.value) == "checkpoint: tier.recent.0.latents holds 1e+300, beyond float32's ±3.40282e+38"
    assert engine.policy.stats() == before
    engine.policy.load_state_dict(tensors, meta)  # the checkpoint as saved loads


def test_a_vae_decoder_cache_beyond_the_vae_dtype_is_refused_and_the_decoder_kept(tmp_path):
    pytest.importorskip("diffusers")
    from packforcing.models.wan.vae import WanVAECodec
    from tests.tiny_wan_io import VAE_LATENT_CHANNELS, write_tiny_vae

    codec = WanVAECodec.from_path(write_tiny_vae(tmp_path / "vae"))
    stream = codec.streaming_decoder()
    stream.decode(torch.randn(1, VAE_LATENT_CHANNELS, 2, 4, 4))
    tensors, meta = stream.state_dict()
    key = sorted(tensors)[0]
    bad = {**tensors, key: tensors[key].double().index_fill_(0, torch.tensor([0]), 1e300)}
    fresh = codec.streaming_decoder()
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(bad, meta)
    assert str(info.value) == f"the VAE decoder's cache slot {key} holds 1e+300, beyond float32's ±3.40282e+38"
    assert fresh.latent_frames == 0
    fresh.load_state_dict(tensors, meta)
    assert fresh.latent_frames == 2
