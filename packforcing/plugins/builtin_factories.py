"""The factories of packforcing's built-in components that need a build function of their own
(the models, ``dual_branch``, ``auto``, the policy presets, the samplers).

:mod:`packforcing.plugins.builtin` registers them by import path, with their descriptions; this
module, which imports the components (and torch), is imported only when one of them is used.
"""

from __future__ import annotations

from packforcing.attention.backends import pick_backend
from packforcing.compressors.dual_branch import DualBranchCompressor, DualBranchParams
from packforcing.core.errors import ParamError
from packforcing.core.sampler import EulerSampler, SelfForcingSampler
from packforcing.models.geometry_only import GeometryOnlyModel, GeometryParams
from packforcing.models.tiny_dit import TinyDiT, TinyDiTParams
from packforcing.models.wan.params import WanParams
from packforcing.plugins.factory import ComponentFactory, no_params
from packforcing.policies.packforcing import PackForcingParams, build_packforcing
from packforcing.policies.presets import (
    FullParams,
    SinkRecentParams,
    SlidingWindowParams,
    build_tiered,
    preset_builder,
)
from packforcing.policies.tiered import TieredParams


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


WAN = ComponentFactory(WanParams, _wan)
TINY_DIT = ComponentFactory(TinyDiTParams, _tiny_dit)
GEOMETRY = ComponentFactory(GeometryParams, lambda p, env: GeometryOnlyModel(p, str(env.dtype).removeprefix("torch.")))
AUTO = no_params(lambda env: pick_backend(env.device, env.dtype))


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


DUAL_BRANCH = ComponentFactory(DualBranchParams, _dual_branch)
TIERED = ComponentFactory(TieredParams, build_tiered)
FULL = ComponentFactory(FullParams, preset_builder("full"))
SLIDING_WINDOW = ComponentFactory(SlidingWindowParams, preset_builder("sliding_window"))
SINK_RECENT = ComponentFactory(SinkRecentParams, preset_builder("sink_recent"))
PACKFORCING = ComponentFactory(PackForcingParams, build_packforcing)
EULER = ComponentFactory.from_class(EulerSampler, "")
SELF_FORCING = ComponentFactory.from_class(SelfForcingSampler, "")
