"""``dual_branch``: PackForcing's trained mid-block compressor.

A block's clean latent ``[B, C, F, H, W]`` (token grid ``F' × Hp × Wp`` after the model's
patchify) becomes one token sequence of the model's width on the grid
``floor(F'/2) × floor(Hp/4) × floor(Wp/4)`` — 32× fewer tokens (6,240 → 182 for a 4-frame
60×104 Wan block) — by the sum of two branches:

HR branch
    Progressive 3D convolutions on the latent with strides (2,1,1), (1,2,2), (1,2,2), (1,2,2)
    (channels ``hr_channels``, odd ``kernel`` with "same" padding, ``activation`` after each),
    then a stride-1 projection (``proj_kernel``) to the model width. The latent is first
    cropped to the region the output grid covers, so sizes floor exactly.
LR branch
    "pool → VAE → patch": decode with the model's codec, average-pool the pixels over
    ``lr_pool`` (t, h, w), re-encode, and patch-embed (kernel = stride = ``lr_patch``) to the
    model width on the same grid.

Either branch can be switched off (``hr: false`` / ``lr: false``, for ablations; ``lr_branch:
none`` also drops the LR branch, e.g. for a model whose VAE is not loaded). The tokens
become per-layer K/V through the model's own projections (``model.project_kv``), keys rotated
on the compressed grid at the block's temporal position (temporal stride 2 frames per token ×
the block's, spatial stride 4 full-grid tokens).

Weights: ``weights:`` is a safetensors path — absolute, relative to the working directory or
to the config file, or ``pkg:NAME`` for a file shipped in ``packforcing/weights/`` (e.g.
``pkg:dual_branch_tiny.safetensors``, trained for the default ``tiny_dit`` by
``python -m packforcing.training.compressor``). The file records the architecture it was
trained with; a mismatch is an error naming the differing parameters. ``weights: null`` is a
seeded, untrained initialisation (what training starts from); using it to generate warns.
When building for the memory planner nothing is allocated: the network is built on first use.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

from packforcing.core.config import file_label
from packforcing.core.errors import ParamError
from packforcing.core.geometry import Grid, as_grid, spatial_stride_of
from packforcing.core.interfaces import BlockModel, Compressor, LatentCodec, keys_take_condition
from packforcing.core.records import CachedBlock, CompressedKV
from packforcing.core.validators import explained, int_tuple, integer, one_of, positive_triple
from packforcing.core.weightfiles import check_tensors, load_into, read_header, resolve_weights_path

PACKAGE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
"""Where ``pkg:NAME`` weights live."""

FORMAT = "packforcing.dual_branch/1"
HR_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2))
TEMPORAL_REDUCTION = 2
SPATIAL_REDUCTION = 4
ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
ARCHITECTURE = ("hr", "lr", "hr_channels", "kernel", "activation", "proj_kernel", "lr_pool", "lr_patch")
"""Parameters that shape the network (recorded in, and checked against, weight files)."""


class UntrainedCompressorWarning(UserWarning):
    """A ``dual_branch`` compressor without weights is compressing blocks."""


def _odd(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ParamError(attribute.name, f"expected an odd integer >= 1, got {value!r}")


_channels = explained(
    f"{len(HR_STRIDES)} integers >= 1",
    v.min_len(len(HR_STRIDES)),
    v.max_len(len(HR_STRIDES)),
    v.deep_iterable(v.and_(*integer(v.ge(1)))),
    shown=lambda value: repr(list(value)),
)


@attrs.frozen
class DualBranchParams:
    """Parameters of ``dual_branch`` (see the module docstring). Defaults follow the paper's
    figure (channels 32/128/512/2048, 3×3×3 kernels, SiLU chosen where it is silent)."""

    hr: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    lr: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    hr_channels: tuple[int, ...] = attrs.field(default=(32, 128, 512, 2048), converter=int_tuple, validator=_channels)
    kernel: int = attrs.field(default=3, validator=_odd)
    activation: str = attrs.field(default="silu", validator=one_of(*ACTIVATIONS))
    proj_kernel: int = attrs.field(default=1, validator=_odd)
    lr_pool: tuple[int, int, int] = attrs.field(default=(1, 4, 4), converter=int_tuple, validator=positive_triple)
    lr_patch: tuple[int, int, int] = attrs.field(default=(2, 2, 2), converter=int_tuple, validator=positive_triple)
    lr_branch: str = attrs.field(default="codec", validator=one_of("codec", "none"))
    """What the LR branch's "decode → pool → re-encode" runs through: ``codec``, the model's own
    (the Wan VAE for ``wan``, the linear patch codec for ``tiny_dit``); ``none`` drops the branch
    (``lr`` becomes false)."""
    weights: str | None = None
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.lr_branch == "none":
            object.__setattr__(self, "lr", False)  # frozen: the one derived field, set once here
        if not (self.hr or self.lr):
            raise ParamError("hr", "at least one of the hr and lr branches must be on")

    def architecture(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in ARCHITECTURE}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def compressed_grid(grid: Grid) -> Grid:
    """``(floor(t/2), floor(h/4), floor(w/4))`` of a block's token ``grid``."""
    t, h, w = grid
    out = (t // TEMPORAL_REDUCTION, h // SPATIAL_REDUCTION, w // SPATIAL_REDUCTION)
    if min(out) < 1:
        raise ValueError(
            f"dual_branch: block token grid {list(grid)} is too small; it needs at least "
            f"{TEMPORAL_REDUCTION}×{SPATIAL_REDUCTION}×{SPATIAL_REDUCTION} tokens"
        )
    return out


def resolve_weights(spec: str, config_source: str | None = None) -> Path:
    """Path of ``weights``: ``pkg:NAME``, absolute, or relative — beside the config file first,
    then in the working directory (the error names where it looked)."""
    return resolve_weights_path(spec, config_source, package_dir=PACKAGE_WEIGHTS)


def _fit(x: torch.Tensor, size: Grid) -> torch.Tensor:
    """Crop ``x [B, C, t, h, w]`` to ``size`` (floor semantics); upsample any dim that is short."""
    x = x[:, :, : size[0], : size[1], : size[2]]
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="nearest")
    return x


def _at_least(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    short = tuple(max(s, k) for s, k in zip(x.shape[2:], size, strict=True))
    return x if short == tuple(x.shape[2:]) else F.interpolate(x, size=short, mode="nearest")


def _crop_to(x: torch.Tensor, multiple: tuple[int, int, int]) -> torch.Tensor:
    """Crop the last three dims of ``x`` to multiples of ``multiple`` (at least one multiple)."""
    sizes = [max(m, s // m * m) for s, m in zip(x.shape[-3:], multiple, strict=True)]
    return x[..., : sizes[0], : sizes[1], : sizes[2]]


class DualBranchNet(nn.Module):
    """The trainable part: latents ``[B, C, F, H, W]`` → tokens ``[B, D, t, h, w]``."""

    def __init__(
        self, params: DualBranchParams, *, latent_channels: int, hidden_size: int, patch: tuple[int, int, int]
    ) -> None:
        super().__init__()
        self.params = params
        self.patch = as_grid(patch)
        # each branch is initialised from its own seed, so switching one off (an ablation)
        # leaves the other's initial weights unchanged; the global RNG is left as it was
        gen_state = torch.random.get_rng_state()
        try:
            if params.hr:
                torch.manual_seed(params.seed)
                layers: list[nn.Module] = []
                c_in = latent_channels
                pad = params.kernel // 2
                for c_out, stride in zip(params.hr_channels, HR_STRIDES, strict=True):
                    layers += [
                        nn.Conv3d(c_in, c_out, params.kernel, stride=stride, padding=pad),
                        ACTIVATIONS[params.activation](),
                    ]
                    c_in = c_out
                layers.append(nn.Conv3d(c_in, hidden_size, params.proj_kernel, padding=params.proj_kernel // 2))
                self.hr = nn.Sequential(*layers)
            if params.lr:
                torch.manual_seed(params.seed + 1)
                self.lr_embed = nn.Conv3d(latent_channels, hidden_size, params.lr_patch, stride=params.lr_patch)
        finally:
            torch.random.set_rng_state(gen_state)

    def hr_branch(self, latents: torch.Tensor, grid: Grid) -> torch.Tensor:
        pt, ph, pw = self.patch
        gt, gh, gw = grid
        covered = latents[
            :,
            :,
            : gt * TEMPORAL_REDUCTION * pt,
            : gh * SPATIAL_REDUCTION * ph,
            : gw * SPATIAL_REDUCTION * pw,
        ]
        return _fit(self.hr(covered), grid)

    def lr_branch(self, latents: torch.Tensor, codec: LatentCodec | None, grid: Grid) -> torch.Tensor:
        if codec is None:
            raise RuntimeError("dual_branch: the LR branch needs the model's codec (set lr_branch: none to drop it)")
        pool = self.params.lr_pool
        pixels = codec.decode(latents)
        pixels = _crop_to(pixels, pool)
        pooled = F.avg_pool3d(pixels.float(), kernel_size=pool, stride=pool).to(pixels.dtype)
        stride = spatial_stride_of(codec) or 1  # a codec without a declared stride: nothing to crop to
        pooled = _crop_to(pooled, (1, stride, stride))
        z = codec.encode(pooled).to(latents.dtype)
        return _fit(self.lr_embed(_at_least(z, self.params.lr_patch)), grid)

    def forward(self, latents: torch.Tensor, codec: LatentCodec | None, grid: Grid) -> torch.Tensor:
        out = None
        if self.params.hr:
            out = self.hr_branch(latents, grid)
        if self.params.lr:
            low = self.lr_branch(latents, codec, grid)
            out = low if out is None else out + low
        assert out is not None
        return out


class DualBranchCompressor(Compressor):
    """Trained HR-conv + LR pool→VAE→patch compressor (see the module docstring)."""

    name = "dual_branch"
    needs_latents = True
    ratio = TEMPORAL_REDUCTION * SPATIAL_REDUCTION * SPATIAL_REDUCTION
    """Nominal token reduction (32×); flooring odd grids only reduces further."""

    def __init__(
        self,
        params: DualBranchParams | None = None,
        *,
        hidden_size: int,
        latent_channels: int,
        patch: tuple[int, int, int] = (1, 2, 2),
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config_source: str | None = None,
        lazy: bool = False,
    ) -> None:
        self.params = params or DualBranchParams()
        self.hidden_size = hidden_size
        self.latent_channels = latent_channels
        self.patch = as_grid(patch)
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights_path = (
            resolve_weights(self.params.weights, config_source) if self.params.weights is not None else None
        )
        self._net: DualBranchNet | None = None
        self._warned = False
        if not lazy:
            _ = self.net

    def validate(self, env: Any) -> None:
        """The LR branch needs the model's codec (for ``wan``, its VAE): refuse up front without;
        the weights file must be one for this architecture."""
        if self.params.lr and not env.plan_only and env.model is not None and env.model.codec is None:
            raise ParamError(
                "lr_branch",
                "the LR branch decodes and re-encodes through the model's codec, and this model has "
                "none (for wan: set model.vae); or drop the branch with lr_branch: none",
            )
        if self.weights_path is not None:
            # open the configured weights file (header only: names, shapes, metadata) and check it
            # was written for this architecture and model: ValueError("weights: ...") if not
            check_weights(self.weights_path, self)

    @property
    def trained(self) -> bool:
        return self.weights_path is not None

    @property
    def net(self) -> DualBranchNet:
        """The network (built, and its weights loaded, on first use)."""
        if self._net is None:
            net = self.new_net()
            if self.weights_path is not None:
                load_weights(net, self.weights_path, self)
            self._net = net.to(device=self.device, dtype=self.dtype).requires_grad_(False).eval()
        return self._net

    def new_net(self) -> DualBranchNet:
        """A freshly initialised (seeded) network in float32 on the CPU, e.g. to train."""
        return DualBranchNet(
            self.params, latent_channels=self.latent_channels, hidden_size=self.hidden_size, patch=self.patch
        )

    def output_grid(self, grid: Grid) -> Grid:
        return compressed_grid(grid)

    def strides(self, block: CachedBlock) -> tuple[float, float]:
        """``(temporal_stride, hw_stride)`` of the compressed tokens of ``block``."""
        return block.temporal_stride * TEMPORAL_REDUCTION, block.hw_stride * SPATIAL_REDUCTION

    @torch.no_grad()
    def compress(self, block: CachedBlock, model: BlockModel) -> CompressedKV:
        latents = block.latents
        if latents is None:
            raise RuntimeError(f"dual_branch: block {block.block_id} has no latents (the feeding tier must keep them)")
        if not self.trained and not self._warned:
            warnings.warn(
                "dual_branch has no weights (weights: null): compressing with an untrained network",
                UntrainedCompressorWarning,
                stacklevel=2,
            )
            self._warned = True
        grid = self.output_grid(block.grid)
        net = self.net
        tokens = net(latents.to(device=self.device, dtype=self.dtype), model.codec, grid)
        hidden = tokens.flatten(2).transpose(1, 2)  # [B, N', D], t-major like the grid
        t_stride, hw_stride = self.strides(block)
        extra = {}  # models without conditioned keys keep the five-argument call
        if block.condition is not None and keys_take_condition(model):
            extra["condition"] = model.encode_condition(block.condition)
        keys, values = model.project_kv(hidden, grid, block.position, t_stride, hw_stride, **extra)
        return CompressedKV(
            grid=grid,
            temporal_stride=t_stride,
            position=block.position,
            keys=keys,
            values=values,
            hw_stride=hw_stride,
        )


def weights_metadata(params: DualBranchParams, hidden_size: int, latent_channels: int, **extra: Any) -> dict[str, str]:
    """safetensors metadata recording what a weight file was trained for."""
    meta = {
        "format": FORMAT,
        "architecture": json.dumps(params.architecture()),
        "hidden_size": str(hidden_size),
        "latent_channels": str(latent_channels),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def check_weights(path: Path, owner: DualBranchCompressor) -> None:
    """``path`` is a readable dual_branch weight file for ``owner``'s architecture and model:
    its header, metadata, tensor names and shapes are checked; no tensor data is read."""
    tensors, meta = read_header(path)
    label = file_label(path)
    if meta.get("format") != FORMAT:
        raise ParamError("weights", f"{label} is not a dual_branch weight file (format {meta.get('format')!r})")
    try:
        trained = json.loads(meta["architecture"])
        assert isinstance(trained, dict)
    except (KeyError, ValueError, AssertionError):
        raise ParamError("weights", f"{label}: corrupt metadata (architecture)") from None
    expected = owner.params.architecture()
    diff = [f"{k}={trained.get(k)!r} (config: {expected[k]!r})" for k in expected if trained.get(k) != expected[k]]
    for key, have in (("hidden_size", owner.hidden_size), ("latent_channels", owner.latent_channels)):
        if str(meta.get(key)) != str(have):
            diff.append(f"{key}={meta.get(key)} (model: {have})")
    if diff:
        raise ParamError("weights", f"{label} was trained with " + ", ".join(diff))
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in owner.new_net().state_dict().items()}
    check_tensors(path, tensors, shapes)


def load_weights(net: DualBranchNet, path: Path, owner: DualBranchCompressor) -> None:
    """Load ``path`` into ``net`` after checking it was trained for the same architecture and
    that its values fit ``owner``'s dtype (the network is cast to it next)."""
    check_weights(path, owner)
    load_into(net, path, owner.dtype)
