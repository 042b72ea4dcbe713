"""packforcing's own components, registered through the same hooks as any plugin.

Most are registered as classes (parameters, build and description come from the class); the
models, ``dual_branch``, ``auto`` and the policy presets need a build function of their own and
register a :class:`ComponentFactory`."""

from __future__ import annotations

from packforcing.attention.backends import SdpaBackend, XformersBackend, pick_backend
from packforcing.compressors.dual_branch import DualBranchCompressor, DualBranchParams
from packforcing.compressors.pool import PoolCompressor
from packforcing.core.errors import ParamError
from packforcing.core.sampler import EulerSampler, SelfForcingSampler
from packforcing.models.geometry_only import GeometryOnlyModel, GeometryParams
from packforcing.models.tiny_dit import TinyDiT, TinyDiTParams
from packforcing.models.wan.params import WanParams
from packforcing.plugins.factory import ComponentFactory, no_params
from packforcing.plugins.hookspecs import hookimpl
from packforcing.policies.packforcing import PackForcingParams, build_packforcing
from packforcing.policies.presets import (
    FullParams,
    SinkRecentParams,
    SlidingWindowParams,
    build_tiered,
    preset_builder,
)
from packforcing.policies.tiered import TieredParams
from packforcing.positional.identity import IdentityRealigner
from packforcing.positional.temporal_shift import TemporalRopeShift
from packforcing.selectors.recency import RecencySelector
from packforcing.selectors.topk import TopKSelector


def _tiny_dit(params: TinyDiTParams, env) -> TinyDiT:
    dtype_name = str(env.dtype).removeprefix("torch.")
    source = env.config.source if env.config is not None else None
    if env.plan_only:  # weightless (meta-device) model: planning a full-size model is instant
        return TinyDiT(params, dtype=dtype_name, config_source=source, plan_only=True).to(dtype=env.dtype)
    return TinyDiT(params, dtype=dtype_name, config_source=source).to(device=env.device, dtype=env.dtype)


def _wan(params: WanParams, env):
    try:  # imports diffusers: only when a wan model is built
        from packforcing.models.wan.adapter import build_wan
    except ImportError as exc:
        raise ParamError(
            "name", f"model wan needs the optional 'wan' dependencies (pip install 'packforcing[wan]'): {exc}"
        ) from None
    return build_wan(params, env)


@hookimpl
def packforcing_models():
    return {
        "wan": ComponentFactory(WanParams, _wan, "Wan2.1 / Self-Forcing transformer through diffusers (extra: wan)"),
        "tiny_dit": ComponentFactory(TinyDiTParams, _tiny_dit, "small Wan-like causal DiT defined in code"),
        "geometry": ComponentFactory(
            GeometryParams,
            lambda p, env: GeometryOnlyModel(p, str(env.dtype).removeprefix("torch.")),
            "shapes only, for memory planning at real scale",
        ),
    }


@hookimpl
def packforcing_backends():
    return {
        "sdpa": SdpaBackend,
        "xformers": XformersBackend,
        "auto": no_params(lambda env: pick_backend(env.device, env.dtype), "xformers on CUDA fp16/bf16, else sdpa"),
    }


@hookimpl
def packforcing_realigners():
    return {"identity": IdentityRealigner, "temporal_rope_shift": TemporalRopeShift}


def _dual_branch(params: DualBranchParams, env) -> DualBranchCompressor:
    model = env.model
    return DualBranchCompressor(
        params,
        hidden_size=model.hidden_size,
        latent_channels=model.geometry.latent_channels,
        patch=model.geometry.patch,
        device=env.device,
        dtype=env.dtype,
        config_source=env.config.source if env.config is not None else None,
        lazy=env.plan_only,
    )


@hookimpl
def packforcing_compressors():
    return {
        "dual_branch": ComponentFactory(
            DualBranchParams, _dual_branch, "PackForcing's trained HR-conv + LR pool/VAE/patch compressor (32x)"
        ),
        "pool": PoolCompressor,
    }


@hookimpl
def packforcing_selectors():
    return {"topk": TopKSelector, "recency": RecencySelector}


@hookimpl
def packforcing_policies():
    return {
        "tiered": ComponentFactory(TieredParams, build_tiered, "ordered tiers: the general form"),
        "full": ComponentFactory(FullParams, preset_builder("full"), "keep every block"),
        "sliding_window": ComponentFactory(
            SlidingWindowParams, preset_builder("sliding_window"), "the last window_frames frames"
        ),
        "sink_recent": ComponentFactory(
            SinkRecentParams, preset_builder("sink_recent"), "first sink_frames + last window_frames"
        ),
        "packforcing": ComponentFactory(
            PackForcingParams, build_packforcing, "sink + compressed, selected mid bank + recent (the paper)"
        ),
    }


@hookimpl
def packforcing_samplers():
    return {
        "euler": ComponentFactory.from_class(
            EulerSampler, "Euler steps over shifted flow-matching noise levels (default)"
        ),
        "self_forcing": ComponentFactory.from_class(
            SelfForcingSampler, "Self-Forcing's few-step sampler: predict x0, re-noise with fresh seeded noise"
        ),
    }
