"""Model ``wan``: diffusers' ``WanTransformer3DModel`` as a :class:`~packforcing.core.interfaces.BlockModel`.

The adapter runs diffusers' own modules with their own weights: the patch embedding, the
timestep embedder, every ``WanTransformerBlock.forward`` and the output head. Only two things
are routed differently, through diffusers' public attention-processor API
(``set_attn_processor``):

- self-attention (``attn1``) uses diffusers' projections and q/k norms, rotates queries and keys
  with packforcing's :class:`~packforcing.core.rope.Rope3D` at the context's frame position
  (equal to diffusers' ``WanRotaryPosEmbed`` at that offset) and attends through the
  :class:`~packforcing.core.interfaces.AttentionContext`, so every cache policy, compressor,
  selector and realigner works unchanged;
- cross-attention (``attn2``) takes the text keys/values of the block's condition from a
  per-condition, per-layer cache (Self-Forcing's cross-attention cache): they are computed once
  per condition and layer and reused by every block and sampler step.

Timesteps are per latent frame (``[B, F]``, as Self-Forcing): the per-frame modulation comes from
diffusers' own embedder modules and is broadcast over each frame's tokens, the per-token form
diffusers' blocks accept (its Wan2.2 path).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from packforcing.core.errors import ParamError
from packforcing.core.finite import cast_problem, find_cast_problem
from packforcing.core.freeing import freed_on_error
from packforcing.core.geometry import Geometry, Grid, resolve_dtype
from packforcing.core.interfaces import AttentionContext
from packforcing.core.rope import Rope3D
from packforcing.models.wan.checkpoints import CheckpointError, locate
from packforcing.models.wan.imports import diffusers_quietly
from packforcing.models.wan.params import WAN21_T2V_1_3B, WanParams

PROMPT_EMBEDS = "prompt_embeds"
"""Tensor name of a condition file: ``prompt_embeds [L, text_dim]`` (UMT5 output, as Wan uses it)."""
TEXT_LEN = 512
"""Wan's text length: the unconditional (``None``) condition is 512 zero (padding) embeddings."""
ROPE_THETA = 10000.0


@attrs.define(eq=False)
class WanCondition:
    """A text condition: ``embeds [1, L, text_dim]`` and their projection ``text [1, L, dim]``
    through diffusers' ``text_embedder``; per-layer cross-attention ``K, V [1, L, H, D]`` are
    computed on first use and kept (one condition object per distinct spec)."""

    embeds: torch.Tensor
    text: torch.Tensor
    source: str | None = None
    _kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = attrs.field(factory=dict, repr=False)

    def cross_kv(self, layer: int, attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ``K, V [1, L, H, D]`` of cross-attention module ``attn`` at ``layer`` (cached)."""
        if layer not in self._kv:
            k = attn.norm_k(attn.to_k(self.text)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(self.text).unflatten(2, (attn.heads, -1))
            self._kv[layer] = (k, v)
        return self._kv[layer]

    @property
    def cached_layers(self) -> int:
        return len(self._kv)


@attrs.define
class _Pass:
    """What the attention processors need during one forward pass of a block."""

    context: AttentionContext
    angles: torch.Tensor
    """The pass's RoPE rotation table (:meth:`Rope3D.rotation`), made once and used by every layer."""
    collect: list[tuple[torch.Tensor, torch.Tensor]] | None
    condition: WanCondition


@attrs.define
class _PassSlot:
    """The pass in progress, shared by the adapter and its processors (``None`` outside a pass)."""

    current: _Pass | None = None

    def get(self) -> _Pass:
        if self.current is None:
            raise RuntimeError("packforcing's Wan processors run only inside WanBlockModel.denoise/clean_kv")
        return self.current


class SelfAttentionProcessor:
    """diffusers attention processor for ``attn1``: diffusers' projections and q/k norms, RoPE at
    the context's position, attention through the :class:`AttentionContext` at ``layer``."""

    def __init__(self, slot: _PassSlot, layer: int, rope: Rope3D) -> None:
        self.slot = slot
        self.layer = layer
        self.rope = rope

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.slot.get()
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q = self.rope.rotate(q, state.angles)
        k = self.rope.rotate(k, state.angles)
        if state.collect is not None:
            state.collect.append((k, v))
        out = state.context.attend(self.layer, q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class CrossAttentionProcessor:
    """diffusers attention processor for ``attn2``: queries from the block, text keys/values
    from the condition's per-layer cache, attention with diffusers' ``dispatch_attention_fn``."""

    def __init__(self, slot: _PassSlot, layer: int) -> None:
        self.slot = slot
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        state = self.slot.get()
        b = hidden_states.shape[0]
        k, v = state.condition.cross_kv(self.layer, attn)
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(
            q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), attn_mask=None, dropout_p=0.0, is_causal=False
        )
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _targets(transformer: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Each parameter's dtype once cast to ``dtype``: ``dtype``, except float32 for the modules
    diffusers keeps in float32 (``_keep_in_fp32_modules``, as ``from_pretrained(torch_dtype=...)``)."""
    keep = set(getattr(type(transformer), "_keep_in_fp32_modules", None) or ())
    names = (name for name, _ in transformer.named_parameters())
    return {name: torch.float32 if keep.intersection(name.split(".")) else dtype for name in names}


def _cast(transformer: Any, targets: Mapping[str, torch.dtype]) -> None:
    """Cast each parameter to its dtype in ``targets`` (:func:`_targets`)."""
    for name, param in transformer.named_parameters():
        if param.dtype != targets[name]:
            param.data = param.data.to(targets[name])


@freed_on_error
def build_transformer(
    params: WanParams, *, dtype: torch.dtype, device: torch.device, plan_only: bool = False
) -> tuple[Any, dict[str, Any]]:
    """diffusers ``WanTransformer3DModel`` for ``params`` and its config.

    The checkpoint's tensor names and shapes are checked against the architecture first (one
    line naming the file and the first bad tensor); ``plan_only`` stops there and returns a
    weightless (meta-device) model. Without ``params.path`` only planning is possible.
    """
    with diffusers_quietly():
        # from its module: diffusers' top-level name is, to a type checker, its placeholder class
        # for an environment without torch (diffusers.utils.dummy_pt_objects)
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformer3DModel

    if params.path is None:
        if not plan_only:
            raise ParamError(
                "path",
                "model wan needs a checkpoint to generate (set model.path, e.g. --set model.path=DIR); "
                "without one this config only plans Wan2.1-T2V-1.3B memory",
            )
        config = dict(WAN21_T2V_1_3B)
        checkpoint = None
    else:
        checkpoint = locate(params.path, params.format)
        config = checkpoint.config()
    try:
        with torch.device("meta"):
            transformer = WanTransformer3DModel(**config)
    except (TypeError, ValueError) as exc:
        where = checkpoint.config_file or checkpoint.file if checkpoint is not None else "wan"
        raise CheckpointError(where, f"unusable config: {' '.join(str(exc).split())}") from None
    if checkpoint is None:
        return transformer, config
    expected = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    checkpoint.check(expected)
    if plan_only:
        return transformer, config
    transformer.load_state_dict(checkpoint.state_dict(), strict=True, assign=True)
    cfg = transformer.config
    transformer.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
    # a checkpoint value the cast would turn into ±Inf (float32 or bfloat16 weights beyond float16's
    # ±65504) is refused naming the file (a sharded folder's shard) and the tensor as stored there,
    # before any parameter is cast
    targets = _targets(transformer, dtype)
    problem = find_cast_problem(transformer.named_parameters(), targets)
    if problem is not None:  # the transformer is freed before the error reaches the caller (freed_on_error)
        file, stored = checkpoint.origin(problem.name)
        raise CheckpointError(file, problem.line(stored))
    _cast(transformer, targets)
    return transformer.to(device).requires_grad_(False).eval(), config


class WanBlockModel:
    """Wan2.1 transformer (diffusers) implementing :class:`~packforcing.core.interfaces.BlockModel`.

    ``latents [B, C, F, H, W]`` are in the transformer's (normalised VAE) latent space; the
    model predicts the flow ``v = ε - x₀`` like Wan. Conditions are text embeddings
    (``{"embeds": FILE}``). ``codec`` is the Wan VAE when ``model.vae`` (or the pipeline root's
    ``vae/``) is there, else ``None`` (no video is written).
    """

    codec: Any = None
    """The Wan VAE codec (:class:`~packforcing.models.wan.vae.WanVAECodec`) when one is configured."""
    pixel_frames_per_latent = 4
    """Wan's causal VAE: ``1 + 4k`` pixel frames per ``1 + k`` latent frames."""

    def __init__(self, transformer: Any, params: WanParams, dtype: torch.dtype) -> None:
        cfg = transformer.config
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise ParamError("path", "image-conditioned Wan (I2V) is not supported; use a text-to-video checkpoint")
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ParamError("path", f"in_channels {cfg.in_channels} != out_channels {cfg.out_channels}")
        self.transformer = transformer
        self.params = params
        self.dtype = dtype
        self.geometry = Geometry(
            latent_height=params.latent_height,
            latent_width=params.latent_width,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            latent_channels=cfg.in_channels,
            patch=tuple(cfg.patch_size),
            frames_per_block=params.frames_per_block,
            dtype=dtype,
        )
        self.hidden_size = cfg.num_attention_heads * cfg.attention_head_dim
        self.text_dim = cfg.text_dim
        self.rope = Rope3D(cfg.attention_head_dim, ROPE_THETA)
        self._slot = _PassSlot()
        self._null: WanCondition | None = None
        processors: dict[str, Any] = {}
        for i in range(cfg.num_layers):
            processors[f"blocks.{i}.attn1.processor"] = SelfAttentionProcessor(self._slot, i, self.rope)
            processors[f"blocks.{i}.attn2.processor"] = CrossAttentionProcessor(self._slot, i)
        transformer.set_attn_processor(processors)

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    # ------------------------------------------------------------------ conditions
    def encode_condition(self, spec: Mapping[str, Any] | None) -> WanCondition | None:
        """``{"embeds": FILE}``: a safetensors file holding ``prompt_embeds [L, text_dim]``."""
        if spec is None:
            return None
        unknown = sorted(set(spec) - {"embeds"})
        if unknown:
            raise ParamError(unknown[0], "model wan takes a condition {embeds: FILE} (prompt_embeds safetensors)")
        if "embeds" not in spec:
            raise ParamError("embeds", "required key is missing (a safetensors file with prompt_embeds [L, text_dim])")
        file = spec["embeds"]
        if not isinstance(file, str):
            raise ParamError("embeds", f"expected a file path, got {file!r}")
        return self.condition_from(read_prompt_embeds(file, self.text_dim, self.dtype), source=file)

    @torch.no_grad()
    def condition_from(self, embeds: torch.Tensor, source: str | None = None) -> WanCondition:
        """A condition from ``embeds [L, text_dim]`` (or ``[1, L, text_dim]``)."""
        if embeds.dim() == 2:
            embeds = embeds[None]
        embeds = embeds.to(device=self.device, dtype=self.dtype)
        text = self.transformer.condition_embedder.text_embedder(embeds)
        return WanCondition(embeds=embeds, text=text, source=source)

    def _condition(self, condition: WanCondition | None) -> WanCondition:
        if condition is not None:
            return condition
        if self._null is None:
            self._null = self.condition_from(torch.zeros(TEXT_LEN, self.text_dim), source=None)
        return self._null

    # ------------------------------------------------------------------ forward
    def _time(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusers' timestep embedding of ``t [B, T]``: ``temb [B, T, dim]`` and the block
        modulation ``[B, T, 6, dim]``."""
        ce = self.transformer.condition_embedder
        b, n = t.shape
        proj = ce.timesteps_proj(t.reshape(-1))
        embedder_dtype = next(iter(ce.time_embedder.parameters())).dtype
        if proj.dtype != embedder_dtype:
            proj = proj.to(embedder_dtype)
        temb = ce.time_embedder(proj).type_as(like)
        mod = ce.time_proj(ce.act_fn(temb))
        return temb.unflatten(0, (b, n)), mod.unflatten(0, (b, n)).unflatten(2, (6, -1))

    def _run(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: AttentionContext,
        condition: WanCondition | None,
        collect: list[tuple[torch.Tensor, torch.Tensor]] | None,
        head: bool = True,
    ) -> torch.Tensor | None:
        tr = self.transformer
        cond = self._condition(condition)
        b, _, f, _, _ = latents.shape
        pt, ph, pw = self.geometry.patch
        grid = (f // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        gt, gh, gw = grid
        hidden = tr.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(b, f)
        temb, mod = self._time(timesteps[:, ::pt].to(hidden.device), cond.embeds)  # [B, gt, dim], [B, gt, 6, dim]
        mod_tokens = mod[:, :, None].expand(b, gt, gh * gw, *mod.shape[2:]).reshape(b, gt * gh * gw, *mod.shape[2:])
        text = cond.text.expand(b, -1, -1)
        positions = self.rope.grid_positions(grid, context.position, pt, device=hidden.device)
        table = self.rope.rotation(self.rope.angles(*positions))
        self._slot.current = _Pass(context, table, collect, cond)
        try:
            for block in tr.blocks:
                hidden = block(hidden, text, mod_tokens, None)
        finally:
            self._slot.current = None
        if not head:
            return None
        shift, scale = (tr.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)  # [B, gt, 1, dim]
        shift = shift.expand(b, gt, gh * gw, -1).reshape(b, gt * gh * gw, -1)
        scale = scale.expand(b, gt, gh * gw, -1).reshape(b, gt * gh * gw, -1)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = tr.proj_out(hidden).reshape(b, gt, gh, gw, pt, ph, pw, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out.to(latents.dtype)

    # ------------------------------------------------------------------ BlockModel
    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: AttentionContext,
        condition: WanCondition | None = None,
    ) -> torch.Tensor:
        """Flow ``[B, C, F, H, W]`` for ``latents`` at ``timesteps [B]`` or per frame ``[B, F]``."""
        out = self._run(latents, timesteps, context, condition, None)
        assert out is not None
        return out

    @torch.no_grad()
    def clean_kv(
        self, latents: torch.Tensor, context: AttentionContext, condition: WanCondition | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer self-attention ``K, V [B, N, H, D]`` of the clean block at timestep 0, keys
        rotated at ``context.position``."""
        collect: list[tuple[torch.Tensor, torch.Tensor]] = []
        t0 = torch.zeros(latents.shape[0], device=latents.device)
        self._run(latents, t0, context, condition, collect, head=False)
        return [k for k, _ in collect], [v for _, v in collect]

    condition_in_keys = False
    """Capability flag: the prompt enters through cross-attention only, never the cached keys."""
    condition_keys = frozenset({"embeds"})
    """What :meth:`encode_condition` takes: text prompts arrive as their ``embeds``."""

    def project_kv(
        self,
        hidden: torch.Tensor,
        grid: Grid,
        position: float,
        temporal_stride: float,
        hw_stride: float,
        condition: Any = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``K, V [B, N', H, D]`` of compressed tokens ``hidden [B, N', dim]``: each
        block's ``norm1`` and timestep-0 modulation, then its self-attention key/value
        projections and key norm; keys rotated on ``grid`` at ``position``. Differentiable in
        ``hidden`` (a compressor is trained through it; the model's weights stay frozen).
        ``condition`` is ignored: Wan's self-attention keys do not depend on the prompt."""
        tr = self.transformer
        b = hidden.shape[0]
        hidden = hidden.to(self.dtype)
        _, mod = self._time(torch.zeros(b, 1, device=hidden.device), hidden)  # [B, 1, 6, dim]
        angles = self.rope.rotation(
            self.rope.angles(
                *self.rope.grid_positions(grid, position, temporal_stride, hw_stride, device=hidden.device)
            )
        )
        keys, values = [], []
        for block in tr.blocks:
            shift, scale = (block.scale_shift_table + mod[:, 0].float()).chunk(6, dim=1)[:2]  # [B, 1, dim]
            x = (block.norm1(hidden.float()) * (1 + scale) + shift).type_as(hidden)
            attn = block.attn1
            k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(x).unflatten(2, (attn.heads, -1))
            keys.append(self.rope.rotate(k, angles))
            values.append(v)
        return keys, values


def read_prompt_embeds(file: str | Path, text_dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``prompt_embeds [L, text_dim]`` from a safetensors file (one-line errors naming the file),
    finite, and finite once cast to ``dtype`` (the model's, when given)."""
    from safetensors import safe_open

    path = Path(file).expanduser()
    if not path.is_file():
        raise ParamError("embeds", f"{file}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if PROMPT_EMBEDS not in handle.keys():
                found = ", ".join(handle.keys()) or "nothing"
                raise ParamError("embeds", f"{file}: no tensor {PROMPT_EMBEDS!r} (found: {found})")
            embeds = handle.get_tensor(PROMPT_EMBEDS)
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error types
        raise ParamError("embeds", f"{file}: not a readable safetensors file: {' '.join(str(exc).split())}") from None
    if embeds.dim() == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.dim() != 2 or embeds.shape[1] != text_dim or embeds.shape[0] == 0:
        raise ParamError("embeds", f"{file}: {PROMPT_EMBEDS} has shape {list(embeds.shape)}, expected [L, {text_dim}]")
    if not embeds.is_floating_point():
        raise ParamError("embeds", f"{file}: {PROMPT_EMBEDS} is {embeds.dtype}, not text-encoder states (floats)")
    problem = cast_problem([(PROMPT_EMBEDS, embeds)], dtype or embeds.dtype, finite=True)
    if problem is not None:
        raise ParamError("embeds", f"{file}: {problem}")
    return embeds


@freed_on_error
def build_wan(params: WanParams, env: Any) -> WanBlockModel:
    """The ``wan`` model factory: weights loaded unless building for the planner."""
    dtype = resolve_dtype(params.dtype) if params.dtype is not None else env.dtype
    transformer, _ = build_transformer(params, dtype=dtype, device=env.device, plan_only=env.plan_only)
    model = WanBlockModel(transformer, params, dtype)
    vae = params.vae_path()
    if vae is not None:
        from packforcing.models.wan.vae import WanVAECodec, vae_latent_channels

        problem = None
        try:  # planning reads the VAE's config alone: a wrong folder is refused before any work
            channels = vae_latent_channels(vae)
            if channels != model.geometry.latent_channels:  # known from the config: before loading the VAE
                problem = f"{vae} has {channels} latent channels, the transformer {model.geometry.latent_channels}"
            elif not env.plan_only:
                model.codec = WanVAECodec.from_path(vae, dtype=torch.float32, device=env.device)
        except ValueError as exc:
            problem = f"{exc}"
        if problem is not None:  # the transformer is freed before the error reaches the caller (freed_on_error)
            raise ParamError("vae", problem)
    return model
