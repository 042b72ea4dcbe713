"""Attention backends over ``[B, N, H, D]`` tensors."""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
import torch.nn.functional as F

from packforcing.core.interfaces import AttentionBackend


class SdpaBackend(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention``; any device and dtype."""

    name = "sdpa"

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


@functools.cache
def _xformers_ops():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("xformers.ops")


def xformers_available() -> bool:
    """True when CUDA is present and xformers' memory-efficient kernels import."""
    if not torch.cuda.is_available():
        return False
    try:
        _xformers_ops()
    except Exception:
        return False
    return True


class XformersBackend(AttentionBackend):
    """``xformers.ops.memory_efficient_attention`` (CUDA, fp16/bf16).

    Imported on first use."""

    name = "xformers"

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        xops = _xformers_ops()
        bias = None
        if mask is not None:
            b, nq, h, _ = q.shape
            nk = k.shape[1]
            # xformers wants a float bias whose last dim is 8-aligned in memory
            padded = (nk + 7) // 8 * 8
            storage = torch.zeros((b, h, nq, padded), dtype=q.dtype, device=q.device)
            bias = storage[..., :nk]
            bias.masked_fill_(~mask.expand(b, h, nq, nk), float("-inf"))
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def pick_backend(device: torch.device | str, dtype: torch.dtype) -> AttentionBackend:
    """``auto``: xformers on CUDA with fp16/bf16 when it imports, else SDPA."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and xformers_available():
        return XformersBackend()
    return SdpaBackend()
