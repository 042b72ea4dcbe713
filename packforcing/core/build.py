"""Resolving a config into live components through the plugin registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from packforcing.core.config import Config, load_config
from packforcing.core.engine import GenerationEngine
from packforcing.core.errors import ConfigError
from packforcing.core.geometry import Geometry, resolve_dtype
from packforcing.core.interfaces import AttentionBackend, BlockModel, Compressor, PositionalRealigner, Selector
from packforcing.core.records import MemoryPlan
from packforcing.core.structure import structure


@attrs.define
class BuildEnv:
    """What a component factory may use: the parts built before it (model first, policy last)."""

    registry: Any
    device: torch.device
    dtype: torch.dtype
    config: Config | None = None
    geometry: Geometry | None = None
    model: BlockModel | None = None
    backend: AttentionBackend | None = None
    realigner: PositionalRealigner | None = None
    selector: Selector | None = None
    compressor: Compressor | None = None
    plan_only: bool = False
    """True when building for the memory planner: models may skip their weights."""

    def build(self, kind: str, block: Mapping[str, Any] | str, path: str) -> Any:
        """Build a nested component (e.g. a tier's own compressor) from ``{name: ..., **params}``."""
        if isinstance(block, str):
            block = {"name": block}
        name = block.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"expected a mapping with a 'name', got {dict(block)!r}", path=path)
        try:
            factory = self.registry.factory(kind, name)
        except LookupError as exc:
            raise ConfigError(str(exc.args[0]), path=f"{path}.name") from None
        params = structure(factory.params, {k: v for k, v in block.items() if k != "name"}, path)
        return factory.build(params, self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


Wrap = Callable[[str, Any], Any]
"""``wrap(kind, component) -> component``: composes around each built component (e.g. timing)."""


def _environment(config: Config, registry: Any, *, plan_only: bool = False, wrap: Wrap | None = None) -> BuildEnv:
    env = BuildEnv(
        registry=registry,
        device=resolve_device(config.run.device) if not plan_only else torch.device("cpu"),
        dtype=resolve_dtype(config.run.dtype),
        config=config,
        plan_only=plan_only,
    )
    for key, attr in (
        ("model", "model"),
        ("attention", "backend"),
        ("positional", "realigner"),
        ("selector", "selector"),
        ("compressor", "compressor"),
    ):
        spec = config.components.get(key)
        if spec is None:
            continue
        try:
            component = registry.factory(key, spec.name).build(spec.params, env)
        except ConfigError as exc:
            raise exc.located(config.source) from None
        except ValueError as exc:
            raise ConfigError(str(exc), source=config.source, path=key) from None
        if wrap is not None:
            component = wrap(key, component)
        setattr(env, attr, component)
        if key == "model":
            env.geometry = component.geometry
    return env


def _policy(config: Config, env: BuildEnv) -> Any:
    spec = config.components["policy"]
    assert spec is not None
    try:
        return env.registry.factory("policy", spec.name).build(spec.params, env)
    except ConfigError as exc:
        raise ConfigError(exc.message, source=exc.source or config.source, path=_under("policy", exc.path)) from None
    except ValueError as exc:
        message = str(exc)
        head, sep, rest = message.partition(": ")
        if sep and " " not in head:
            raise ConfigError(rest, source=config.source, path=f"policy.{head}") from None
        raise ConfigError(message, source=config.source, path="policy") from None


def _under(prefix: str, path: str | None) -> str:
    if not path:
        return prefix
    return path if path.startswith(prefix) else f"{prefix}.{path}"


def build_engine(
    config: Config | Mapping[str, Any] | str, *, registry: Any = None, wrap: Wrap | None = None
) -> GenerationEngine:
    """A ready :class:`GenerationEngine` for ``config`` (a :class:`Config`, mapping or YAML path).

    ``wrap(kind, component)``, if given, may return a wrapper for each component as it is built
    (kinds: the config keys, ``"policy"`` last), e.g. :mod:`packforcing.core.instrument`'s timers.
    """
    if registry is None:
        from packforcing.plugins.manager import default_registry

        registry = default_registry()
    if not isinstance(config, Config):
        config = load_config(config, registry=registry)
    env = _environment(config, registry, wrap=wrap)
    policy = _policy(config, env)
    if wrap is not None:
        policy = wrap("policy", policy)
    assert env.model is not None
    engine = GenerationEngine(env.model, policy, config.sampler, device=env.device, dtype=env.dtype)
    engine.config = config
    return engine


def plan(
    config: Config | Mapping[str, Any] | str,
    seconds: float | None = None,
    fps: float = 16.0,
    *,
    num_blocks: int | None = None,
    pixel_frames_per_latent: int = 4,
    registry: Any = None,
) -> MemoryPlan:
    """Planned cache tokens/bytes per tier for ``seconds`` of video at ``fps`` (or ``num_blocks``),
    from the geometry alone: nothing is allocated and models skip their weights."""
    if registry is None:
        from packforcing.plugins.manager import default_registry

        registry = default_registry()
    if not isinstance(config, Config):
        config = load_config(config, registry=registry)
    env = _environment(config, registry, plan_only=True)
    policy = _policy(config, env)
    assert env.geometry is not None
    if num_blocks is None:
        if seconds is None:
            raise ValueError("give seconds or num_blocks")
        frames = env.geometry.latent_frames(seconds, fps, pixel_frames_per_latent)
        num_blocks = -(-frames // env.geometry.frames_per_block)
    return policy.plan(num_blocks, batch_size=config.run.batch_size)
