"""Parameters of model ``wan`` (YAML ``model:`` block). Importing this does not import diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from packforcing.core.geometry import DTYPES
from packforcing.core.validators import one_of, positive

FORMATS = ("auto", "diffusers", "wan", "self_forcing")

WAN21_T2V_1_3B: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
"""diffusers' ``WanTransformer3DModel`` config of Wan2.1-T2V-1.3B: the architecture a config
without ``path`` plans memory for (it cannot generate without weights)."""


@attrs.frozen
class WanParams:
    """``model: {name: wan, path: ..., format: auto|diffusers|wan|self_forcing, ...}``.

    ``path``: a diffusers folder (pipeline root with ``transformer/``, or the transformer folder),
    an official Wan2.1 ``.safetensors`` file, or a Self-Forcing / CausVid torch checkpoint.
    Without a path the config only plans memory (Wan2.1-T2V-1.3B's shapes). Layers, heads, head
    dim, channels and patch come from the checkpoint's config; the block and latent sizes are
    the run's: ``frames_per_block`` latent frames of ``latent_height × latent_width``
    (832×480 pixels → 104×60 latents). ``dtype``: the transformer's weights and compute dtype
    (default: ``run.dtype``).
    """

    path: str | None = None
    format: str = attrs.field(default="auto", validator=one_of(*FORMATS))
    frames_per_block: int = attrs.field(default=3, validator=positive)
    latent_height: int = attrs.field(default=60, validator=positive)
    latent_width: int = attrs.field(default=104, validator=positive)
    dtype: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*DTYPES)))
    vae: str | None = None
    """The Wan VAE that decodes the video (and feeds ``dual_branch``'s LR branch): a diffusers
    pipeline root with ``vae/`` or the VAE folder. Default: the pipeline root ``path`` belongs
    to, when it has a ``vae/`` folder. Without a VAE no video is written."""

    def pipeline_root(self) -> Path | None:
        """The diffusers pipeline root ``path`` is (or is the ``transformer/`` folder of), if any:
        where the VAE, text encoder and tokenizer are looked for by default."""
        if self.path is None:
            return None
        path = Path(self.path).expanduser()
        for root in (path, path.parent):
            if (root / "model_index.json").is_file() or (root / "vae" / "config.json").is_file():
                return root
        return None

    def vae_path(self) -> str | None:
        """``vae``, else the pipeline root's ``vae/`` when there is one."""
        if self.vae is not None:
            return self.vae
        root = self.pipeline_root()
        return str(root) if root is not None and (root / "vae" / "config.json").is_file() else None

    def cannot_generate(self) -> str | None:
        """Why this config can plan but not generate, or ``None``."""
        if self.path is None:
            return "model wan has no path: it plans Wan2.1-T2V-1.3B memory only (set model.path to a checkpoint)"
        return None
