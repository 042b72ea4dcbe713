"""``geometry``: a model that only declares shapes, for planning memory at real scales.

It lets ``packforcing plan`` size the cache of, say, Wan2.1-1.3B without building or
downloading it. Generating with it is an error.
"""

from __future__ import annotations

import attrs

from packforcing.core.geometry import Geometry
from packforcing.core.rope import Rope3D
from packforcing.core.validators import int_tuple, positive, positive_triple


@attrs.frozen
class GeometryParams:
    """Shapes of a model (YAML ``model: {name: geometry, ...}``)."""

    latent_height: int = attrs.field(validator=positive)
    latent_width: int = attrs.field(validator=positive)
    num_layers: int = attrs.field(validator=positive)
    num_heads: int = attrs.field(validator=positive)
    head_dim: int = attrs.field(validator=positive)
    latent_channels: int = attrs.field(default=16, validator=positive)
    patch: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=int_tuple, validator=positive_triple)
    frames_per_block: int = attrs.field(default=4, validator=positive)
    hidden_size: int | None = None
    pixel_frames_per_latent: int = attrs.field(default=4, validator=positive)
    """The VAE's temporal stride (Wan: 4): how ``plan --seconds`` counts latent frames."""

    def cannot_generate(self) -> str | None:
        """Why this model cannot generate (it has shapes, no weights)."""
        return "model geometry only describes shapes, for planning memory (use a real model such as wan)"


class GeometryOnlyModel:
    """Satisfies the shape side of :class:`~packforcing.core.interfaces.BlockModel`."""

    codec = None

    def __init__(self, params: GeometryParams, dtype: str) -> None:
        self.geometry = Geometry(
            latent_height=params.latent_height,
            latent_width=params.latent_width,
            num_layers=params.num_layers,
            num_heads=params.num_heads,
            head_dim=params.head_dim,
            latent_channels=params.latent_channels,
            patch=params.patch,
            frames_per_block=params.frames_per_block,
            dtype=dtype,
        )
        self.hidden_size = params.hidden_size or params.num_heads * params.head_dim
        self.pixel_frames_per_latent = params.pixel_frames_per_latent
        self.rope = Rope3D(params.head_dim)

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("model 'geometry' only describes shapes (for planning); it cannot generate")

    encode_condition = denoise = clean_kv = project_kv = _refuse
