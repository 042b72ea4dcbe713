"""The abstract parts of the generation engine.

Data flows one way: the engine asks the :class:`CachePolicy` for an
:class:`AttentionContext` per forward pass and commits each finished block to it; the policy
uses a :class:`Compressor`, a :class:`Selector` and a :class:`PositionalRealigner`; the
context hands gathered keys/values to an :class:`AttentionBackend`. Shapes follow
``[B, N, H, D]``: batch, tokens, heads, head dim.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from packforcing.core.geometry import Geometry, Grid
from packforcing.core.records import (
    BlockCommit,
    BlockQuery,
    CachedBlock,
    CacheStats,
    CompressedKV,
    MemoryPlan,
)
from packforcing.core.rope import Rope3D


class AttentionBackend(abc.ABC):
    """Scaled dot-product attention over ``[B, N, H, D]`` tensors."""

    name: str = "abstract"
    CAPABILITIES: ClassVar[tuple[str, ...]] = ("returns_lse", "split_context")
    """The capability flags below (a wrapper, such as a timer, copies them from what it wraps)."""
    returns_lse: bool = False
    """Capability flag: :meth:`attend_lse` is implemented (attention that also returns each
    query's log-sum-exp, so attention over parts of a context can be merged exactly)."""
    split_context: bool = False
    """The backend asks contexts to hand it their history where it is stored, piece by piece
    (:meth:`attend_lse` per piece, merged by :func:`packforcing.attention.merge.merge_by_lse`),
    instead of one gathered copy of the whole context per layer. Needs :attr:`returns_lse`."""

    @abc.abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``q [B, Nq, H, D]`` over ``k, v [B, Nk, H, D]`` → ``[B, Nq, H, D]``.

        ``mask``: optional boolean ``[Nq, Nk]`` (or broadcastable ``[B, H, Nq, Nk]``), ``True``
        where attention is allowed. Scale is ``1 / sqrt(D)``.
        """

    def attend_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked attention of ``q [B, Nq, H, D]`` over ``k, v [B, Nk, H, D]`` and its
        log-sum-exp: ``(out [B, Nq, H, D], lse [B, Nq, H])``, ``lse`` the log of each query's
        softmax denominator (scale ``1 / sqrt(D)``) in float32 or wider. Backends that set
        :attr:`returns_lse` implement it."""
        raise NotImplementedError(f"backend {self.name!r} does not return the log-sum-exp")


class AttentionContext(abc.ABC):
    """What one forward pass of a block attends to, besides the block's own tokens.

    The model calls :meth:`attend` once per layer with the block's own rotated queries and
    keys; the context adds the history it stands for (a cache, or a mask over a longer
    sequence in the oracle) and runs the backend.
    """

    @property
    @abc.abstractmethod
    def position(self) -> float:
        """Temporal RoPE position of the block's first latent frame."""

    @abc.abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, N, H, D]`` for the block's ``q, k, v [B, N, H, D]`` at ``layer``."""

    @property
    def context_tokens(self) -> int:
        """History tokens attended by the last :meth:`attend` call (0 before any)."""
        return 0


@runtime_checkable
class LatentCodec(Protocol):
    """Pixels ``[B, 3, T, H, W]`` in ``[-1, 1]`` ↔ latents ``[B, C, T', H', W']``.

    Optional attributes: ``stride``, pixels per latent pixel along height and width
    (``H = stride · H'``; read it with :func:`~packforcing.core.geometry.spatial_stride_of`: the
    scenes world of ``train-model`` and ``train-compressor --data world`` is rendered at the
    model's latent size times it, and refused for a codec without it); ``temporal_stride``, pixel
    frames per latent frame after the first (read with
    :func:`~packforcing.core.geometry.temporal_stride_of`; 1 for a codec that does not declare it).
    """

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class BlockModel(Protocol):
    """What the engine needs from any block-causal video model.

    ``latents`` are ``[B, C, F, H, W]``; ``timesteps`` are ``[B]`` or ``[B, F]`` in ``[0, 1000]``.
    ``condition`` is what :meth:`encode_condition` made of the block's condition spec (``None``
    for a block without one).

    Attributes: ``geometry`` (the cache's shape: layers, heads, head dim, latent size, patch,
    ``frames_per_block``), ``rope`` (the :class:`Rope3D` the model rotates its queries and keys
    with, at :attr:`AttentionContext.position` on the block's token grid; realigners and
    compressors use it), ``hidden_size`` (the width :meth:`project_kv` takes) and ``codec`` (a
    :class:`LatentCodec`, or ``None``: then ``generate`` writes no video, only
    ``--save-latents``). Each layer calls ``context.attend(layer, q, k, v)`` with the block's own
    rotated tokens. The engine calls the model under :func:`torch.no_grad` and never moves it:
    build it on ``env.device`` in ``env.dtype`` (``from_env``); with ``env.plan_only`` (``plan``,
    ``validate``, ``generate``'s checks) only its geometry and parameter shapes are read, so it
    may be built without weights (e.g. on the meta device).

    :func:`packforcing.testing.reference_generate` calls :meth:`denoise` once over the whole
    sequence so far (``F`` any multiple of ``frames_per_block``, ``timesteps [B, F]``,
    ``context.position`` 0): it must take any number of whole blocks.

    Optional attributes: ``condition_keys`` and ``condition_in_keys`` (below);
    ``default_conditions(num_blocks, seed)``, the schedule ``generate`` uses when the config
    sets no ``run.prompts``; ``pixel_frames_per_latent``, pixel frames per latent frame after the
    first (else ``codec.temporal_stride``, else 1), which ``--seconds`` counts with; ``num_scenes``,
    how many scene conditions ``{"scene": i}`` (``0 <= i < num_scenes``) :meth:`encode_condition`
    takes (read it with :func:`num_scenes_of`; the scenes world's training clips condition a model
    on their scene indices where it declares some, and are unconditioned otherwise).
    """

    geometry: Geometry
    rope: Rope3D
    hidden_size: int
    codec: LatentCodec | None

    def encode_condition(self, spec: Mapping[str, Any] | None) -> Any:
        """The condition object for a JSON-able ``spec`` (e.g. ``{"embeds": "prompt.safetensors"}``),
        or ``None`` for ``None``. Called once per distinct spec; raise ``ValueError("<key>: ...")``
        for a spec the model cannot use.

        A model may declare the keys its specs take as ``condition_keys`` (optional, a frozenset;
        ``embeds`` is what text prompts are encoded into), so text given to a model that takes
        none is refused before a text encoder is loaded."""
        ...

    def denoise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: AttentionContext, condition: Any = None
    ) -> torch.Tensor:
        """Flow-matching velocity ``[B, C, F, H, W]`` for noisy ``latents`` attending ``context``."""
        ...

    def clean_kv(
        self, latents: torch.Tensor, context: AttentionContext, condition: Any = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``K, V [B, N, H, D]`` of the clean block at timestep 0 (keys rotated at
        ``context.position``)."""
        ...

    def project_kv(
        self,
        hidden: torch.Tensor,
        grid: Grid,
        position: float,
        temporal_stride: float,
        hw_stride: float,
        condition: Any = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Project a compressed hidden sequence ``[B, N', hidden_size]`` on ``grid`` to per-layer
        ``K, V [B, N', H, D]`` with each layer's own projections, keys rotated on that grid, under
        the block's ``condition`` (as :meth:`clean_kv` gets it).

        A model whose keys depend on the condition says so with a ``condition_in_keys = True``
        attribute (optional, default ``False``; read it with :func:`keys_take_condition`);
        compressors then encode the block's recorded condition spec and pass it here, and skip
        that work otherwise."""
        ...


def keys_take_condition(model: BlockModel) -> bool:
    """Whether ``model``'s keys depend on the block's condition: its optional ``condition_in_keys``
    attribute (see :meth:`BlockModel.project_kv`), ``False`` for a model that does not declare it.
    Callers of ``project_kv`` pass ``condition=`` only when this is true (a model without the
    attribute keeps the five-argument call)."""
    return bool(getattr(model, "condition_in_keys", False))


def condition_keys_of(model: BlockModel) -> frozenset[str] | None:
    """The keys ``model``'s condition specs take: its optional ``condition_keys`` attribute (see
    :meth:`BlockModel.encode_condition`), or ``None`` for a model that does not declare them
    (then only :meth:`~BlockModel.encode_condition` can tell). Text prompts need ``embeds``."""
    keys = getattr(model, "condition_keys", None)
    return None if keys is None else frozenset(keys)


def num_scenes_of(model: BlockModel) -> int:
    """How many scene conditions ``{"scene": i}`` (``0 <= i < n``) ``model`` takes: its optional
    ``num_scenes`` attribute (see :class:`BlockModel`), 0 for a model that does not declare it
    (it takes none: the scenes world films its clips unconditioned)."""
    return int(getattr(model, "num_scenes", 0))


class Compressor(abc.ABC):
    """Turns a cached block into a smaller one with its own per-layer K/V."""

    name: str = "abstract"
    CAPABILITIES: ClassVar[tuple[str, ...]] = ("needs_latents",)
    """The capability flags below (a wrapper, such as a timer, copies them from what it wraps)."""
    needs_latents: bool = False
    """Capability flag: the compressor reads the block's clean latents (the tier keeps them)."""

    @abc.abstractmethod
    def output_grid(self, grid: Grid) -> Grid:
        """Token grid of a block compressed from ``grid`` (no tensor work)."""

    @abc.abstractmethod
    def compress(self, block: CachedBlock, model: BlockModel) -> CompressedKV:
        """Compressed K/V ``[B, N', H, D]`` of ``block``; must not modify ``block``."""


class Selector(abc.ABC):
    """Chooses which candidate blocks of a tier enter attention."""

    name: str = "abstract"
    CAPABILITIES: ClassVar[tuple[str, ...]] = ("shared_across_layers",)
    """The capability flags below (a wrapper, such as a timer, copies them from what it wraps)."""
    shared_across_layers: bool = False
    """Capability flag: one selection per forward pass, reused by every layer."""

    @abc.abstractmethod
    def budget(self, num_candidates: int) -> int:
        """How many blocks :meth:`select` returns out of ``num_candidates`` (no tensor work)."""

    @abc.abstractmethod
    def select(self, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int) -> torch.Tensor:
        """Indices ``[B, k']`` (int64, ascending = time order) into ``candidates``.

        ``queries [B, Nq, H, D]`` are the rotated queries of the block being generated at
        ``layer``. ``k' = min(k, len(candidates))``; one row per batch item.
        """


class PositionalRealigner(abc.ABC):
    """Assigns temporal positions to a context and rotates cached keys to them."""

    name: str = "abstract"
    CAPABILITIES: ClassVar[tuple[str, ...]] = ("targets_from_frames", "rotates", "keeps_finite", "shifts_query")
    """The capability flags below (a wrapper, such as a timer, copies them from what it wraps)."""
    targets_from_frames: bool = False
    """Capability flag: :meth:`assign`'s targets depend only on the spans' frame counts (in
    order), not on their home positions. A context can then place a selector's picks before
    knowing which blocks they are, so selection indices stay on the device (no host sync)."""
    rotates: bool = True
    """Capability flag: ``False`` when :meth:`assign` always returns the home positions (keys are
    never moved), which also lets a context keep selection indices on the device."""
    keeps_finite: bool = False
    """Capability flag: :meth:`gather_shifted` returns finite keys whenever the keys it is given
    are finite (a pure rotation, as the built-in realigners). A context then checks only the
    attention output of each layer rather than also every gathered key (a pass over the whole
    context per layer); a realigner without the flag has its keys checked and is named when they
    are not finite."""
    shifts_query: bool = False
    """Capability flag: moving keys by ``Δ`` temporal positions (:meth:`gather_shifted`) scores
    them against a query exactly as moving the query by ``−Δ`` (:meth:`query_shifter`) does, as
    for the RoPE rotation of the default :meth:`gather_shifted`. A context can then attend a
    run of stored keys that all move by the same ``Δ`` where it is stored, with a moved copy of
    the query (``[B, Nq, H, D]``) instead of a moved copy of the keys."""

    @abc.abstractmethod
    def assign(self, spans: Sequence[tuple[float, float]], query: BlockQuery) -> tuple[list[float], float]:
        """Target positions for context blocks and for the query block.

        ``spans``: ``(home position, num_frames)`` per context block in time order. Returns the
        first-frame position of each block and of the block being generated.
        """

    def realign(
        self, keys: torch.Tensor, block: CachedBlock, target: float | torch.Tensor, rope: Rope3D
    ) -> torch.Tensor:
        """Keys ``[B, N, H, D]`` of ``block`` moved from its home position to ``target``.

        ``target`` is a number or a ``[B]`` tensor. The stored keys are never modified:
        the rotation is computed from the home position, so precision does not decay.
        """
        if isinstance(target, torch.Tensor):
            delta = target.to(torch.float64) - block.position
            if bool((delta == 0).all()):
                return keys
            return rope.shift_temporal(keys, delta)
        offset = target - block.position
        return keys if offset == 0 else rope.shift_temporal(keys, offset)

    def gather(
        self,
        keys: Sequence[torch.Tensor],
        blocks: Sequence[CachedBlock],
        targets: Sequence[float],
        rope: Rope3D,
        tail: torch.Tensor,
    ) -> torch.Tensor:
        """One ``[B, ΣN + N_tail, H, D]`` tensor: each block's ``keys`` moved to its target, in
        order, followed by ``tail`` (the block being generated). Stored keys are not modified.

        The default realigns block by block; override to batch the rotation (one call for the
        whole context instead of one per block).
        """
        moved = [self.realign(k, b, t, rope) for k, b, t in zip(keys, blocks, targets, strict=True)]
        return torch.cat([*moved, tail], dim=1)

    def gather_shifted(
        self, keys: Sequence[torch.Tensor], deltas: torch.Tensor | None, rope: Rope3D, tail: torch.Tensor
    ) -> torch.Tensor:
        """One ``[B, ΣN + N_tail, H, D]`` tensor: ``keys`` (pieces ``[B, N_i, H, D]``) in order,
        followed by ``tail``; the first ``M`` tokens moved by ``deltas [B or 1, M]`` (float64, on
        the keys' device; ``None``: nothing moves; read-only: a context may pass the same tensor on
        every layer of a pass). The device-side form of :meth:`gather`, for
        contexts whose selection is not known on the host: the deltas come from
        :meth:`assign`'s targets minus the picked blocks' home positions, computed on the device.
        Stored keys are not modified (one rotation from the home position, as :meth:`realign`).
        """
        out = torch.cat([*keys, tail], dim=1)
        if deltas is not None:
            rope.shift_temporal_tokens_(out[:, : deltas.shape[-1]], deltas)
        return out

    def query_shifter(self, delta: torch.Tensor, rope: Rope3D) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function of one forward pass that takes each layer's ``q [B, Nq, H, D]`` to a new
        tensor, ``q`` moved by ``−delta`` (``[1]``, float64, on the queries' device): the query
        that scores stored keys as :meth:`gather_shifted` would score them moved by ``+delta``
        (see :attr:`shifts_query`). What does not depend on ``q`` (the rotation table) is made
        here, once per pass; ``q`` is not modified."""
        turn = rope.temporal_turn(-delta)
        return lambda q: rope.turn_temporal_(q.clone(), turn)


class CachePolicy(abc.ABC):
    """Decides where every committed block lives and what the next block attends."""

    name: str = "abstract"

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every block and free the cache memory."""

    @abc.abstractmethod
    def commit(self, commit: BlockCommit) -> None:
        """Take a finished block's clean K/V (and latents)."""

    @abc.abstractmethod
    def context(self, query: BlockQuery) -> AttentionContext:
        """Attention context for a forward pass of the block ``query``."""

    def settle(self) -> None:
        """Raise for any check of the current block's passes that was left on the device (a
        policy may read them once per block instead of once per pass, so the device is not
        drained between the sampler's steps). :meth:`commit` and :meth:`replace_kv` must settle
        before changing anything; a session calls this after passes that are not committed
        (:meth:`~packforcing.core.session.GenerationSession.predict`). The default holds no checks."""
        return None

    def full_resolution_blocks(self) -> list[CachedBlock]:
        """Blocks held at full resolution, oldest first: what a prompt-switch re-cache recomputes
        (:meth:`replace_kv`). The default holds none (re-caching is then a no-op)."""
        return []

    def replace_kv(
        self,
        block_id: int,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        *,
        position: float,
        condition: Any = None,
    ) -> None:
        """Overwrite the per-layer K/V ``[B, N, H, D]`` of full-resolution block ``block_id`` in
        place (keys rotated at ``position``), recording ``condition``; nothing else moves."""
        raise NotImplementedError(f"policy {self.name!r} cannot replace a cached block's K/V")

    @abc.abstractmethod
    def plan(self, num_blocks: int, batch_size: int = 1) -> MemoryPlan:
        """Peak tokens and bytes per tier over ``num_blocks`` commits, without allocating."""

    @abc.abstractmethod
    def stats(self) -> CacheStats:
        """Blocks, tokens and bytes per tier, from the tensors actually held."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The cache as ``(tensors, JSON-able meta)`` for a checkpoint (optional capability)."""
        raise NotImplementedError(f"policy {self.name!r} cannot be checkpointed")

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Replace the cache with a :meth:`state_dict` (optional capability)."""
        raise NotImplementedError(f"policy {self.name!r} cannot be checkpointed")
