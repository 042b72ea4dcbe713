"""``tiny_dit``: a small Wan-like block-causal DiT defined in code.

Structure (per Wan2.1, scaled down): a ``Conv3d`` patch embedding with patch ``(1, 2, 2)``;
a sinusoidal timestep embedding (one per latent frame) feeding adaLN modulation (six vectors
per layer: shift/scale/gate for attention and MLP); self-attention with RMS-normalised
queries and keys and Wan's 3D RoPE (temporal band first); a GELU MLP; an adaLN output head
that unpatchifies back to latents. Attention goes through the :class:`AttentionContext`,
which adds the cached history (``[context | block]``). Weights are a seeded random init
unless ``weights`` points at a safetensors file (``pkg:NAME`` for one shipped in
``packforcing/weights/``).

Conditioning (off unless ``num_conditions > 0``): a condition is a scene index; its learned
embedding is added to the per-frame timestep embedding, so it steers every layer's adaLN
modulation (and hence the keys the cache stores). ``encode_condition({"scene": i})`` turns a
spec into the index; ``None`` means unconditioned, exactly as a model without conditions.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn

from packforcing.core.errors import ParamError
from packforcing.core.geometry import Geometry, Grid
from packforcing.core.interfaces import AttentionContext
from packforcing.core.rope import Rope3D
from packforcing.core.validators import int_tuple, non_negative, positive, positive_triple, seed_in_range
from packforcing.core.weightfiles import check_tensors, load_into, read_header
from packforcing.models.codec import BASES, LinearPatchCodec

PREDICTIONS = ("velocity", "sample")
"""What the output head predicts: the flow velocity ``ε − x₀`` directly, or the clean sample
``x̂₀`` (turned into the velocity ``(x_σ − x̂₀) / σ``, so the engine always gets a velocity)."""

MIN_SIGMA = 0.05
"""``sample`` prediction divides by ``σ``; below this it is clamped (the sampler never goes there)."""


def _one_of(options: tuple[str, ...], attribute: attrs.Attribute, value: object) -> None:
    if value not in options:
        raise ParamError(attribute.name, f"expected one of {list(options)}, got {value!r}")


@attrs.frozen
class TinyDiTParams:
    """Parameters of ``tiny_dit`` (YAML ``model:`` block)."""

    latent_channels: int = attrs.field(default=16, validator=positive)
    latent_height: int = attrs.field(default=8, validator=positive)
    latent_width: int = attrs.field(default=8, validator=positive)
    patch: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=int_tuple, validator=positive_triple)
    frames_per_block: int = attrs.field(default=4, validator=positive)
    hidden_size: int = attrs.field(default=64, validator=positive)
    num_heads: int = attrs.field(default=2, validator=positive)
    num_layers: int = attrs.field(default=4, validator=positive)
    mlp_ratio: float = 2.0
    rope_theta: float = 10000.0
    seed: int = attrs.field(default=0, validator=seed_in_range)
    codec_stride: int = attrs.field(default=8, validator=positive)
    codec: str = attrs.field(default="random", validator=lambda i, a, v: _one_of(BASES, a, v))
    num_conditions: int = attrs.field(default=0, validator=non_negative)
    condition_tokens: bool = False
    """Also add the condition's embedding to every input token (the residual stream), not only to
    the adaLN modulation: keys then carry the scene additively, so attention can match it."""
    prediction: str = attrs.field(default="velocity", validator=lambda i, a, v: _one_of(PREDICTIONS, a, v))
    weights: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    def geometry(self, dtype: str = "float32") -> Geometry:
        return Geometry(
            latent_height=self.latent_height,
            latent_width=self.latent_width,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads,
            latent_channels=self.latent_channels,
            patch=self.patch,
            frames_per_block=self.frames_per_block,
            dtype=dtype,
        )


TRAINED_AS = ("condition_tokens", "prediction", "codec", "codec_stride", "rope_theta", "mlp_ratio")
"""Parameters that change what the weights compute without changing any tensor's shape: a file
whose metadata records them (``train-model`` writes ``model``) must be loaded with the same."""


def _check_trained_as(path: Any, metadata: Mapping[str, str], params: TinyDiTParams) -> None:
    """One-line error when ``params`` differ from what the weights in ``path`` were trained with."""
    try:
        trained = json.loads(metadata.get("model", "{}"))
    except json.JSONDecodeError:
        return
    for key in TRAINED_AS:
        if key in trained and trained[key] != getattr(params, key):
            raise ParamError(
                key,
                f"{path.name} was trained with {key}={trained[key]!r}, the config has {getattr(params, key)!r}",
            )


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[..., dim]`` of timesteps ``t [...]`` in ``[0, 1000]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class DiTLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim)
        self.norm_k = RMSNorm(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated ``K, V [B, N, H, D]`` of normalised input ``x [B, N, dim]``."""
        b, n, _ = x.shape
        k = self.norm_k(self.k(x)).view(b, n, self.heads, self.head_dim)
        v = self.v(x).view(b, n, self.heads, self.head_dim)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        index: int,
        positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        rope: Rope3D,
        context: AttentionContext,
        collect: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.modulation[:, :, None]).unbind(1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q = self.norm_q(self.q(h)).view(b, n, self.heads, self.head_dim)
        k, v = self.key_value(h)
        q = rope.apply(q, *positions)
        k = rope.apply(k, *positions)
        if collect is not None:
            collect.append((k, v))
        attn = context.attend(index, q, k, v).reshape(b, n, -1)
        x = x + gate1 * self.o(attn)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class TinyDiT(nn.Module):
    """A block-causal video DiT implementing :class:`packforcing.core.interfaces.BlockModel`."""

    def __init__(
        self,
        params: TinyDiTParams | None = None,
        dtype: str = "float32",
        config_source: str | None = None,
        *,
        plan_only: bool = False,
    ) -> None:
        """``plan_only``: a weightless model for memory planning — its transformer parameters live
        on the meta device (nothing initialised or loaded; a ``weights`` file's header is still
        checked), so planning a full-size model costs no time and no memory."""
        super().__init__()
        self.params = params = params or TinyDiTParams()
        self.geometry = params.geometry(dtype)
        dim = params.hidden_size
        self.hidden_size = dim
        self.rope = Rope3D(self.geometry.head_dim, params.rope_theta)
        with torch.device("meta") if plan_only else contextlib.nullcontext():
            self.patch_embed = nn.Conv3d(params.latent_channels, dim, kernel_size=params.patch, stride=params.patch)
            self.time_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            self.layers = nn.ModuleList(
                DiTLayer(dim, params.num_heads, params.mlp_ratio) for _ in range(params.num_layers)
            )
            self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.out_modulation = nn.Parameter(torch.zeros(1, 2, dim))
            pt, ph, pw = params.patch
            self.head = nn.Linear(dim, pt * ph * pw * params.latent_channels)
        self.codec = LinearPatchCodec(params.latent_channels, params.codec_stride, seed=params.seed, basis=params.codec)
        # registered last, so the seeded initialisation of everything else is unchanged
        with torch.device("meta") if plan_only else contextlib.nullcontext():
            # planning: an uninitialised weight (normal_ on the meta device imports torch._dynamo, ~1 s)
            weight = torch.empty(params.num_conditions, dim) if plan_only else None
            embed = nn.Embedding(params.num_conditions, dim, _weight=weight) if params.num_conditions else None
            self.condition_embed = embed
        if not plan_only:
            self._init_weights(params.seed)
        if params.weights:
            from packforcing.compressors.dual_branch import resolve_weights

            path = resolve_weights(params.weights, config_source)
            tensors, metadata = read_header(path)
            check_tensors(path, tensors, {name: tuple(t.shape) for name, t in self.state_dict().items()})
            _check_trained_as(path, metadata, params)
            if not plan_only:  # the model is cast to its geometry's dtype next: the weights must fit it
                load_into(self, path, self.geometry.torch_dtype)
        self.requires_grad_(False)
        self.eval()

    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif "modulation" in name:
                nn.init.normal_(p, std=0.02, generator=gen)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                nn.init.normal_(p, std=1.0 / math.sqrt(fan_in), generator=gen)

    # ------------------------------------------------------------------ helpers
    def _grid(self, latents: torch.Tensor) -> Grid:
        _, _, f, h, w = latents.shape
        pt, ph, pw = self.params.patch
        return f // pt, h // ph, w // pw

    def _embed(
        self, latents: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        b, _, f, _, _ = latents.shape
        grid = self._grid(latents)
        gt, gh, gw = grid
        x = self.patch_embed(latents.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(b, f)
        t_tok = timesteps[:, :: self.params.patch[0]]  # [B, gt]
        emb = self.time_embed(timestep_embedding(t_tok, 256).to(x.dtype))  # [B, gt, dim]
        if condition is not None:
            cond = self._condition_embedding(condition, b, f).to(emb.dtype)  # [B, gt, dim]
            emb = emb + cond
            if self.params.condition_tokens:
                x = x + cond[:, :, None, :].expand(b, gt, gh * gw, -1).reshape(b, gt * gh * gw, -1)
        emb = emb[:, :, None, :].expand(b, gt, gh * gw, -1).reshape(b, gt * gh * gw, -1)
        return x, emb, grid

    def _condition_embedding(self, condition: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """``[B, gt, dim]`` embedding of scene indices ``condition`` (``[]``, ``[B]`` or ``[B, F]``)."""
        if self.condition_embed is None:
            raise ValueError("model: tiny_dit has no conditions (num_conditions is 0)")
        idx = torch.as_tensor(condition, dtype=torch.long, device=self.condition_embed.weight.device)
        if idx.dim() == 0:
            idx = idx.expand(batch, frames)
        elif idx.dim() == 1:
            idx = idx[:, None].expand(batch, frames)
        return self.condition_embed(idx[:, :: self.params.patch[0]])

    def _run(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: AttentionContext,
        collect: list[tuple[torch.Tensor, torch.Tensor]] | None,
        head: bool = True,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        x, emb, grid = self._embed(latents, timesteps, condition)
        b = x.shape[0]
        mod = self.time_proj(emb).view(b, x.shape[1], 6, -1).transpose(1, 2)  # [B, 6, N, dim]
        positions = self.rope.grid_positions(grid, context.position, self.params.patch[0], device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, mod, i, positions, self.rope, context, collect)
        if not head:
            return None
        shift, scale = (self.out_modulation[:, :, None] + emb[:, None]).unbind(1)
        out = self.head(self.norm_out(x) * (1 + scale) + shift)
        pt, ph, pw = self.params.patch
        gt, gh, gw = grid
        c = self.params.latent_channels
        out = out.view(b, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(b, c, gt * pt, gh * ph, gw * pw)

    # ------------------------------------------------------------------ BlockModel
    def encode_condition(self, spec: Mapping[str, Any] | None) -> torch.Tensor | None:
        """The condition object for ``spec``: ``{"scene": i}`` → the index ``i`` (a 0-d long tensor,
        ``0 <= i < num_conditions``); ``None`` (or ``{}``) → ``None``, unconditioned."""
        if not spec:
            return None
        n = self.params.num_conditions
        if n == 0:
            raise ParamError(next(iter(spec)), "model tiny_dit is unconditional and takes no condition")
        unknown = sorted(set(spec) - {"scene"})
        if unknown:
            raise ParamError(unknown[0], "unknown condition key (tiny_dit takes 'scene')")
        scene = spec.get("scene")
        if isinstance(scene, bool) or not isinstance(scene, int) or not 0 <= scene < n:
            raise ParamError("scene", f"expected an integer in [0, {n}), got {scene!r}")
        return torch.tensor(scene, dtype=torch.long)

    def default_conditions(self, num_blocks: int, seed: int = 0) -> list[dict[str, int]] | None:
        """The schedule ``packforcing generate`` uses when the config sets none: for a model with
        scenes, a random schedule that keeps cutting back to scenes after long absences
        (:func:`packforcing.worlds.revisit_schedule`); ``None`` for an unconditional one."""
        if not self.params.num_conditions or num_blocks < 1:
            return None
        from packforcing.worlds import conditions, revisit_schedule

        return conditions(revisit_schedule(num_blocks, self.params.num_conditions, seed, segment_blocks=(1, 3)))

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: AttentionContext,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``[B, C, F, H, W]`` for ``latents [B, C, F, H, W]`` at ``timesteps [B]`` or ``[B, F]``
        under ``condition`` (scene indices ``[]``, ``[B]`` or ``[B, F]``, or ``None``)."""
        out = self._run(latents, timesteps, context, None, condition=condition)
        assert out is not None
        if self.params.prediction == "sample":
            # out is x̂₀; the velocity of x_σ = (1 − σ) x₀ + σ ε is (x_σ − x̂₀) / σ
            b, _, f, _, _ = latents.shape
            sigma = (timesteps.float() / 1000.0).clamp_min(MIN_SIGMA)
            sigma = (sigma[:, None].expand(b, f) if sigma.dim() == 1 else sigma)[:, None, :, None, None]
            out = (latents - out) / sigma.to(out.dtype)
        return out

    def clean_kv(
        self, latents: torch.Tensor, context: AttentionContext, condition: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``K, V [B, N, H, D]`` of the clean block at t = 0, keys rotated at ``context.position``."""
        collect: list[tuple[torch.Tensor, torch.Tensor]] = []
        t0 = torch.zeros(latents.shape[0], device=latents.device)
        self._run(latents, t0, context, collect, head=False, condition=condition)
        return [k for k, _ in collect], [v for _, v in collect]

    @property
    def condition_keys(self) -> frozenset[str]:
        """What :meth:`encode_condition` takes: ``scene`` with scenes, nothing without (never text)."""
        return frozenset({"scene"}) if self.params.num_conditions else frozenset()

    @property
    def num_scenes(self) -> int:
        """How many scenes :meth:`encode_condition` takes (``num_conditions``; 0: unconditional)."""
        return self.params.num_conditions

    @property
    def condition_in_keys(self) -> bool:
        """Capability flag: the scene condition steers the keys (compressors pass it to
        :meth:`project_kv`)."""
        return self.condition_embed is not None

    def project_kv(
        self,
        hidden: torch.Tensor,
        grid: Grid,
        position: float,
        temporal_stride: float,
        hw_stride: float,
        condition: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``K, V [B, N', H, D]`` of compressed tokens ``hidden [B, N', hidden]``.

        Each layer normalises and modulates ``hidden`` as at timestep 0 under ``condition`` (scene
        indices ``[]`` or ``[B]``, as :meth:`clean_kv` gets them; with ``condition_tokens`` the
        embedding is added to ``hidden`` too), then applies its own key/value projections and key
        norm; keys are rotated on ``grid`` at ``position``.
        """
        b, _n, _ = hidden.shape
        t0 = torch.zeros(b, 1, device=hidden.device)
        emb = self.time_embed(timestep_embedding(t0, 256).to(hidden.dtype))  # [B, 1, dim]
        if condition is not None:
            cond = self._condition_embedding(condition, b, 1).to(emb.dtype)  # [B, 1, dim]
            emb = emb + cond
            if self.params.condition_tokens:
                hidden = hidden + cond
        mod = self.time_proj(emb).view(b, 1, 6, -1).transpose(1, 2)
        t, h, w = self.rope.grid_positions(grid, position, temporal_stride, hw_stride, device=hidden.device)
        keys, values = [], []
        for layer in self.layers:
            assert isinstance(layer, DiTLayer)
            shift1, scale1, _, _, _, _ = (mod + layer.modulation[:, :, None]).unbind(1)
            x = layer.norm1(hidden) * (1 + scale1) + shift1
            k, v = layer.key_value(x)
            keys.append(self.rope.apply(k, t, h, w))
            values.append(v)
        return keys, values
