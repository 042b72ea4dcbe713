"""Resolving a config into live components through the plugin registry."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from packforcing.core.boundary import Origin
from packforcing.core.config import Config, load_config
from packforcing.core.engine import GenerationEngine
from packforcing.core.errors import ConfigError, PluginError
from packforcing.core.freeing import freed_on_error
from packforcing.core.geometry import Geometry, resolve_dtype, temporal_stride_of
from packforcing.core.interfaces import (
    AttentionBackend,
    BlockModel,
    CachePolicy,
    Compressor,
    PositionalRealigner,
    Selector,
)
from packforcing.core.records import MemoryPlan
from packforcing.core.sampler import Sampler
from packforcing.core.structure import show, structure
from packforcing.core.threads import apply_threads
from packforcing.plugins.kinds import KINDS


@attrs.define
class BuildEnv:
    """What a component factory may use: the parts built before it (model first, policy last).

    After everything is built, any component (or its params object) that defines
    ``validate(env)`` is called with the finished environment (``env.policy`` set too): that is
    the place for checks across components, e.g. a selector's ``k`` against the capacity of the
    tier it selects from. Raise :class:`~packforcing.core.errors.ParamError` with the key path
    (relative to the component, or absolute such as ``"selector.k"``) and the problem, and the
    user sees one line naming the file and key path.
    """

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
    sampler: Sampler | None = None
    policy: CachePolicy | None = None
    plan_only: bool = False
    """True when building for the memory planner: models may skip their weights."""
    built: list[tuple[str, Any, Any]] = attrs.field(factory=list, repr=False)
    """``(key path, component, params)`` of everything built, unwrapped, in build order."""
    origins: dict[str, Origin] = attrs.field(factory=dict, repr=False)
    """Key path → which plugin (kind, name, distribution) was built there, for error messages."""

    def _provided(self, kind: str, name: str, path: str) -> Any:
        """The registry's factory for ``name``, recording its distribution under ``path``."""
        get = getattr(self.registry, "get", None)
        if get is None:  # a minimal registry that only has factory()
            return self.registry.factory(kind, name)
        provided = get(kind, name)
        self.origins[path] = Origin(kind, provided.name, provided.dist)
        return provided.factory

    def create(self, factory: Any, params: Any, path: str) -> Any:
        """``factory.create(params, self)`` for the component at key ``path``. A ``ValueError``
        (a parameter problem, reported at ``path`` by the caller) and a
        :class:`~packforcing.core.errors.PluginError` (a plugin it called, already named) pass
        through; any other exception the plugin raises becomes a ``PluginError`` naming it
        (kind, name, distribution), with the exception chained."""
        try:
            return factory.create(params, self)
        except (ValueError, PluginError):
            raise
        except Exception as exc:  # a plugin may raise anything; KeyboardInterrupt passes through
            origin = self.origins.get(path)
            if origin is None:
                raise
            raise origin.raised(exc) from exc

    def build(self, kind: str, block: Mapping[str, Any] | str, path: str) -> Any:
        """Build a nested component (e.g. a tier's own compressor) from ``{name: ..., **params}``."""
        if isinstance(block, str):
            block = {"name": block}
        name = block.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"expected a mapping with a 'name', got {show(dict(block))}", path=path)
        try:
            factory = self._provided(kind, name, path)
        except LookupError as exc:
            raise ConfigError(str(exc.args[0]), path=f"{path}.name") from None
        params = structure(factory.params, {k: v for k, v in block.items() if k != "name"}, path, f"{kind} {name!r}")
        try:
            component = self.create(factory, params, path)
        except ValueError as exc:  # ParamError / ConfigError included
            raise _config_error(exc, path) from None
        self.built.append((path, component, params))
        return component

    def path_of(self, component: Any) -> str | None:
        """The key path ``component`` was built at (``"compressor"``, ``"policy.tiers[1].fidelity"``)."""
        return next((path for path, built, _ in self.built if built is component), None)


def _config_error(exc: ValueError, path: str) -> ConfigError:
    """A component's error as a :class:`ConfigError` under its key ``path``: a
    :class:`~packforcing.core.errors.ParamError` (any :class:`ConfigError`) keeps its own key path,
    taken relative to ``path`` unless absolute; any other ``ValueError`` is reported at ``path``."""
    if isinstance(exc, ConfigError):
        return exc.under(path)
    return ConfigError(" ".join(str(exc).split()), path=path)


def _registry(registry: Any) -> Any:
    """``registry``, or the process-wide default one."""
    if registry is not None:
        return registry
    from packforcing.plugins.manager import default_registry

    return default_registry()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


Wrap = Callable[[str, Any], Any]
"""``wrap(kind, component) -> component``: composes around each built component (e.g. timing)."""


def _locate(error: ConfigError, config: Config) -> ConfigError:
    return error.located(config.source_of(error.path))


def _environment(config: Config, registry: Any, *, plan_only: bool = False, wrap: Wrap | None = None) -> BuildEnv:
    device = resolve_device(config.run.device) if not plan_only else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        error = ConfigError(f"{config.run.device!r}: this torch build has no CUDA (use cpu or auto)", path="run.device")
        raise _locate(error, config)
    env = BuildEnv(
        registry=registry,
        device=device,
        dtype=resolve_dtype(config.run.dtype),
        config=config,
        plan_only=plan_only,
    )
    for kind in KINDS:
        key = kind.name
        if key == "policy":
            continue  # built last, by _policy, once every other kind is in the environment
        spec = config.components.get(key)
        if spec is None:
            continue
        try:
            component = env.create(env._provided(key, spec.name, key), spec.params, key)
        except ValueError as exc:  # ConfigError included
            raise _locate(_config_error(exc, key), config) from None
        env.built.append((key, component, spec.params))
        if wrap is not None:
            component = wrap(key, component)
        setattr(env, kind.name, component)
        if key == "model":
            env.geometry = component.geometry
    return env


def _policy(config: Config, env: BuildEnv) -> Any:
    spec = config.components["policy"]
    assert spec is not None
    try:
        policy = env.create(env._provided("policy", spec.name, "policy"), spec.params, "policy")
    except ValueError as exc:  # ParamError / ConfigError included
        raise _locate(_config_error(exc, "policy"), config) from None
    env.built.append(("policy", policy, spec.params))
    env.policy = policy
    _validate(config, env)
    return policy


def _validate(config: Config, env: BuildEnv) -> None:
    """Cross-component checks: ``validate(env)`` of every built component and params object."""
    for path, component, params in env.built:
        for obj in (params, component):
            check = getattr(obj, "validate", None)
            if not callable(check):
                continue
            try:
                check(env)
            except ValueError as exc:
                raise _locate(_config_error(exc, path), config) from None


def generation_blocker(config: Config) -> str | None:
    """Why ``config`` can plan memory but not generate (its model params' ``cannot_generate()``,
    e.g. a shapes-only model or a real model without weights), or ``None``."""
    spec = config.components.get("model")
    check = getattr(spec.params, "cannot_generate", None) if spec is not None else None
    return check() if callable(check) else None


@freed_on_error
def build_engine(
    config: Config | Mapping[str, Any] | str, *, registry: Any = None, wrap: Wrap | None = None
) -> GenerationEngine:
    """A ready :class:`GenerationEngine` for ``config`` (a :class:`Config`, mapping, YAML path or
    preset name). On the CPU it sets PyTorch's intra-op threads from ``run.threads``.

    ``wrap(kind, component)``, if given, may return a wrapper for each component as it is built
    (kinds: the config keys, ``"policy"`` last), e.g. :mod:`packforcing.core.instrument`'s timers.

    A build that fails (a refusal after the model is built included) drops what it built before
    the error reaches the caller, so that the error, however long it is kept, does not keep the
    model's memory (:func:`~packforcing.core.freeing.freed_on_error`); the error itself is unchanged.
    """
    registry = _registry(registry)
    if not isinstance(config, Config):
        config = load_config(config, registry=registry)
    blocker = generation_blocker(config)
    if blocker is not None:
        raise ConfigError(f"cannot generate: {blocker}", source=config.source_of("model"), path="model")
    env = _environment(config, registry, wrap=wrap)
    policy = _policy(config, env)
    if wrap is not None:
        policy = wrap("policy", policy)
    assert env.model is not None and env.sampler is not None and env.geometry is not None
    apply_threads(config.run.threads, env.geometry, env.device)
    return GenerationEngine(
        env.model, policy, env.sampler, device=env.device, dtype=env.dtype, config=config, backend=env.backend
    )


@freed_on_error
def build_for_planning(config: Config | Mapping[str, Any] | str, *, registry: Any = None) -> BuildEnv:
    """Every component of ``config`` built for planning (CPU, models without weights) and
    cross-checked; ``env.policy`` is the policy. Raises :class:`ConfigError` for any problem,
    having dropped what it built (as :func:`build_engine` does)."""
    registry = _registry(registry)
    if not isinstance(config, Config):
        config = load_config(config, registry=registry)
    env = _environment(config, registry, plan_only=True)
    _policy(config, env)
    return env


def check_config(config: Config | Mapping[str, Any] | str, *, registry: Any = None, conditions: bool = False) -> Config:
    """Load ``config``, build every component (plan-only) and plan one run of ``run.blocks``:
    returns the :class:`Config`, or raises the first :class:`ConfigError` — including a plan
    that needs more memory than the run's device has. With ``conditions``, the model (weightless)
    also checks the condition of every ``run.prompts`` segment it can without encoding text."""
    env = build_for_planning(config, registry=registry)
    assert env.config is not None and env.policy is not None
    if conditions and env.config.run.prompts:
        from packforcing.core.conditions import check_given_conditions

        check_given_conditions(env.model, env.config.run.prompts, None, env.config)
    try:
        planned = env.policy.plan(env.config.run.blocks, batch_size=env.config.run.batch_size)
    except ValueError as exc:
        raise _locate(_config_error(exc, "policy"), env.config) from None
    check_memory(planned, env, resolve_device(env.config.run.device))
    return env.config


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (host RAM for the CPU), or ``None`` if unknown."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    raise AssertionError


def check_memory(planned: MemoryPlan, env: BuildEnv, device: torch.device) -> None:
    """Refuse a plan whose cache needs more than ``device`` holds (the archive counts where it
    lives: on the host when ``archive_device`` puts it there), naming the key to blame:
    ``policy.page_blocks`` when the blocks themselves would fit and the preallocated pages do
    not, ``run.batch_size`` when one video's blocks would, ``run.blocks`` otherwise."""
    if env.config is None or env.geometry is None:
        return
    from packforcing.policies.tiered import archive_placement

    archive_on = device
    if planned.archive_device is not None:
        archive_on, _ = archive_placement(planned.archive_device, device)
    per_device = {device: (planned.bytes, planned.tokens)}
    if planned.archive.bytes:
        bytes_, tokens = per_device.get(archive_on, (0, 0))
        per_device[archive_on] = (bytes_ + planned.archive.bytes, tokens + planned.archive.tokens)
    for where, (total, tokens) in per_device.items():
        limit = device_memory(where)
        if limit is None or total <= limit:
            continue
        batch = env.config.run.batch_size
        held = tokens * env.geometry.bytes_per_token * batch
        if held <= limit:
            key = "policy.page_blocks"
        else:
            key = "run.batch_size" if batch > 1 and held // batch <= limit else "run.blocks"
        what = "the cache" if where == device else "the archive"
        videos = f" × {batch} videos" if batch > 1 else ""
        error = ConfigError(
            f"{what} would allocate {total} bytes ({_human(total)}) over {planned.num_blocks} blocks{videos}, "
            f"more than the {limit} bytes ({_human(limit)}) of {where.type} memory",
            path=key,
        )
        raise _locate(error, env.config)


def blocks_for(geometry: Geometry, seconds: float, fps: float, pixel_frames_per_latent: int = 4) -> int:
    """Blocks needed to cover ``seconds`` of video at ``fps`` (whole blocks, rounded up), counted
    as ``generate --seconds`` counts them (:func:`~packforcing.core.geometry.latent_frames_for`)."""
    frames = geometry.latent_frames(seconds, fps, pixel_frames_per_latent)
    return -(-frames // geometry.frames_per_block)


def plan(
    config: Config | Mapping[str, Any] | str,
    seconds: float | None = None,
    fps: float = 16.0,
    *,
    num_blocks: int | None = None,
    pixel_frames_per_latent: int | None = None,
    registry: Any = None,
) -> MemoryPlan:
    """Planned cache tokens/bytes per tier for ``seconds`` of video at ``fps`` (or ``num_blocks``),
    from the geometry alone: nothing is allocated and models skip their weights.
    ``pixel_frames_per_latent`` defaults to the model's own VAE stride, as ``generate`` uses."""
    env = build_for_planning(config, registry=registry)
    assert env.geometry is not None and env.policy is not None and env.config is not None
    if num_blocks is None:
        if seconds is None:
            raise ValueError("give seconds or num_blocks")
        stride = pixel_frames_per_latent or temporal_stride_of(env.model)
        num_blocks = blocks_for(env.geometry, seconds, fps, stride)
    return env.policy.plan(num_blocks, batch_size=env.config.run.batch_size)
