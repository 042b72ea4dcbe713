"""A cache-free oracle for a whole PackForcing generation, sharing no code with the policy.

:func:`reference_packforcing_generate` samples every block itself (its own sampler loop over the
engine's seeded noise) and, for every model call of block ``i``, runs the model over the whole
latent sequence ``[clean_0, …, clean_{i-1}, noisy_i]`` (timestep 0 for the clean blocks), as
:func:`packforcing.testing.reference_generate` does, so every earlier block's keys and values are
recomputed from scratch in that very pass: no cache, no tier, no stored block. Its attention
context (:class:`_OracleContext`) gives each block ``j`` of the sequence, at each layer, what the
paper's rule lets it attend at the moment it was generated:

- the partition of blocks ``0..j-1`` (:func:`partition`), from the configured frames and
  capacities alone: the sink takes the first ``⌊sink_frames / F⌋`` blocks, recent the newest
  ``⌊recent_frames / F⌋`` of the rest, mid the newest ``mid_capacity_blocks`` before those, and
  what is older left the budget (archived, the newest ``archive_max_blocks`` of them; the others
  dropped);
- mid blocks compressed with the configured compressor's ``compress`` applied to a block built
  from this pass's recomputed K/V (and the block's clean latents) at its home position (its first
  frame, where the compressed keys are taken to sit, whatever position the compressor reports);
- the mid blocks picked by brute force (:func:`brute_topk`: a loop over candidates scoring every
  sampled query, head and key as ``topk`` documents; :func:`brute_recency`: the newest ``k``);
- ``[sink | picks by time | recent]`` placed at positions packed backwards from ``j·F`` with no
  gap (``temporal_rope_shift``, ``anchor: absolute``), each block's keys un-rotated at its home
  grid and rotated at its target in float64 by RoPE computed from scratch
  (:mod:`tests.context_oracle`), then float64 softmax attention over them and the block's own.

The result is every block's latents and a log of each block's partition and picks (with the
margin that decided each top-``k``), so a test can tell a near tie from a disagreement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from packforcing.core.interfaces import AttentionContext
from packforcing.core.records import CachedBlock
from packforcing.core.sampler import block_noise, fresh_noise

from .context_oracle import attention64, rope_angles, rotate64, topk_samples


@attrs.frozen
class Rule:
    """The PackForcing cache as configured (latent frames; ``F`` frames per block)."""

    frames_per_block: int
    sink_frames: int
    recent_frames: int
    mid_capacity_blocks: int
    mid_overflow: str = "archive"
    archive_max_blocks: int | None = None


@attrs.frozen
class Selection:
    """The selector as configured: ``topk`` (``k`` and its sampling) or ``recency``."""

    name: str
    k: int
    query_fraction: float = 0.125
    min_queries: int = 32
    head_fraction: float = 1.0
    heads: tuple[int, ...] | None = None
    shared_across_layers: bool = False

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Selection:
        """From a config's ``selector`` mapping; ``recency`` always picks once for every layer."""
        fields = {k: tuple(v) if k == "heads" else v for k, v in spec.items()}
        if spec["name"] == "recency":
            fields["shared_across_layers"] = True
        return cls(**fields)


def partition(rule: Rule, committed: int) -> dict[str, list[int]]:
    """Where blocks ``0..committed-1`` are when block ``committed`` is generated: ``sink``,
    ``mid``, ``recent`` (attended tiers), ``archive`` and ``drop`` (left the budget)."""
    f = rule.frames_per_block
    blocks = list(range(committed))
    sink = blocks[: rule.sink_frames // f]
    rest = blocks[len(sink) :]
    recent_count = min(rule.recent_frames // f, len(rest))
    recent = rest[len(rest) - recent_count :]
    rest = rest[: len(rest) - recent_count]
    mid_count = min(rule.mid_capacity_blocks, len(rest))
    mid = rest[len(rest) - mid_count :]
    gone = rest[: len(rest) - mid_count]
    if rule.mid_overflow == "drop":
        archive: list[int] = []
    else:
        bound = len(gone) if rule.archive_max_blocks is None else rule.archive_max_blocks
        archive = gone[len(gone) - min(bound, len(gone)) :]
    drop = [b for b in gone if b not in archive]
    return {"sink": sink, "mid": mid, "recent": recent, "archive": archive, "drop": drop}


def brute_topk(sel: Selection, q: torch.Tensor, candidates: Sequence[torch.Tensor]) -> tuple[list[int], float]:
    """``topk``'s picks among ``candidates`` (stored keys ``[N_c, H, D]`` each) for one item's
    queries ``q [Nq, H, D]``, in time order, and the decision's margin (the ``k``-th best score
    minus the best left out, relative to the largest score; ``inf`` when nothing is left out).
    Score: the mean of every logit ``q·k/√D`` over the evenly spaced sampled queries
    (``n = min(Nq, max(min_queries, ⌈fraction·Nq⌉))``, query ``i·Nq // n``), the chosen heads
    (explicit, or ``⌈head_fraction·H⌉`` evenly spaced) and all of the candidate's keys, each
    logit computed in float64 (no factorisation through mean queries or keys); ties go to the
    newer block."""
    nq, num_heads, d = q.shape
    queries, heads = topk_samples(sel, nq, num_heads)
    scores = []
    for keys in candidates:
        total, terms = 0.0, 0
        for h in heads:
            # every (sampled query, key) logit of head h: [n, N_c]
            logits = q[queries, h].double() @ keys[:, h].double().T / math.sqrt(d)
            total += float(logits.sum())
            terms += logits.numel()
        scores.append(total / terms)
    k = min(sel.k, len(candidates))
    order = sorted(range(len(candidates)), key=lambda c: (-scores[c], -c))
    margin = math.inf
    if k < len(candidates):
        margin = (scores[order[k - 1]] - scores[order[k]]) / (1.0 + max(abs(s) for s in scores))
    return sorted(order[:k]), margin


def brute_recency(sel: Selection, candidates: Sequence[Any]) -> tuple[list[int], float]:
    """The newest ``k`` candidates (a decision without a margin)."""
    k = min(sel.k, len(candidates))
    return list(range(len(candidates) - k, len(candidates))), math.inf


@attrs.define
class _Piece:
    """One attended block for one layer: keys ``[B, N, H, D]`` stored at ``home`` on ``grid``
    with ``(t_stride, hw_stride)``, values, and the frames it spans."""

    block_id: int
    keys: torch.Tensor
    values: torch.Tensor
    grid: tuple[int, int, int]
    home: float
    t_stride: float
    hw_stride: float
    frames: int


@attrs.define
class Log:
    """What the oracle decided for the passes of one block: its partition and, per model call,
    layer and batch item, the picks (indices into ``partition['mid']``) and their margins."""

    partition: dict[str, list[int]]
    picks: list[dict[tuple[int, int], list[int]]] = attrs.Factory(list)
    margins: list[float] = attrs.Factory(list)
    """The margin of every top-``k`` decision of the block's passes (the earlier blocks' too)."""
    targets: dict[int, float] = attrs.Factory(dict)
    """Block id → where the block's own (last) pass placed it (item 0, layer 0)."""


class _OracleContext(AttentionContext):
    """The history of every block of one whole-sequence model call (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        compressor: Any,
        rule: Rule,
        sel: Selection,
        clean: Sequence[torch.Tensor],
        log: Log,
        *,
        realign: bool = True,
    ) -> None:
        self._model = model
        self._compressor = compressor
        self._rule = rule
        self._sel = sel
        self._clean = clean
        self._log = log
        self._realign = realign
        self._picks: dict[tuple[int, int], list[int]] = {}  # (block, item) → picks of layer 0 (shared)
        self._current = len(clean)
        log.picks.append({})

    @property
    def position(self) -> float:
        return 0.0  # the whole sequence from frame 0: block j's tokens sit at frames j·F …

    def _compressed(self, layer: int, m: int, k: torch.Tensor, v: torch.Tensor) -> _Piece:
        """Mid block ``m`` at ``layer``: ``compress`` of a block whose every layer holds this
        pass's recomputed K/V of ``layer`` (a compressor's layer reads that layer's K/V or the
        latents only), its ``layer`` output."""
        g = self._model.geometry
        f = g.frames_per_block
        block = CachedBlock.from_tensors(
            [k.contiguous()] * g.num_layers,
            [v.contiguous()] * g.num_layers,
            latents=self._clean[m],
            block_id=m,
            start_frame=m * f,
            num_frames=f,
            grid=g.block_grid,
            position=float(m * f),
            temporal_stride=float(g.patch[0]),
        )
        ckv = self._compressor.compress(block, self._model)
        # the compressed keys sit on the coarse grid at the block's own first frame (not at the
        # position the compressor reports: a wrong report must show), at the compressor's strides
        home = float(m * f)
        return _Piece(
            m, ckv.keys[layer], ckv.values[layer], tuple(ckv.grid), home, ckv.temporal_stride, ckv.hw_stride, f
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self._model.geometry
        f, n = g.frames_per_block, g.tokens_per_block
        rope = self._model.rope
        batch = q.shape[0]
        blocks = q.shape[1] // n
        assert blocks * n == q.shape[1] and blocks == self._current + 1

        def tokens(x: torch.Tensor, j: int) -> torch.Tensor:
            return x[:, j * n : (j + 1) * n]

        def full(j: int) -> _Piece:
            return _Piece(j, tokens(k, j), tokens(v, j), g.block_grid, float(j * f), float(g.patch[0]), 1.0, f)

        compressed: dict[int, _Piece] = {}
        out = torch.empty_like(q)
        for j in range(blocks):
            part = partition(self._rule, j)
            mids = []
            for m in part["mid"]:
                if m not in compressed:
                    compressed[m] = self._compressed(layer, m, tokens(k, m), tokens(v, m))
                mids.append(compressed[m])
            for item in range(batch):
                qj = tokens(q, j)[item]
                if not mids:
                    picks, margin = [], math.inf
                elif self._sel.shared_across_layers and (j, item) in self._picks:
                    picks, margin = self._picks[(j, item)], math.inf
                elif self._sel.name == "recency":
                    picks, margin = brute_recency(self._sel, mids)
                else:
                    assert self._sel.name == "topk", self._sel.name
                    picks, margin = brute_topk(self._sel, qj, [p.keys[item] for p in mids])
                if self._sel.shared_across_layers:
                    self._picks.setdefault((j, item), picks)
                self._log.margins.append(margin)  # every decision of the pass, the clean blocks' too
                if j == self._current:
                    self._log.picks[-1][(layer, item)] = picks
                context = [full(s) for s in part["sink"]] + [mids[i] for i in picks] + [full(r) for r in part["recent"]]
                keys, values = [], []
                end = float(j * f)  # packed backwards from the block's own first frame, no gaps
                targets = []
                for piece in reversed(context):
                    end -= piece.frames
                    targets.append(end)
                targets.reverse()
                for piece, target in zip(context, targets, strict=True):
                    at = target if self._realign else piece.home
                    if j == self._current and item == 0 and layer == 0:
                        self._log.targets[piece.block_id] = at
                    shape = (rope.head_dim, rope.theta, piece.grid)
                    strides = (piece.t_stride, piece.hw_stride)
                    raw = rotate64(piece.keys[item], -rope_angles(*shape, piece.home, *strides))
                    keys.append(rotate64(raw, rope_angles(*shape, at, *strides)))
                    values.append(piece.values[item].double())
                own_k, own_v = tokens(k, j)[item].double(), tokens(v, j)[item].double()
                attended = attention64(qj, torch.cat([*keys, own_k]), torch.cat([*values, own_v]))
                out[item, j * n : (j + 1) * n] = attended.to(q.dtype)
        return out


@torch.no_grad()
def reference_packforcing_generate(
    model: Any,
    compressor: Any,
    rule: Rule,
    selection: Selection,
    sampler: Any,
    num_blocks: int,
    *,
    seed: int = 0,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    realign: bool = True,
) -> tuple[list[torch.Tensor], list[Log]]:
    """Latents ``[B, C, F, H, W]`` of each block and each block's :class:`Log`, generated without
    a cache under ``rule`` (see the module docstring). ``sampler`` integrates each block from the
    engine's seeded noise; ``realign=False`` leaves every block at its home position (to show the
    comparison is sensitive to the shift)."""
    assert model.rope.head_dim == model.geometry.head_dim
    g = model.geometry
    f = g.frames_per_block
    assert rule.frames_per_block == f
    shape = (batch_size, g.latent_channels, f, g.latent_height, g.latent_width)
    device = next(iter(model.parameters())).device if hasattr(model, "parameters") else "cpu"
    clean: list[torch.Tensor] = []
    logs: list[Log] = []
    for i in range(num_blocks):
        log = Log(partition(rule, i))

        def velocity(x: torch.Tensor, t: torch.Tensor, log: Log = log) -> torch.Tensor:
            seq = torch.cat([*clean, x], dim=2)
            steps = torch.zeros(batch_size, seq.shape[2], device=x.device, dtype=torch.float32)
            steps[:, -f:] = t[:, None]
            context = _OracleContext(model, compressor, rule, selection, clean, log, realign=realign)
            return model.denoise(seq, steps, context)[:, :, -f:]

        noise = block_noise(seed, i, shape, dtype, device)
        clean.append(sampler.sample(noise, velocity, fresh_noise(seed, i, shape, dtype, device)))
        logs.append(log)
    return clean, logs
