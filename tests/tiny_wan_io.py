"""Tiny random Wan VAE and UMT5 text encoder written to disk in their real formats (no download).

Every parameter is drawn at random (no zero- or one-initialised tensor can hide a mistake).
"""

from __future__ import annotations

from pathlib import Path

import torch

VAE_LATENT_CHANNELS = 4
TEXT_DIM = 32
WORDS = ("a", "red", "fox", "running", "through", "snow", "blue", "whale", "ocean", "city", "night", "the")


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def tiny_vae(seed: int = 0):
    """A random ``AutoencoderKLWan``: 4 latent channels, 8× spatial and 4× temporal compression."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=VAE_LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 1.0, 2.0],
    )
    return randomize(vae, seed)


def write_tiny_vae(root: Path, *, pipeline: bool = False, seed: int = 0) -> Path:
    """Save a tiny VAE as a diffusers folder (``root/vae`` when ``pipeline``); returns ``root``."""
    tiny_vae(seed).save_pretrained(str(root / "vae" if pipeline else root))
    return root


def write_tokenizer(folder: Path) -> Path:
    """A small word-level T5-style tokenizer (pad 0, eos 1, unk 2) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return folder


def tiny_umt5(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(WORDS) + 3,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return randomize(UMT5EncoderModel(config), seed, scale=0.5)


def write_text_encoder(root: Path, *, pipeline: bool = True, seed: int = 0) -> Path:
    """A tiny UMT5 encoder + tokenizer: as a pipeline root (``text_encoder/``, ``tokenizer/``) or
    one folder holding both."""
    encoder_dir = root / "text_encoder" if pipeline else root
    tiny_umt5(seed).save_pretrained(str(encoder_dir))
    write_tokenizer(root / "tokenizer" if pipeline else root)
    return root


def write_tiny_pipeline(root: Path) -> Path:
    """A whole tiny random Wan2.1 diffusers pipeline root at ``root``: ``transformer/``, ``vae/``,
    ``text_encoder/`` and ``tokenizer/``."""
    from .wan_fixtures import tiny_transformer, write_diffusers

    write_diffusers(tiny_transformer(), root, pipeline=True)
    write_tiny_vae(root, pipeline=True)
    write_text_encoder(root, pipeline=True)
    return root
