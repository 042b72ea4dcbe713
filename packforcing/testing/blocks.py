"""Builders for test inputs: small models, build environments, blocks and commits with K/V.

Plain functions (no Hypothesis), shared by :mod:`packforcing.testing.strategies` and
:mod:`packforcing.testing.checks`. All tensors come from a seeded generator, so the same
arguments give the same bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from packforcing.core.build import BuildEnv
from packforcing.core.errors import ConfigError
from packforcing.core.geometry import Geometry, Grid, as_grid
from packforcing.core.records import FULL, BlockCommit, BlockQuery, CachedBlock
from packforcing.core.structure import structure
from packforcing.plugins.factory import ComponentFactory, as_factory
from packforcing.plugins.kinds import KINDS

__all__ = ["build_component", "make_block", "make_commit", "make_env", "random_kv", "tiny_model"]


def tiny_model(geometry: Geometry, *, seed: int = 0, device: torch.device | str = "cpu") -> Any:
    """The built-in ``tiny_dit`` with exactly ``geometry``'s shapes (seeded random weights)."""
    from packforcing.models.tiny_dit import TinyDiT, TinyDiTParams

    g = geometry
    params = TinyDiTParams(
        latent_channels=g.latent_channels,
        latent_height=g.latent_height,
        latent_width=g.latent_width,
        patch=g.patch,
        frames_per_block=g.frames_per_block,
        hidden_size=g.num_heads * g.head_dim,
        num_heads=g.num_heads,
        num_layers=g.num_layers,
        seed=seed,
    )
    return TinyDiT(params, dtype=g.dtype).to(device=device, dtype=g.torch_dtype)


def build_component(factory: Any, params: Any, env: BuildEnv, what: str = "component", base: type | None = None) -> Any:
    """Build ``factory`` with ``params`` in ``env``.

    ``factory``: a component class (a subclass of ``base``, as a hook would return it), a
    registered name (``"tiered"``, looked up in ``env.registry`` as the kind of ``base``), a
    :class:`ComponentFactory` (or a registry entry holding one), an instance of ``base`` (used as
    is) or a callable ``env -> component``. ``params``: ``None`` for the defaults, a mapping as
    written in YAML, or a params instance."""
    if isinstance(factory, str):
        key = next((k.name for k in KINDS if base is not None and k.base_class() is base), what)
        factory = env.registry.factory(key, factory)
    factory = getattr(factory, "factory", factory)  # a registry ``Provided``
    if isinstance(factory, type) and (base is None or issubclass(factory, base)):
        name = _class_name(factory, base)
        factory = as_factory(name, factory, base).named(name)
    if isinstance(factory, ComponentFactory):
        if params is None or isinstance(params, dict):
            try:
                params = structure(factory.params, params or {}, what)
            except ConfigError as exc:
                raise ValueError(f"cannot build the {what} from its parameters: {exc}") from None
        return factory.create(params, env)
    if params is not None:
        raise TypeError(f"params given, but {factory!r} is not a component class or a ComponentFactory")
    if base is not None and isinstance(factory, base):
        return factory
    if callable(factory):
        return factory(env)
    return factory


def _class_name(cls: type, base: type | None) -> str:
    """The name a class checked without a registry key goes by: its own ``name``, or its class
    name when it only inherits the interface's placeholder (``"abstract"``)."""
    name = getattr(cls, "name", None)
    placeholder = getattr(base, "name", None) if base is not None else None
    return name if isinstance(name, str) and name and name != placeholder else cls.__name__


def make_env(
    geometry: Geometry,
    *,
    model: Any = None,
    registry: Any = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    **parts: Any,
) -> BuildEnv:
    """A :class:`BuildEnv` around a ``tiny_dit`` of ``geometry`` with the SDPA backend and the
    ``identity`` realigner; ``parts`` (``selector=``, ``compressor=``, ``realigner=``,
    ``backend=``) replace or add components."""
    from packforcing.attention.backends import SdpaBackend
    from packforcing.positional.identity import IdentityRealigner

    if registry is None:
        from packforcing.plugins.manager import default_registry

        registry = default_registry()
    model = model if model is not None else tiny_model(geometry, seed=seed, device=device)
    env = BuildEnv(
        registry=registry,
        device=torch.device(device),
        dtype=geometry.torch_dtype,
        geometry=model.geometry,
        model=model,
        backend=SdpaBackend(),
        realigner=IdentityRealigner(),
    )
    for name, value in parts.items():
        if not hasattr(env, name):
            raise TypeError(f"BuildEnv has no part {name!r}")
        if value is not None:
            setattr(env, name, value)
    return env


def random_kv(
    geometry: Geometry,
    tokens: int,
    *,
    batch_size: int = 1,
    seed: int = 0,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values ``[B, tokens, H, D]`` from a seeded normal distribution."""
    g = geometry
    gen = torch.Generator().manual_seed(seed)
    shape = (g.num_layers, 2, batch_size, tokens, g.num_heads, g.head_dim)
    kv = (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(
        device=device, dtype=dtype or g.torch_dtype
    )
    return [kv[i, 0] for i in range(g.num_layers)], [kv[i, 1] for i in range(g.num_layers)]


def _latents(geometry: Geometry, batch_size: int, seed: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    g = geometry
    gen = torch.Generator().manual_seed(seed + 7919)
    shape = (batch_size, g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def make_block(
    geometry: Geometry,
    *,
    block_id: int = 0,
    batch_size: int = 1,
    grid: Grid | None = None,
    position: float | None = None,
    temporal_stride: float | None = None,
    hw_stride: float = 1.0,
    fidelity: str = FULL,
    latents: bool | torch.Tensor = True,
    keys: list[torch.Tensor] | None = None,
    values: list[torch.Tensor] | None = None,
    seed: int = 0,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> CachedBlock:
    """A :class:`CachedBlock` as a tier would hold it: K/V (random unless given) at its absolute
    position ``block_id * frames_per_block`` unless ``position`` is given."""
    g = geometry
    block_grid = as_grid(grid) if grid is not None else g.block_grid
    t, h, w = block_grid
    tokens = t * h * w
    if keys is None or values is None:
        keys, values = random_kv(g, tokens, batch_size=batch_size, seed=seed, scale=scale, device=device)
    batch_size = keys[0].shape[0]
    dtype = keys[0].dtype
    clean: torch.Tensor | None
    if isinstance(latents, torch.Tensor):
        clean = latents
    else:
        clean = _latents(g, batch_size, seed, device, dtype) if latents else None
    start = block_id * g.frames_per_block
    return CachedBlock.from_tensors(
        keys,
        values,
        latents=clean,
        block_id=block_id,
        start_frame=start,
        num_frames=g.frames_per_block,
        fidelity=fidelity,
        grid=block_grid,
        position=float(start) if position is None else float(position),
        temporal_stride=float(g.patch[0]) if temporal_stride is None else float(temporal_stride),
        hw_stride=float(hw_stride),
    )


def make_query(geometry: Geometry, block_id: int) -> BlockQuery:
    g = geometry
    return BlockQuery(block_id, block_id * g.frames_per_block, g.frames_per_block, g.block_grid)


def make_commit(
    geometry: Geometry,
    block_id: int,
    *,
    batch_size: int = 1,
    position: float | None = None,
    seed: int = 0,
    latents: bool = True,
    device: torch.device | str = "cpu",
) -> BlockCommit:
    """What the engine hands a policy after block ``block_id``'s clean pass (random K/V)."""
    g = geometry
    keys, values = random_kv(g, g.tokens_per_block, batch_size=batch_size, seed=seed, device=device)
    start = block_id * g.frames_per_block
    return BlockCommit(
        block_id=block_id,
        start_frame=start,
        num_frames=g.frames_per_block,
        grid=g.block_grid,
        position=float(start) if position is None else float(position),
        keys=keys,
        values=values,
        latents=_latents(g, batch_size, seed, device, g.torch_dtype) if latents else None,
    )
