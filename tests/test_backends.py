"""Attention backends agree with a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from packforcing.attention import SdpaBackend, XformersBackend, pick_backend, xformers_available


def reference_attention(q, k, v, mask=None):
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return (scores.softmax(-1) @ v64).transpose(1, 2)


def make_qkv(b=2, nq=24, nk=40, h=3, d=32, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype) for n in (nq, nk, nk)]


def random_mask(nq, nk, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(nq, nk, generator=gen) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    return mask


@pytest.mark.parametrize("masked", [False, True])
# bfloat16: 1e-2 of the largest output (3e-3 measured; one bfloat16 ulp at 1 is 7.8e-3)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_sdpa_matches_float64_reference(masked, dtype, tol):
    q, k, v = make_qkv(dtype=dtype)
    mask = random_mask(q.shape[1], k.shape[1]) if masked else None
    out = SdpaBackend().attend(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    assert float((out.double() - ref).abs().max()) <= tol * float(ref.abs().max())


needs_xformers = pytest.mark.skipif(not xformers_available(), reason="needs CUDA and a working xformers build")


@needs_xformers
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_float64_reference(masked, dtype):
    q, k, v = make_qkv(nq=64, nk=100, h=4, d=64, dtype=dtype, device="cuda")
    mask = random_mask(q.shape[1], k.shape[1]).cuda() if masked else None
    out = XformersBackend().attend(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    assert float((out.double() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_picks_sdpa_on_every_device_and_dtype(device, dtype):
    # on CUDA too, xformers installed or not: it was 1.7-1.8x slower than SDPA's own choice
    # (cuDNN) on an H100 at Wan's shapes (benchmarks/results/wan_gpu.md)
    assert isinstance(pick_backend(device, dtype), SdpaBackend)


def test_import_is_silent_and_lazy():
    import subprocess
    import sys

    code = "import sys, packforcing, packforcing.plugins.builtin_factories; print('xformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "False\n"
    assert result.stderr == ""


@pytest.mark.parametrize("nk", [1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attend_lse_uses_the_fused_kernel_on_the_cpu(nk, dtype):
    """The log-sum-exp comes from SDPA's own fused CPU kernel, not the math fallback."""
    from packforcing.attention.backends import _sdpa_lse

    q, k, v = (t.transpose(1, 2) for t in make_qkv(nk=nk, dtype=dtype))
    fused = _sdpa_lse(q, k, v)
    assert fused is not None and fused[1].shape == q.shape[:3]


@pytest.mark.parametrize("nk", [1, 40])
def test_sdpa_attend_lse_matches_float64_reference(nk):
    q, k, v = make_qkv(nk=nk)
    out, lse = SdpaBackend().attend_lse(q, k, v)
    stored = page_views(nk=2 * nk, h=3, d=32)
    torch.testing.assert_close(
        SdpaBackend().attend_lse(q, *stored)[0].double(), reference_attention(q, *stored), atol=1e-5, rtol=1e-5
    )
    q64, k64 = (t.double().transpose(1, 2) for t in (q, k))
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1).transpose(1, 2), atol=1e-5, rtol=1e-5)


def page_views(b=2, nk=100, h=4, d=64, dtype=torch.float32, device="cpu", seed=0):
    """``k, v [B, Nk, H, D]`` as a split context reads them: views of two adjacent slots of one
    layer of a store page ``[2, L, B, P, N, H, D]`` (strided over the batch)."""
    gen = torch.Generator().manual_seed(seed)
    page = torch.randn(2, 3, b, 4, nk // 2, h, d, generator=gen).to(device=device, dtype=dtype)
    return page[0, 1, :, 1:3].flatten(1, 2), page[1, 1, :, 1:3].flatten(1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("nq", "d"), [(77, 128), (64, 64)])  # 77: not a multiple of any kernel's tile
@pytest.mark.parametrize("stored", [False, True], ids=["contiguous", "page-views"])
def test_sdpa_attend_lse_on_cuda_with_each_kernel(kernel, dtype, nq, d, stored):
    """Each fused kernel's log-sum-exp comes back in ``[B, Nq, H]`` (cuDNN's trailing unit
    dimension and the efficient kernel's padded queries removed), equal to the reference, also
    over keys and values read in place from a store page."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = make_qkv(nq=nq, nk=100, h=4, d=d, dtype=dtype, device="cuda")
    if stored:
        k, v = page_views(h=4, d=d, dtype=dtype, device="cuda")
    with sdpa_kernel([getattr(SDPBackend, kernel)]):
        out, lse = SdpaBackend().attend_lse(q, k, v)
    q64, k64 = (t.double().transpose(1, 2) for t in (q, k))
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(d)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    ref = reference_attention(q, k, v)
    assert float((out.double() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1).transpose(1, 2), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_by_lse_on_cuda_rounds_once_and_equals_attention_over_the_union(dtype):
    """On the GPU, three parts of one SDPA call each (sink-like page views, the rest contiguous),
    merged: the float32 accumulation rounded once to the outputs' dtype, bit for bit, and the
    attention over all the keys to the dtype's precision."""
    from packforcing.attention.merge import merge_by_lse

    q, k, v = make_qkv(nq=77, nk=100, h=4, d=64, dtype=dtype, device="cuda")
    pk, pv = page_views(h=4, d=64, dtype=dtype, device="cuda")
    parts = [SdpaBackend().attend_lse(q, *kv) for kv in ((pk, pv), (k[:, :60], v[:, :60]), (k[:, 60:], v[:, 60:]))]
    merged = merge_by_lse(parts)
    weights = torch.softmax(torch.stack([lse for _, lse in parts]).float(), dim=0)[..., None]
    accumulated = parts[0][0] * weights[0]
    for (out, _), weight in zip(parts[1:], weights[1:], strict=True):
        accumulated.addcmul_(out, weight)
    assert merged.dtype == dtype and torch.equal(merged, accumulated.to(dtype))
    ref = reference_attention(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1))
    assert float((merged.double() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("kernels", [("math",), ("cudnn", "flash"), ("efficient",)])
def test_sdpa_kernels_in_order_of_preference_fall_back_to_math(kernels):
    """Any preference works on any device (math is always allowed last): the result is the
    reference, with and without the log-sum-exp."""
    from packforcing.attention.backends import SdpaParams

    backend = SdpaBackend(SdpaParams(kernels=kernels))
    q, k, v = make_qkv()
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(backend.attend(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backend.attend_lse(q, k, v)[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_sdpa_kernels_math_only_really_uses_math():
    """The preference reaches SDPA: with ``[math]`` the log-sum-exp comes from the math
    reference, not the fused CPU kernel."""
    from unittest import mock

    from packforcing.attention import backends
    from packforcing.attention.backends import SdpaParams

    q, k, v = make_qkv()
    with mock.patch.object(backends, "_math_lse", wraps=backends._math_lse) as math_lse:
        SdpaBackend(SdpaParams(kernels=("math",))).attend_lse(q, k, v)
        assert math_lse.call_count == 1
        SdpaBackend().attend_lse(q, k, v)
        assert math_lse.call_count == 1  # left to choose, SDPA takes its fused CPU kernel


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["fast"], "a non-empty list of distinct kernels out of cudnn, flash, efficient, math, got ['fast']"),
        ([], "a non-empty list of distinct kernels out of cudnn, flash, efficient, math, got []"),
        (["flash", "flash"], "a non-empty list of distinct kernels out of .*, got ['flash', 'flash']"),
        ("flash", "a list or null, got 'flash'"),
    ],
)
def test_sdpa_kernels_are_validated_with_their_key_path(value, expected):
    import re

    from packforcing.core.errors import ConfigError

    from .helpers import engine_for

    pattern = "backend\\.kernels: expected " + re.escape(expected).replace(re.escape(".*"), ".*")
    with pytest.raises(ConfigError, match=pattern):
        engine_for({"name": "full"}, backend={"name": "sdpa", "kernels": value})


def test_sdpa_attend_lse_survives_a_torch_without_the_private_operators(monkeypatch):
    """``attend_lse`` reaches SDPA's kernels through private operators; a torch without them
    gets the math reference, not an error."""
    q, k, v = make_qkv()
    monkeypatch.delattr(torch, "_fused_sdp_choice")
    out, lse = SdpaBackend().attend_lse(q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert lse.shape == q.shape[:3]
