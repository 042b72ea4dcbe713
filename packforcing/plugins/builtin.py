"""packforcing's own components, registered through the same hooks as any plugin.

Each is registered by import path with its one-line description (a
:class:`~packforcing.plugins.factory.LazyFactory`): its module, and torch, are imported only when
a config uses it, so ``packforcing plugins`` lists them without importing either. Components
registered as classes take their parameters and build from the class (their description is the
docstring's first line, checked by the tests); the models, ``dual_branch``, ``auto``, the policy
presets and the samplers have a :class:`~packforcing.plugins.factory.ComponentFactory` in
:mod:`packforcing.plugins.builtin_factories`.
"""

from __future__ import annotations

from packforcing.plugins.factory import LazyFactory
from packforcing.plugins.hookspecs import hookimpl

_FACTORIES = "packforcing.plugins.builtin_factories"


def _lazy(target: str, description: str) -> LazyFactory:
    module, _, attr = target.partition(":")
    return LazyFactory(f"{module or _FACTORIES}:{attr}", description)


@hookimpl
def packforcing_models():
    return {
        "wan": _lazy(":WAN", "Wan2.1 / Self-Forcing transformer through diffusers (extra: wan)"),
        "tiny_dit": _lazy(":TINY_DIT", "small Wan-like causal DiT defined in code"),
        "geometry": _lazy(":GEOMETRY", "shapes only, for memory planning at real scale"),
    }


@hookimpl
def packforcing_backends():
    return {
        "sdpa": _lazy(
            "packforcing.attention.backends:SdpaBackend",
            "torch.nn.functional.scaled_dot_product_attention; any device and dtype.",
        ),
        "xformers": _lazy(
            "packforcing.attention.backends:XformersBackend",
            "xformers.ops.memory_efficient_attention (CUDA, fp16/bf16).",
        ),
        "auto": _lazy(":AUTO", "sdpa, left to pick its fused kernel (faster than xformers on an H100, measured)"),
    }


@hookimpl
def packforcing_realigners():
    return {
        "identity": _lazy(
            "packforcing.positional.identity:IdentityRealigner",
            "Absolute positions, no rotation (Self-Forcing's rolling cache, full cache).",
        ),
        "temporal_rope_shift": _lazy(
            "packforcing.positional.temporal_shift:TemporalRopeShift",
            "Packs the context contiguously; rotates temporal bands from home positions.",
        ),
    }


@hookimpl
def packforcing_compressors():
    return {
        "dual_branch": _lazy(":DUAL_BRANCH", "PackForcing's trained HR-conv + LR pool/VAE/patch compressor (32x)"),
        "pool": _lazy(
            "packforcing.compressors.pool:PoolCompressor",
            "Training-free, RoPE-aware average pooling of K/V over a token window.",
        ),
    }


@hookimpl
def packforcing_selectors():
    return {
        "topk": _lazy(
            "packforcing.selectors.topk:TopKSelector", "Top-k blocks by mean attention logit of sampled queries."
        ),
        "recency": _lazy(
            "packforcing.selectors.recency:RecencySelector",
            "The newest k candidates, whatever the queries (one choice for every layer).",
        ),
    }


@hookimpl
def packforcing_policies():
    return {
        "tiered": _lazy(":TIERED", "ordered tiers: the general form"),
        "full": _lazy(":FULL", "keep every block"),
        "sliding_window": _lazy(":SLIDING_WINDOW", "the last window_frames frames"),
        "sink_recent": _lazy(":SINK_RECENT", "first sink_frames + last window_frames"),
        "packforcing": _lazy(":PACKFORCING", "sink + compressed, selected mid bank + recent (the paper)"),
    }


@hookimpl
def packforcing_samplers():
    return {
        "euler": _lazy(":EULER", "Euler steps over shifted flow-matching noise levels (default)"),
        "self_forcing": _lazy(
            ":SELF_FORCING", "Self-Forcing's few-step sampler: predict x0, re-noise with fresh seeded noise"
        ),
    }
