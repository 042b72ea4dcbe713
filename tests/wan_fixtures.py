"""A tiny random Wan2.1 transformer written to disk in the three checkpoint formats.

2 layers, 2 heads of 32, text dim 32, 4 latent channels; every parameter is drawn at random
(zero- or one-initialised tensors could hide a wrong name mapping).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

TEXT_DIM = 32
CHANNELS = 4
CONFIG = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": CHANNELS,
    "out_channels": CHANNELS,
    "text_dim": TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 96,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}
OFFICIAL_CONFIG = {
    "model_type": "t2v",
    "patch_size": [1, 2, 2],
    "text_len": 512,
    "in_dim": CHANNELS,
    "dim": 64,
    "ffn_dim": 96,
    "freq_dim": 32,
    "text_dim": TEXT_DIM,
    "out_dim": CHANNELS,
    "num_heads": 2,
    "num_layers": 2,
    "eps": 1e-6,
}


def tiny_transformer(seed: int = 0, scale: float = 0.3):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**CONFIG)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


_TO_OFFICIAL = [
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
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
]


def official_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the official Wan2.1 names (the inverse of diffusers' converter)."""
    out = {}
    for name, tensor in model.state_dict().items():
        for pattern, repl in _TO_OFFICIAL:
            name = re.sub(pattern, repl, name)
        out[name] = tensor.clone().contiguous()
    return out


def write_diffusers(model, root: Path, *, pipeline: bool = False) -> Path:
    folder = root / "transformer" if pipeline else root
    model.save_pretrained(str(folder))
    return root


def write_wan(model, folder: Path, *, config: bool = True) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "wan2.1_t2v.safetensors"
    save_file(official_state(model), str(file))
    if config:
        (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return file


def write_self_forcing(model, folder: Path, *, decoy: bool = True) -> Path:
    """A Self-Forcing checkpoint: ``generator_ema`` holds the model, ``generator`` a decoy."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "self_forcing_dmd.pt"
    state = {f"model.{k}": v for k, v in official_state(model).items()}
    data = {"generator_ema": state}
    if decoy:
        data["generator"] = {k: v + 1.0 for k, v in state.items()}
    torch.save(data, str(file))
    (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return file


def write_embeds(file: Path, length: int = 7, seed: int = 1) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    save_file({"prompt_embeds": torch.randn(length, TEXT_DIM, generator=gen)}, str(file))
    return file
