"""The Wan VAE codec: streaming decode against diffusers' own whole-video decode."""

from __future__ import annotations

import pytest
import torch

from packforcing.core.geometry import spatial_stride_of
from packforcing.models.wan.vae import WanVAECodec
from tests.helpers import recorded_loads
from tests.tiny_wan_io import VAE_LATENT_CHANNELS, write_tiny_vae

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> WanVAECodec:
    root = write_tiny_vae(tmp_path_factory.mktemp("wan") / "pipe", pipeline=True)
    return WanVAECodec.from_path(root)  # a pipeline root: the VAE is found in vae/


def latent_video(frames: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, VAE_LATENT_CHANNELS, frames, 4, 6, generator=gen)


@pytest.mark.parametrize("blocks", [(3, 3, 1), (1, 2, 4), (4, 3)])
def test_streamed_decode_equals_whole_video_decode(codec, blocks):
    latents = latent_video(sum(blocks))
    # the oracle: diffusers' own decode of the whole (denormalised) latent video
    whole = codec.vae.decode(latents * codec._std + codec._mean).sample
    stream = codec.streaming_decoder()
    parts, start = [], 0
    for i, n in enumerate(blocks):
        part = stream.decode(latents[:, :, start : start + n])
        assert part.shape[2] == codec.pixel_frames(n, first=i == 0)
        parts.append(part)
        start += n
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == whole.shape == (2, 3, 1 + 4 * (sum(blocks) - 1), 32, 48)
    inside = (whole.abs() < 1).float().mean()
    assert inside > 0.5  # mostly unclamped pixels: the comparison is not between saturated values
    assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert torch.equal(codec.decode(latents), whole)


def test_decoding_blocks_separately_loses_the_causal_context(codec):
    """The guard: restarting the causal cache at each block (diffusers' decode per block) differs."""
    latents = latent_video(6)
    whole = codec.decode(latents)
    restarted = codec.decode(latents[:, :, 3:])
    streamed_tail = whole[:, :, codec.pixel_frames(3) :]
    assert restarted.shape[2] != streamed_tail.shape[2] or not torch.allclose(restarted, streamed_tail)
    second = codec.streaming_decoder()
    second.decode(latents[:, :, :3])
    assert torch.allclose(second.decode(latents[:, :, 3:]), streamed_tail, atol=1e-5)
    fresh = codec.streaming_decoder()
    fresh.decode(torch.zeros_like(latents[:, :, :3]))
    assert not torch.allclose(fresh.decode(latents[:, :, 3:]), streamed_tail, atol=1e-3)


def test_encode_inverts_the_geometry(codec):
    pixels = codec.decode(latent_video(3))
    z = codec.encode(pixels)
    assert z.shape == (2, VAE_LATENT_CHANNELS, 3, 4, 6)
    assert z.dtype == pixels.dtype and torch.isfinite(z).all()
    assert (codec.stride, codec.temporal_stride) == (8, 4)
    assert spatial_stride_of(codec) == 8  # declared as LatentCodec documents it


def test_a_folder_without_a_vae_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"not a Wan VAE folder") as info:
        WanVAECodec.from_path(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_the_stream_holds_constant_memory_between_blocks(codec):
    """What the decoder keeps between blocks (the causal cache) does not grow with the video."""

    def held(stream) -> int:
        return sum(t.nbytes for t in stream._cache if isinstance(t, torch.Tensor))

    stream = codec.streaming_decoder()
    sizes = []
    for i in range(5):
        stream.decode(latent_video(2, seed=10 + i))
        sizes.append(held(stream))
    assert sizes[1] == sizes[2] == sizes[3] == sizes[4] > 0


@pytest.mark.parametrize("case", ["missing", "unexpected", "another model"])
def test_a_vae_folder_with_wrong_weights_or_of_another_model_is_one_line(tmp_path, capfd, case):
    """One line, and the only one: diffusers' own warnings about the weights it found missing or
    unused (multi-line, on stderr) are not shown before it."""
    import json
    import logging

    from safetensors.torch import load_file, save_file

    from packforcing.models.wan.imports import LOADERS

    folder = write_tiny_vae(tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    if case == "missing":  # diffusers left it on the meta device: a NotImplementedError traceback at .to()
        del tensors["decoder.conv_out.weight"]
        problem = "not the AutoencoderKLWan its config.json describes: missing weights (decoder.conv_out.weight)"
    elif case == "unexpected":  # diffusers only logged that it ignored it
        tensors["decoder.extra.weight"] = torch.ones(2)
        problem = "not the AutoencoderKLWan its config.json describes: unexpected weights (decoder.extra.weight)"
    else:  # a VAE of another family with a z_dim: diffusers built a Wan VAE from it, all weights unused
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKLQwenImage"}))
        problem = "config.json: the config of AutoencoderKLQwenImage, not of a Wan VAE (AutoencoderKLWan)"
    save_file(tensors, str(weights))
    log = logging.getLogger(LOADERS["diffusers"][1])
    level, filters = log.level, list(log.filters)
    capfd.readouterr()
    with pytest.raises(ValueError) as info:
        WanVAECodec.from_path(folder)
    text = str(info.value)
    assert problem in text and "\n" not in text and text.startswith(str(folder)), text
    assert capfd.readouterr().err == "" and (log.level, log.filters) == (level, filters)


@pytest.mark.parametrize("case", ["cast", "missing"])
def test_a_refused_vae_is_freed_before_its_error_is_raised(tmp_path, monkeypatch, case):
    """The error's traceback holds ``load_wan_vae``'s frame: were the loaded VAE still one of its
    locals, it would stay alive (on the GPU when asked) for as long as the error is held."""

    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file, save_file

    from packforcing.models.wan.vae import VAE_WEIGHTS, load_wan_vae
    from tests.test_cast_range import F16, spoil

    folder = write_tiny_vae(tmp_path / "vae")
    if case == "cast":
        spoil(folder / VAE_WEIGHTS, "decoder.conv_in.weight")
        problem, dtype = f"holds 7.1e+04, {F16}", torch.float16
    else:
        tensors = load_file(str(folder / VAE_WEIGHTS))
        del tensors["decoder.conv_out.weight"]
        save_file(tensors, str(folder / VAE_WEIGHTS))
        problem, dtype = "missing weights (decoder.conv_out.weight)", torch.float32
    loaded = recorded_loads(monkeypatch, AutoencoderKLWan)
    with pytest.raises(ValueError) as info:
        load_wan_vae(folder, dtype=dtype)
    assert problem in str(info.value) and info.value.__traceback__ is not None
    assert len(loaded) == 1 and loaded[0]() is None


@pytest.mark.parametrize("enabled", [True, False])
def test_a_sharded_vae_loads_without_a_progress_bar_and_leaves_the_switch_as_it_was(tmp_path, capfd, enabled):
    """diffusers draws ``Loading checkpoint shards`` on stderr for a sharded checkpoint; the CLI's
    stderr holds its one-line errors only. The bars are off for the load alone: a caller's
    setting (on or off) is what it was after it, a refused load's too."""
    import json

    from diffusers.utils import logging as diffusers_logging

    from packforcing.models.wan.vae import VAE_WEIGHTS, load_wan_vae
    from tests.test_cast_range import spoil
    from tests.tiny_wan_io import tiny_vae

    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(str(folder), max_shard_size="100KB")
    assert len(set(json.loads((folder / f"{VAE_WEIGHTS}.index.json").read_text())["weight_map"].values())) > 2
    switch = diffusers_logging.enable_progress_bar if enabled else diffusers_logging.disable_progress_bar
    switch()
    try:
        capfd.readouterr()
        load_wan_vae(folder)
        assert capfd.readouterr().err == ""
        assert diffusers_logging.is_progress_bar_enabled() == enabled
        shard = json.loads((folder / f"{VAE_WEIGHTS}.index.json").read_text())["weight_map"]["decoder.conv_in.weight"]
        spoil(folder / shard, "decoder.conv_in.weight")
        with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight holds 7\.1e"):
            load_wan_vae(folder, dtype=torch.float16)
        assert capfd.readouterr().err == ""
        assert diffusers_logging.is_progress_bar_enabled() == enabled
    finally:
        diffusers_logging.enable_progress_bar()
