"""Token and byte geometry of a block-autoregressive video model.

Everything the cache needs to size itself lives here: how many tokens a latent frame
and a block become after patchifying, and how many bytes one cached token costs
(keys and values over every layer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs
import torch

from packforcing.core.validators import int_tuple, positive, positive_triple

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``"bfloat16"``) or a torch dtype to the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def _dtype_name(value: object) -> str:
    if isinstance(value, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == value:
                return name
    if isinstance(value, str) and value in DTYPES:
        return value
    raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(DTYPES)}")


Grid = tuple[int, int, int]
"""A token grid ``(t, h, w)``: temporal, height and width token counts."""


def as_grid(value: Iterable[int]) -> Grid:
    """``value`` (a tuple or a list from YAML) as a :data:`Grid`; a ``ValueError`` unless it has
    exactly three items."""
    items = tuple(value)
    if len(items) != 3:
        raise ValueError(f"expected a grid (t, h, w) of three integers, got {list(items)}")
    t, h, w = items
    return t, h, w


def latent_frames_for(seconds: float, fps: float, temporal_stride: int = 1) -> int:
    """Latent frames whose decoded video lasts at least ``seconds`` at ``fps`` (at least one).

    A causal video VAE decodes the first latent frame to one pixel frame and each later one to
    ``temporal_stride`` (Wan: ``1 + 4(F - 1)`` pixel frames), so ``seconds * fps`` pixel frames
    (rounded up) need ``1 + ceil((pixels - 1) / temporal_stride)`` latent frames. ``plan`` and
    ``generate`` both count with this, so ``--seconds`` means the same number of blocks in each."""
    pixels = max(1, math.ceil(seconds * fps - 1e-9))
    return 1 + math.ceil((pixels - 1) / temporal_stride)


def temporal_stride_of(model: object) -> int:
    """Pixel frames per latent frame after the first: the model's ``pixel_frames_per_latent``, else
    its codec's ``temporal_stride``, else 1 (a codec that decodes one frame per latent frame)."""
    stride = getattr(model, "pixel_frames_per_latent", None)
    if stride is None:
        codec = getattr(model, "codec", None)
        return int(getattr(codec, "temporal_stride", 1))
    return int(stride)


def spatial_stride_of(codec: object) -> int | None:
    """Pixels per latent pixel along height and width: the codec's optional ``stride`` (see
    :class:`~packforcing.core.interfaces.LatentCodec`), ``None`` for a codec that does not declare
    it (or no codec)."""
    stride = getattr(codec, "stride", None)
    return None if stride is None else int(stride)


@attrs.frozen
class Geometry:
    """Shape of one model's cache.

    Latent frames are ``[C, H, W]``; the model patchifies ``patch = (pt, ph, pw)`` so one
    latent frame becomes ``(H // ph) * (W // pw)`` tokens. A block is ``frames_per_block``
    latent frames. Cached keys and values are ``[B, N, num_heads, head_dim]`` per layer.
    """

    latent_height: int = attrs.field(validator=positive)
    latent_width: int = attrs.field(validator=positive)
    num_layers: int = attrs.field(validator=positive)
    num_heads: int = attrs.field(validator=positive)
    head_dim: int = attrs.field(validator=positive)
    latent_channels: int = attrs.field(default=16, validator=positive)
    patch: Grid = attrs.field(default=(1, 2, 2), converter=int_tuple, validator=positive_triple)
    frames_per_block: int = attrs.field(default=4, validator=positive)
    dtype: str = attrs.field(default="float32", converter=_dtype_name)

    def __attrs_post_init__(self) -> None:
        pt, ph, pw = self.patch
        if self.frames_per_block % pt:
            raise ValueError(f"frames_per_block={self.frames_per_block} is not a multiple of patch t={pt}")
        if self.latent_height % ph or self.latent_width % pw:
            raise ValueError(f"latent {self.latent_height}x{self.latent_width} is not divisible by patch {ph}x{pw}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def frame_grid(self) -> tuple[int, int]:
        """Token grid ``(Hp, Wp)`` of one latent frame."""
        return self.latent_height // self.patch[1], self.latent_width // self.patch[2]

    @property
    def tokens_per_frame(self) -> int:
        hp, wp = self.frame_grid
        return hp * wp

    @property
    def block_grid(self) -> Grid:
        """Token grid ``(F // pt, Hp, Wp)`` of one full-fidelity block."""
        hp, wp = self.frame_grid
        return self.frames_per_block // self.patch[0], hp, wp

    @property
    def tokens_per_block(self) -> int:
        t, h, w = self.block_grid
        return t * h * w

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_heads * self.head_dim * self.itemsize

    def frames_to_blocks(self, frames: int) -> int:
        """Whole blocks that fit in ``frames`` latent frames (floor)."""
        return frames // self.frames_per_block

    def latent_frames(self, seconds: float, fps: float, pixel_frames_per_latent: int = 4) -> int:
        """Latent frames whose decoded video lasts at least ``seconds`` at ``fps``
        (:func:`latent_frames_for`)."""
        return latent_frames_for(seconds, fps, pixel_frames_per_latent)
