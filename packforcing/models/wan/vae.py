"""The Wan VAE (diffusers' ``AutoencoderKLWan``) as a latent codec, with streaming decode.

Wan's VAE is causal in time: ``1 + 4k`` pixel frames ↔ ``1 + k`` latent frames, each
convolution keeping the last two frames of its input as a feature cache. diffusers'
``decode`` clears that cache at its start, so decoding a long video block by block with it
would restart the causal context at every block. :class:`StreamingDecoder` runs diffusers'
own modules (``post_quant_conv``, ``decoder``) one latent frame at a time, exactly as
``AutoencoderKLWan._decode`` does, but owns the feature cache and keeps it between calls:
block after block, the output equals decoding the whole latent video at once, and memory
stays that of one block however long the video.

Latents handed to and from the codec are in the transformer's normalised space,
``(z - latents_mean) / latents_std`` (per channel, from the VAE's config), as Wan's pipelines
use them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from packforcing.core.finite import cast_problem
from packforcing.core.freeing import freed_on_error
from packforcing.core.weightfiles import cast_damage, weights_files
from packforcing.models.wan.imports import diffusers_quietly, loading_quietly

VAE_SUBFOLDER = "vae"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_TORCH_WEIGHTS = "diffusion_pytorch_model.bin"
"""What diffusers reads without :data:`VAE_WEIGHTS` (or their sharded ``.index.json``)."""
_REPEAT = "Rep"
"""diffusers' marker in a feature-cache slot of a temporal upsampler that has seen only the first
frame (its next frame repeats it); kept with the cache's tensors in a checkpoint."""


def vae_folder(path: str | Path) -> Path:
    """The VAE folder of ``path``: a diffusers pipeline root (with ``vae/``) or the folder itself;
    ``ValueError`` naming ``path`` when neither holds a ``config.json``."""
    root = Path(path).expanduser()
    folder = root / VAE_SUBFOLDER if (root / VAE_SUBFOLDER / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: not a Wan VAE folder (no config.json here or in {VAE_SUBFOLDER}/)")
    return folder


def vae_latent_channels(path: str | Path) -> int:
    """The latent channels (``z_dim``) of the VAE at ``path``, read from its config alone."""
    folder = vae_folder(path)
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
        channels = int(config["z_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not a Wan VAE config ({type(exc).__name__}: {exc})") from None
    kind = config.get("_class_name", "AutoencoderKLWan")
    if kind != "AutoencoderKLWan":
        raise ValueError(f"{file}: the config of {kind}, not of a Wan VAE (AutoencoderKLWan)")
    return channels


@freed_on_error
def load_wan_vae(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
    """``AutoencoderKLWan`` from ``path``: a diffusers pipeline root (with ``vae/``) or the VAE
    folder itself, in ``dtype``. Errors are one line naming the path (or the weights file, for a
    value ``dtype`` cannot hold)."""
    with diffusers_quietly():
        from diffusers import AutoencoderKLWan

    folder = vae_folder(path)
    vae_latent_channels(folder)  # a config of another model is refused before diffusers builds from it
    try:
        with loading_quietly():  # no progress bar or warning of diffusers' on stderr: refusals are one line
            vae, info = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, output_loading_info=True)
    except Exception as exc:  # diffusers', safetensors' and torch's own error types
        raise ValueError(f"{folder}: cannot load AutoencoderKLWan: {' '.join(str(exc).split())}") from None
    problem = _unlike_config(info, folder)
    if problem is None:
        vae.to(device)  # in place
        files = weights_files(folder, VAE_WEIGHTS, VAE_TORCH_WEIGHTS)
        problem = cast_damage(vae.state_dict(), files)  # values beyond dtype's range
    if problem is not None:  # the VAE is freed before the error reaches the caller (freed_on_error)
        raise ValueError(problem)
    return vae.requires_grad_(False).eval()


def _unlike_config(info: Mapping[str, list[str]], folder: Path) -> str | None:
    """The weights diffusers' loading ``info`` lists as missing or unexpected, in one line."""
    # diffusers only logs these: a missing weight would be left uninitialised (on the meta device)
    for kind in ("missing", "unexpected"):
        names = sorted(info[f"{kind}_keys"])
        if names:
            few = f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
            return f"{folder}: not the AutoencoderKLWan its config.json describes: {kind} weights ({few})"
    return None


def _causal_conv_count(module: torch.nn.Module) -> int:
    """Number of feature-cache slots the Wan decoder uses: one per causal 3D convolution."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class WanVAECodec:
    """Normalised latents ``[B, 16, F, H, W]`` ↔ pixels ``[B, 3, 1 + 4(F - 1), 8H, 8W]`` in ``[-1, 1]``.

    ``decode`` and ``encode`` are diffusers' own (whole clips; the first latent frame is the
    causal start). :meth:`streaming_decoder` decodes a video block by block, carrying the
    causal cache. ``stride`` / ``temporal_stride`` are the spatial and temporal compression.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        config = vae.config
        self.stride = int(config.scale_factor_spatial or 8)
        self.temporal_stride = int(config.scale_factor_temporal or 4)
        self.latent_channels = int(config.z_dim)
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._decoder_slots = _causal_conv_count(vae.decoder)

    @classmethod
    def from_path(
        cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> WanVAECodec:
        return cls(load_wan_vae(path, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def pixel_frames(self, latent_frames: int, *, first: bool = True) -> int:
        """Pixel frames decoded from ``latent_frames``: ``1 + 4(F - 1)`` at the start of a
        video, ``4F`` for a later block of a stream."""
        return 1 + self.temporal_stride * (latent_frames - 1) if first else self.temporal_stride * latent_frames

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → the VAE's own latent space, in the VAE's dtype and device."""
        z = latents.to(device=self.device, dtype=torch.float32)
        z = z * self._std.to(z.device) + self._mean.to(z.device)
        return z.to(self.dtype)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        zf = z.float()
        return (zf - self._mean.to(zf.device)) / self._std.to(zf.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, F, H, W]`` → pixels ``[B, 3, 1 + 4(F-1), 8H, 8W]`` (diffusers'
        ``decode``, a clip of its own), in the latents' dtype."""
        pixels = self.vae.decode(self.denormalize(latents)).sample
        return pixels.to(latents.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, 1 + 4k, H, W]`` in ``[-1, 1]`` → normalised latents ``[B, C, 1 + k, H/8, W/8]``
        (the posterior mean), in the pixels' dtype."""
        x = pixels.to(device=self.device, dtype=self.dtype)
        z = self.vae.encode(x).latent_dist.mode()
        return self.normalize(z).to(pixels.dtype)

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder for one video, fed block by block (fresh causal cache)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes one video block by block, keeping the Wan decoder's causal feature cache.

    ``decode(block)`` of consecutive blocks ``[B, C, F_i, H, W]`` returns their pixels; the
    concatenation equals ``codec.decode`` of the whole latent video. Memory held between
    calls is the cache alone (two frames per causal convolution), independent of length.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self._cache: list[Any] = [None] * codec._decoder_slots
        self.latent_frames = 0
        """Latent frames decoded so far."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, T, 8H, 8W]`` in ``[-1, 1]`` of the next block ``latents [B, C, F, H, W]``
        (``T = 1 + 4(F-1)`` for the first block, ``4F`` after), in the latents' dtype."""
        vae = self.codec.vae
        x = vae.post_quant_conv(self.codec.denormalize(latents))  # 1×1×1: frame-local
        frames = []
        for i in range(x.shape[2]):
            index = [0]
            frames.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._cache,
                    feat_idx=index,
                    first_chunk=self.latent_frames == 0,
                )
            )
            self.latent_frames += 1
        out = torch.cat(frames, dim=2)
        patch = vae.config.patch_size
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=patch)
        return out.clamp(-1.0, 1.0).to(latents.dtype)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The causal cache, for a checkpoint: ``(tensors, meta)``, the slots' tensors on the CPU
        by slot number (each ``[B, C, ≤2, h, w]``) and the JSON-able rest (frames decoded, slots,
        the upsamplers' first-frame markers). :meth:`load_state_dict` of it continues the video
        exactly where this decoder is."""
        tensors = {str(i): t.detach().to("cpu") for i, t in enumerate(self._cache) if isinstance(t, torch.Tensor)}
        marked = [i for i, t in enumerate(self._cache) if isinstance(t, str)]
        return tensors, {"latent_frames": self.latent_frames, "slots": len(self._cache), "repeat_marked": marked}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the decoder is left unchanged on a
        ``ValueError``: a cache from another VAE, or one holding values the VAE's dtype cannot)."""
        slots = len(self._cache)
        if int(meta.get("slots", -1)) != slots or any(not 0 <= int(k) < slots for k in tensors):
            raise ValueError(f"the VAE decoder's cache has {slots} slots; the checkpoint's is from another VAE")
        problem = cast_problem(tensors.items(), self.codec.dtype, suggest=False)  # a run resumes unchanged
        if problem is not None:
            raise ValueError(f"the VAE decoder's cache slot {problem}")
        cache: list[Any] = [None] * slots
        for key, tensor in tensors.items():
            cache[int(key)] = tensor.to(device=self.codec.device, dtype=self.codec.dtype)
        for i in meta.get("repeat_marked", []):
            cache[int(i)] = _REPEAT
        self._cache, self.latent_frames = cache, int(meta["latent_frames"])
