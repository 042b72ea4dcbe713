"""Fitting the ``dual_branch`` compressor against a frozen model.

Objective (attention matching). A compressed block is good if the blocks generated after it
read the same thing from it as from its full K/V. Data come from the frozen model itself: we
generate a few videos with a full cache and record, for every block, its clean latents, its
per-layer clean K/V (what the cache stores) and, for every sampler pass and the clean pass,
its rotated queries and its own keys/values. A training example pairs a block ``X`` with a
later block ``Y`` of the same video and one of ``Y``'s passes; per layer ``l``::

    full_l = attn(q_Y, [K_X      | K_Y], [V_X      | V_Y])     # X at full resolution
    comp_l = attn(q_Y, [K_X^comp | K_Y], [V_X^comp | V_Y])     # X compressed
    drop_l = attn(q_Y,            K_Y ,             V_Y )      # X absent

    loss = Σ_l mean|comp_l − full_l|² / Σ_l mean|drop_l − full_l|²

so 1.0 means "as bad as dropping the block" and 0.0 is perfect. Including ``Y``'s own tokens
makes the compressed block carry the right attention *mass*, not only the right average
value. ``K_X^comp`` is ``model.project_kv`` of the compressor's tokens (the model's own K/V
projections, gradients flow through them into the compressor; the model stays frozen).
Both versions of ``X`` are placed at the same temporal position, a random number of blocks
before ``Y`` (``max_gap_blocks``), as the temporal RoPE shift would place a selected mid
block.

Command line (the lead wires it as ``packforcing train-compressor``)::

    python -m packforcing.training.compressor --config configs/packforcing.yaml \
        --out packforcing/weights/dual_branch_tiny.safetensors

The config supplies the model and the compressor's architecture (its ``weights`` are
ignored: training starts from the seeded initialisation).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from packforcing.attention.backends import SdpaBackend
from packforcing.compressors.dual_branch import (
    SPATIAL_REDUCTION,
    TEMPORAL_REDUCTION,
    DualBranchCompressor,
    DualBranchNet,
    DualBranchParams,
    compressed_grid,
    weights_metadata,
)
from packforcing.compressors.pool import pool_tokens, pooled_grid
from packforcing.core.build import build_engine
from packforcing.core.config import Config, load_config
from packforcing.core.interfaces import AttentionBackend, AttentionContext, BlockModel
from packforcing.core.sampler import Sampler, block_noise, fresh_noise
from packforcing.training.options import DATA_SOURCES, DEFAULT_OUT


class _RecordingContext(AttentionContext):
    """Full history at absolute positions; records the block's rotated ``q, k, v`` per layer."""

    def __init__(
        self,
        backend: AttentionBackend,
        history: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        position: float,
    ) -> None:
        self._backend = backend
        self._history = history
        self._position = position
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def position(self) -> float:
        return self._position

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.records.append((q, k, v))
        if self._history:
            hk, hv = self._history[layer]
            k, v = torch.cat([hk, k], dim=1), torch.cat([hv, v], dim=1)
        return self._backend.attend(q, k, v)


@attrs.frozen
class AttentionData:
    """Recorded tensors; ``S`` sequences (video × batch item) of ``nb`` blocks, ``P`` passes.

    ``latents [S, nb, C, F, H, W]``; ``keys``/``values`` ``[S, nb, L, N, H, D]`` (clean, stored
    at absolute position ``block * F``); ``q``/``k``/``v`` ``[S, nb, P, L, N, H, D]``.
    """

    latents: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    frames_per_block: int

    @property
    def num_sequences(self) -> int:
        return self.latents.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.latents.shape[1]

    @property
    def num_passes(self) -> int:
        return self.q.shape[2]


@torch.no_grad()
def collect(
    model: BlockModel,
    backend: AttentionBackend,
    sampler: Sampler,
    *,
    videos: int,
    blocks: int,
    batch: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clips: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> AttentionData:
    """Generate ``videos × batch`` sequences of ``blocks`` blocks with a full cache, recording
    what the objective needs (see the module docstring).

    ``clips(video)``, if given, supplies each video's clean latents ``[batch, C, blocks*F, H, W]``
    and per-frame conditions (``[batch, blocks*F]`` or ``None``): the sampler passes still run
    (their queries are recorded), but the clean latents committed are the clip's — teacher
    forcing on real data instead of the model's own samples."""
    g = model.geometry
    f = g.frames_per_block
    shape = (batch, g.latent_channels, f, g.latent_height, g.latent_width)
    per_video = []
    for video in range(videos):
        history: list[tuple[torch.Tensor, torch.Tensor]] = []
        lat, ks, vs, qs, kqs, vqs = [], [], [], [], [], []
        clip, clip_conditions = clips(video) if clips is not None else (None, None)
        for index in range(blocks):
            position = float(index * f)
            passes: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
            frames = slice(index * f, (index + 1) * f)
            condition = clip_conditions[:, frames] if clip_conditions is not None else None

            def velocity(
                x: torch.Tensor,
                t: torch.Tensor,
                position: float = position,
                passes=passes,
                history=history,
                condition=condition,
            ) -> torch.Tensor:
                ctx = _RecordingContext(backend, history, position)
                out = model.denoise(x, t, ctx, condition=condition)
                passes.append(ctx.records)
                return out

            video_seed = seed * 7919 + video
            latents = sampler.sample(
                block_noise(video_seed, index, shape, dtype, device),
                velocity,
                fresh_noise(video_seed, index, shape, dtype, device),
            )
            if clip is not None:
                latents = clip[:, :, frames].to(device=device, dtype=dtype)
            ctx = _RecordingContext(backend, history, position)
            keys, values = model.clean_kv(latents, ctx, condition=condition)
            passes.append(ctx.records)
            layers = len(keys)
            history = [
                (torch.cat([history[i][0], keys[i]], 1), torch.cat([history[i][1], values[i]], 1))
                if history
                else (keys[i], values[i])
                for i in range(layers)
            ]
            lat.append(latents)
            ks.append(torch.stack(keys, 1))  # [B, L, N, H, D]
            vs.append(torch.stack(values, 1))
            for store, j in ((qs, 0), (kqs, 1), (vqs, 2)):
                store.append(torch.stack([torch.stack([rec[j] for rec in p], 1) for p in passes], 1))
        per_video.append([torch.stack(x, 1) for x in (lat, ks, vs, qs, kqs, vqs)])  # [B, nb, ...]
    tensors = [torch.cat([v[i] for v in per_video], 0).float() for i in range(6)]
    return AttentionData(*tensors, frames_per_block=f)


@attrs.frozen
class Batch:
    """One minibatch of ``(X, Y, pass)`` examples, ``M`` rows."""

    latents: torch.Tensor  # [M, C, F, H, W]
    keys: torch.Tensor  # [M, L, N, H, D], X's clean keys at its home position
    values: torch.Tensor
    home: torch.Tensor  # [M] X's home position
    target: torch.Tensor  # [M] where X is placed for the example
    q: torch.Tensor  # [M, L, N, H, D]
    k: torch.Tensor
    v: torch.Tensor


def sample_batch(
    data: AttentionData, sequences: Sequence[int], size: int, gen: torch.Generator, max_gap_blocks: int
) -> Batch:
    """``size`` random examples from ``sequences``: a block X, a later block Y, one of Y's passes,
    and X placed ``gap`` blocks before Y (``gap`` uniform in ``[0, max_gap_blocks]``)."""
    nb, npass, f = data.num_blocks, data.num_passes, data.frames_per_block
    seq = torch.tensor(sequences)[torch.randint(len(sequences), (size,), generator=gen)]
    y = torch.randint(1, nb, (size,), generator=gen)
    x = (torch.rand(size, generator=gen) * y).long()
    p = torch.randint(npass, (size,), generator=gen)
    gap = torch.randint(max_gap_blocks + 1, (size,), generator=gen)
    home = (x * f).double()
    target = ((y - 1 - gap) * f).double()
    return Batch(
        latents=data.latents[seq, x],
        keys=data.keys[seq, x],
        values=data.values[seq, x],
        home=home,
        target=target,
        q=data.q[seq, y, p],
        k=data.k[seq, y, p],
        v=data.v[seq, y, p],
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention_loss(
    model: BlockModel,
    batch: Batch,
    compressed: Callable[[Batch], tuple[list[torch.Tensor], list[torch.Tensor]]] | None,
) -> torch.Tensor:
    """The objective of the module docstring for ``compressed(batch) -> (keys, values)`` per
    layer ``[M, N', H, D]`` (keys rotated at ``batch.target``); ``None`` drops the block (1.0)."""
    rope = model.rope
    full_keys = rope.shift_temporal(batch.keys.flatten(1, 2), batch.target - batch.home).view_as(batch.keys)
    ck, cv = compressed(batch) if compressed is not None else (None, None)
    num = torch.zeros((), dtype=torch.float32)
    den = torch.zeros((), dtype=torch.float32)
    for layer in range(batch.q.shape[1]):
        q, k, v = batch.q[:, layer], batch.k[:, layer], batch.v[:, layer]
        full = _attend(q, torch.cat([full_keys[:, layer], k], 1), torch.cat([batch.values[:, layer], v], 1))
        drop = _attend(q, k, v)
        den = den + (drop - full).pow(2).mean()
        if ck is None:
            num = num + (drop - full).pow(2).mean()
        else:
            comp = _attend(q, torch.cat([ck[layer], k], 1), torch.cat([cv[layer], v], 1))
            num = num + (comp - full).pow(2).mean()
    return num / den


def dual_branch_kv(
    net: DualBranchNet, model: BlockModel
) -> Callable[[Batch], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``batch -> per-layer (keys, values)`` of the network's compressed tokens at ``batch.target``."""
    g = model.geometry
    grid = compressed_grid(g.block_grid)
    t_stride = float(g.patch[0] * TEMPORAL_REDUCTION)

    def kv(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tokens = net(batch.latents, model.codec, grid).flatten(2).transpose(1, 2)
        keys, values = model.project_kv(tokens, grid, 0.0, t_stride, float(SPATIAL_REDUCTION))
        return [model.rope.shift_temporal(k, batch.target) for k in keys], values

    return kv


def pool_kv(
    model: BlockModel, window: tuple[int, int, int] = (2, 4, 4)
) -> Callable[[Batch], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The training-free ``pool`` baseline on the same examples."""
    g = model.geometry
    rope = model.rope
    grid = g.block_grid
    out = pooled_grid(grid, window, "window")
    t_stride = float(g.patch[0])

    def kv(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in range(batch.keys.shape[1]):
            at_zero = rope.shift_temporal(batch.keys[:, layer], -batch.home)
            raw = rope.unapply_grid(at_zero, grid, 0.0, t_stride)
            pooled = rope.apply_grid(pool_tokens(raw, grid, window), out, 0.0, t_stride * window[0], window[1])
            keys.append(rope.shift_temporal(pooled, batch.target))
            values.append(pool_tokens(batch.values[:, layer], grid, window))
        return keys, values

    return kv


def _split(num: int) -> tuple[list[int], list[int]]:
    """Train / held-out sequence indices (a quarter held out, at least one each)."""
    held = max(1, num // 4) if num > 1 else 0
    seqs = list(range(num))
    return seqs[: num - held] or seqs, seqs[num - held :] or seqs


def train_compressor(
    config: Config | Mapping[str, Any] | str,
    steps: int = 1000,
    lr: float = 2e-3,
    out_path: str | Path | None = DEFAULT_OUT,
    seed: int = 0,
    *,
    videos: int = 16,
    blocks: int = 6,
    batch: int = 4,
    batch_size: int = 32,
    max_gap_blocks: int = 8,
    data_source: str = "generated",
    log: Callable[[str], None] | None = None,
    summary: dict[str, Any] | None = None,
) -> list[float]:
    """Fit ``config``'s ``dual_branch`` compressor to its (frozen) model; returns the training
    loss per step. Writes safetensors to ``out_path`` (unless ``None``), with metadata recording
    the architecture, objective and losses. ``summary``, if given, receives held-out losses
    before/after training and of the ``pool`` baseline."""
    overrides = ["compressor.weights=null", "run.dtype=float32"]
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    spec = cfg.components.get("compressor")
    if spec is None or spec.name != "dual_branch":
        raise ValueError("compressor: training needs a config whose compressor is dual_branch")
    params: DualBranchParams = attrs.evolve(spec.params, weights=None, seed=seed)
    engine = build_engine(cfg)
    model = engine.model
    backend = SdpaBackend()
    torch.manual_seed(seed)
    started = time.perf_counter()
    if data_source not in DATA_SOURCES:
        raise ValueError(f"--data: expected one of {list(DATA_SOURCES)}, got {data_source!r}")
    clips = None
    if data_source == "world":
        from packforcing.training.model import render_clips, world_params_for

        world = world_params_for(model)
        conditioned = bool(getattr(getattr(model, "params", None), "num_conditions", 0))

        def clips(video: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            seeds = [seed * 7919 + video * batch + i for i in range(batch)]
            latents, scenes = render_clips(model, world, blocks, seeds)
            return latents, scenes if conditioned else None

    data = collect(
        model,
        backend,
        engine.sampler,
        videos=videos,
        blocks=blocks,
        batch=batch,
        seed=seed,
        device=engine.device,
        dtype=torch.float32,
        clips=clips,
    )
    g = model.geometry
    holder = DualBranchCompressor(
        params, hidden_size=model.hidden_size, latent_channels=g.latent_channels, patch=g.patch, lazy=True
    )
    net = holder.new_net().to(engine.device)
    train_seqs, eval_seqs = _split(data.num_sequences)
    gen = torch.Generator().manual_seed(seed)
    eval_batch = sample_batch(data, eval_seqs, 4 * batch_size, torch.Generator().manual_seed(seed + 1), max_gap_blocks)
    kv = dual_branch_kv(net, model)

    def held_out() -> float:
        with torch.no_grad():
            return float(attention_loss(model, eval_batch, kv))

    before = held_out()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    losses: list[float] = []
    for step in range(steps):
        loss = attention_loss(model, sample_batch(data, train_seqs, batch_size, gen, max_gap_blocks), kv)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {losses[-1]:.4f}")
    after = held_out()
    with torch.no_grad():
        pooled = float(attention_loss(model, eval_batch, pool_kv(model)))
    result = {
        "held_out_before": before,
        "held_out_after": after,
        "held_out_pool": pooled,
        "held_out_drop": 1.0,
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }
    if summary is not None:
        summary.update(result)
    if log is not None:
        log(
            f"held-out loss: untrained {before:.4f} -> trained {after:.4f} "
            f"(pool baseline {pooled:.4f}, dropping the block 1.0); {result['seconds']:.1f}s"
        )
    if out_path is not None:
        from safetensors.torch import save_file

        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
        meta = weights_metadata(
            params,
            model.hidden_size,
            g.latent_channels,
            objective="attention matching: sum_l mse(comp, full) / sum_l mse(drop, full)",
            steps=steps,
            lr=lr,
            seed=seed,
            held_out_before=round(before, 6),
            held_out_after=round(after, 6),
            held_out_pool=round(pooled, 6),
            data=data_source,
        )
        save_file(state, str(out), metadata=meta)
        if log is not None:
            log(f"wrote {out} ({out.stat().st_size} bytes)")
    return losses


def run(args: argparse.Namespace) -> int:
    train_compressor(
        args.config,
        steps=args.steps,
        lr=args.lr,
        out_path=args.out,
        seed=args.seed,
        videos=args.videos,
        blocks=args.blocks,
        batch=args.batch,
        data_source=args.data,
        log=print,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from packforcing.training.options import build_parser

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
