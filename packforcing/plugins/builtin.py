"""packforcing's own components, registered through the same hooks as any plugin."""

from __future__ import annotations

from packforcing.attention.backends import SdpaBackend, XformersBackend, pick_backend
from packforcing.models.geometry_only import GeometryOnlyModel, GeometryParams
from packforcing.models.tiny_dit import TinyDiT, TinyDiTParams
from packforcing.plugins.factory import ComponentFactory, no_params
from packforcing.plugins.hookspecs import hookimpl
from packforcing.policies.presets import (
    FullParams,
    SinkRecentParams,
    SlidingWindowParams,
    build_tiered,
    preset_builder,
)
from packforcing.policies.tiered import TieredParams
from packforcing.positional.identity import IdentityRealigner


def _tiny_dit(params: TinyDiTParams, env) -> TinyDiT:
    dtype_name = str(env.dtype).removeprefix("torch.")
    return TinyDiT(params, dtype=dtype_name).to(device=env.device, dtype=env.dtype)


@hookimpl
def packforcing_models():
    return {
        "tiny_dit": ComponentFactory(TinyDiTParams, _tiny_dit, "small Wan-like causal DiT defined in code"),
        "geometry": ComponentFactory(
            GeometryParams,
            lambda p, env: GeometryOnlyModel(p, str(env.dtype).removeprefix("torch.")),
            "shapes only, for memory planning at real scale",
        ),
    }


@hookimpl
def packforcing_attention_backends():
    return {
        "sdpa": no_params(lambda env: SdpaBackend(), "torch scaled_dot_product_attention (any device)"),
        "xformers": no_params(lambda env: XformersBackend(), "xformers memory_efficient_attention (CUDA)"),
        "auto": no_params(lambda env: pick_backend(env.device, env.dtype), "xformers on CUDA fp16/bf16, else sdpa"),
    }


@hookimpl
def packforcing_realigners():
    return {"identity": no_params(lambda env: IdentityRealigner(), "keep stored (absolute) positions")}


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
    }
