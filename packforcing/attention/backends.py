"""Attention backends over ``[B, N, H, D]`` tensors."""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from packforcing.core.interfaces import AttentionBackend
from packforcing.core.validators import explained, str_tuple

KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""SDPA's kernels by the names ``sdpa``'s ``kernels`` parameter takes."""


@attrs.frozen
class SdpaParams:
    """Parameters of ``sdpa``.

    ``split_context``: attend a cache's history where it is stored, a run of pages at a time,
    and merge the parts by their log-sum-exp, instead of copying the whole context into one
    tensor on every layer (see :attr:`AttentionBackend.split_context`). Exact up to rounding;
    whether it is faster depends on the device and the context's shape (``benchmarks/wan_gpu.py``
    measures both).

    ``kernels``: the SDPA kernels to use, in order of preference (``cudnn``, ``flash``,
    ``efficient``, ``math``), with ``math`` always allowed last so that any device and dtype
    still works; ``None`` (the default) lets SDPA choose. Setting them costs about 13 µs of host
    time per call (``torch.nn.attention.sdpa_kernel``).
    """

    split_context: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    kernels: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=attrs.converters.optional(str_tuple),
        validator=attrs.validators.optional(
            explained(
                f"a non-empty list of distinct kernels out of {', '.join(KERNELS)}",
                attrs.validators.min_len(1),
                attrs.validators.deep_iterable(attrs.validators.in_(tuple(KERNELS))),
                lambda _, __, value: _distinct(value),
                shown=lambda value: repr(list(value)),
            )
        ),
    )


def _distinct(values: tuple[str, ...]) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"repeated kernels in {values}")


_FLASH, _CUDNN, _EFFICIENT = (
    SDPBackend.FLASH_ATTENTION.value,
    SDPBackend.CUDNN_ATTENTION.value,
    SDPBackend.EFFICIENT_ATTENTION.value,
)
"""SDPA's fused kernels as ``torch._fused_sdp_choice`` numbers them (the enum does not compare
equal to them)."""


def _fused_lse(kernel: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` from one fused SDPA kernel's ``aten`` operator (``[B, H, N, D]`` inputs)."""
    if kernel == _FLASH:
        if q.device.type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    if kernel == _CUDNN:
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    if kernel == _EFFICIENT:
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    raise NotImplementedError(f"no log-sum-exp operator for SDPA kernel {kernel}")


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out [B, H, Nq, D], lse [B, H, Nq])`` for ``[B, H, N, D]`` inputs from the fused kernel
    SDPA itself would choose, else (it turns these tensors down) flash or memory-efficient if
    enabled; ``None`` where SDPA would choose no fused kernel or none takes them."""
    choose = getattr(torch, "_fused_sdp_choice", None)  # private: absent from a future torch, math it is
    choice = int(choose(q, k, v)) if choose is not None else -1
    if choice not in (_FLASH, _CUDNN, _EFFICIENT):
        return None
    b, h, nq, _ = q.shape
    fallbacks: list[int] = []
    if q.device.type != "cpu":  # within torch.nn.attention.sdpa_kernel, only the kernels it allows
        enabled = {
            _FLASH: torch.backends.cuda.flash_sdp_enabled(),
            _EFFICIENT: torch.backends.cuda.mem_efficient_sdp_enabled(),
        }
        fallbacks = [kernel for kernel, on in enabled.items() if on]
    for kernel in dict.fromkeys((choice, *fallbacks)):
        try:
            out, lse = _fused_lse(kernel, q, k, v)
        except (RuntimeError, NotImplementedError, AttributeError):  # refused, or no such operator
            continue
        # cuDNN keeps a trailing unit dimension, the efficient kernel pads the queries to its tile
        return out, lse.reshape(b, h, -1)[..., :nq]
    return None


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: scores in float32 (or ``q``'s dtype if wider) for ``[B, H, N, D]`` inputs."""
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, Nq, Nk]
    lse = scores.logsumexp(-1)
    out = torch.softmax(scores, dim=-1) @ v.to(wide)
    return out.to(q.dtype), lse


class SdpaBackend(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention``; any device and dtype."""

    name = "sdpa"
    returns_lse = True

    def __init__(self, params: SdpaParams | None = None) -> None:
        self.params = params or SdpaParams()
        self.split_context = self.params.split_context
        chosen = self.params.kernels
        self._kernels = None if chosen is None else [KERNELS[k] for k in dict.fromkeys((*chosen, "math"))]

    def _allowed(self) -> contextlib.AbstractContextManager[Any]:
        """The configured kernels, in order, for the calls inside (nothing when SDPA chooses)."""
        if self._kernels is None:
            return contextlib.nullcontext()
        return sdpa_kernel(self._kernels, set_priority=True)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self._allowed():
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
        return out.transpose(1, 2)

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attend` without a mask, with the log-sum-exp: the same fused kernel SDPA picks
        for these tensors (flash, cuDNN or memory-efficient, through their ``aten`` operators,
        which return it), else the math reference."""
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with self._allowed():
            fused = _sdpa_lse(qt, kt, vt)
        out, lse = fused if fused is not None else _math_lse(qt, kt, vt)
        return out.transpose(1, 2), lse.transpose(1, 2)


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
    """``auto``: SDPA on every device and dtype, left to pick its own fused kernel.

    Measured, not assumed: on one H100 (torch 2.11, bf16) at Wan2.1's shapes, SDPA picked cuDNN
    and ran 1.7-1.8x faster than xformers' ``memory_efficient_attention`` (1.30 against 2.35 ms
    for one block's 4,680 queries over PackForcing's 24,128 keys; ``benchmarks/wan_gpu.py``,
    ``benchmarks/results/wan_gpu.md``). So xformers runs only when named (``backend: xformers``).
    ``device`` and ``dtype`` are what a finer choice would go by; none depends on them today.
    """
    del device, dtype
    return SdpaBackend()
