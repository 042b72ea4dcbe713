"""Fitting the ``dual_branch`` compressor against a frozen model: the training loop.

Attention matching: a compressed block is good if the blocks generated after it read the same
thing from it as from its full K/V. The data come from the frozen model itself
(:mod:`packforcing.training.data`), the objective is :func:`~packforcing.training.objective.attention_loss`
(1.0 = as bad as dropping the block, 0.0 = perfect), and ``K_X^comp`` is ``model.project_kv`` of
the compressor's tokens, so gradients flow through the model's own K/V projections into the
compressor while the model stays frozen. Both versions of a block are placed at the same
temporal position, a random number of blocks before the reading block (``max_gap_blocks``), as
the temporal RoPE shift would place a selected mid block.

Command line (options in :mod:`packforcing.training.options`)::

    packforcing train-compressor --config packforcing --out packforcing/weights/dual_branch_tiny.safetensors

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

from packforcing.attention.backends import SdpaBackend
from packforcing.compressors.dual_branch import (
    DualBranchCompressor,
    DualBranchParams,
    weights_metadata,
)
from packforcing.core.build import build_engine
from packforcing.core.config import Config, load_config
from packforcing.core.engine import GenerationEngine
from packforcing.core.errors import ConfigError
from packforcing.core.interfaces import BlockModel
from packforcing.training.data import AttentionData, Batch, collect, sample_batch
from packforcing.training.objective import attention_loss, dual_branch_kv, pool_kv
from packforcing.training.options import DATA_SOURCES
from packforcing.training.output import check_writable, diverged, git_commit, write_weights

__all__ = [
    "AttentionData",
    "Batch",
    "attention_loss",
    "collect",
    "dual_branch_kv",
    "main",
    "pool_kv",
    "run",
    "sample_batch",
    "train_compressor",
]


def _split(num: int) -> tuple[list[int], list[int]]:
    """Train / held-out sequence indices (a quarter held out, at least one each)."""
    held = max(1, num // 4) if num > 1 else 0
    seqs = list(range(num))
    return seqs[: num - held] or seqs, seqs[num - held :] or seqs


VERB = "train-compressor"
"""The label of what this command sets in the config itself (in error messages, as ``--set`` is)."""


def _not_dual_branch(cfg: Config) -> ConfigError:
    spec = cfg.components.get("compressor")
    has = "no compressor" if spec is None else f"compressor {spec.name!r}"
    return ConfigError(
        f"{VERB} needs a config with a dual_branch compressor; this one has {has}",
        source=cfg.source,
        path="compressor",
    )


def _load(config: Mapping[str, Any] | str) -> Config:
    """``config`` with its compressor's weights left out (training starts from the seeded
    initialisation) and float32; a config without a dual_branch compressor is refused saying so."""
    try:
        return load_config(config, ["compressor.weights=null", "run.dtype=float32"], labels=[VERB, VERB])
    except ConfigError:
        plain = load_config(config, ["run.dtype=float32"], labels=[VERB])  # the config's own problem, if any
        spec = plain.components.get("compressor")
        if spec is None or spec.name != "dual_branch":
            raise _not_dual_branch(plain) from None
        raise


def train_compressor(
    config: Config | Mapping[str, Any] | str,
    steps: int = 1000,
    lr: float = 2e-3,
    out_path: str | Path | None = None,
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
    before/after training and of the ``pool`` baseline, and ``held_out_sequences``: how many
    sequences they are measured on (0 when the data is one sequence: then they are measured on
    the training data, and say so)."""
    if out_path is not None:
        check_writable(out_path)
    cfg = config if isinstance(config, Config) else _load(config)
    spec = cfg.components.get("compressor")
    if spec is None or spec.name != "dual_branch":
        raise _not_dual_branch(cfg)
    params: DualBranchParams = attrs.evolve(spec.params, weights=None, seed=seed)
    engine = build_engine(cfg)
    model = engine.model
    backend = SdpaBackend()
    torch.manual_seed(seed)
    started = time.perf_counter()
    if data_source not in DATA_SOURCES:
        raise ValueError(f"--data: expected one of {list(DATA_SOURCES)}, got {data_source!r}")
    clips = _world_clips(model, seed=seed, batch=batch, blocks=blocks) if data_source == "world" else None
    condition = _data_condition(cfg, engine)
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
        condition=condition,
    )
    g = model.geometry
    holder = DualBranchCompressor(
        params, hidden_size=model.hidden_size, latent_channels=g.latent_channels, patch=g.patch, lazy=True
    )
    net = holder.new_net().to(engine.device)
    train_seqs, eval_seqs = _split(data.num_sequences)
    held = 0 if set(eval_seqs) & set(train_seqs) else len(eval_seqs)  # one sequence: nothing held out
    gen = torch.Generator().manual_seed(seed)
    eval_batch = sample_batch(data, eval_seqs, 4 * batch_size, torch.Generator().manual_seed(seed + 1), max_gap_blocks)
    kv = dual_branch_kv(net, model)

    def held_out() -> float:
        with torch.no_grad():
            return float(attention_loss(model, eval_batch, kv))

    before = held_out()

    def batch_loss() -> torch.Tensor:
        return attention_loss(model, sample_batch(data, train_seqs, batch_size, gen, max_gap_blocks), kv)

    losses = _fit(net, steps, lr, batch_loss, log)
    after = held_out()
    with torch.no_grad():
        pooled = float(attention_loss(model, eval_batch, pool_kv(model)))
    result = {
        "held_out_before": before,
        "held_out_after": after,
        "held_out_pool": pooled,
        "held_out_drop": 1.0,
        "held_out_sequences": held,
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }
    if summary is not None:
        summary.update(result)
    if log is not None:
        what = "held-out loss" if held else "loss on the training data (one sequence: nothing held out)"
        log(
            f"{what}: untrained {before:.4f} -> trained {after:.4f} "
            f"(pool baseline {pooled:.4f}, dropping the block 1.0); {result['seconds']:.1f}s"
        )
    if out_path is not None:
        out = Path(out_path)
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
            held_out_sequences=held,
            data=data_source,
            videos=videos,
            blocks=blocks,
            batch=batch,
            batch_size=batch_size,
            max_gap_blocks=max_gap_blocks,
            model=_model_record(cfg),
            sampler=attrs.asdict(cfg.sampler) if attrs.has(type(cfg.sampler)) else repr(cfg.sampler),
            commit=git_commit(),
        )
        write_weights(state, out, meta)
        if log is not None:
            log(f"wrote {out} ({out.stat().st_size} bytes)")
    return losses


def _world_clips(
    model: BlockModel, *, seed: int, batch: int, blocks: int
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]:
    """``--data world``: video ``i``'s ``batch`` clips of ``blocks`` blocks rendered from the
    scenes world at the model's resolution, as latents ``[batch, C, F, H, W]`` and per-frame scene
    indices ``[batch, F]`` (``None`` for a model that takes no scenes); ``ValueError`` naming
    ``--data world`` where the world cannot be filmed for the model (:func:`world_params_for`)."""
    from packforcing.core.interfaces import num_scenes_of
    from packforcing.training.model import render_clips, world_params_for

    try:
        world = world_params_for(model)
    except ValueError as exc:
        raise ValueError(f"--data world: {exc}") from None
    conditioned = num_scenes_of(model) > 0  # the world's scenes condition a model that takes {scene: i}

    def clips(video: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        seeds = [seed * 7919 + video * batch + i for i in range(batch)]
        latents, scenes = render_clips(model, world, blocks, seeds)
        return latents, scenes if conditioned else None

    return clips


def _data_condition(cfg: Config, engine: GenerationEngine) -> Any:
    """The data's condition: the config's first prompt segment encoded, if it has any (e.g. a Wan
    prompt's embeddings), else ``None``; a text prompt is refused (embeddings only)."""
    specs = cfg.run.schedule().specs
    if not specs:
        return None
    where = "run.prompts[0]"
    if specs[0] is not None and "prompt" in specs[0]:
        raise ConfigError(
            "train-compressor takes precomputed embeddings: run 'packforcing encode-prompts' and give its embeds: FILE",
            source=cfg.source_of("run.prompts"),
            path=f"{where}.prompt",
        )
    try:
        return engine.encode_condition(specs[0])
    except ConfigError as exc:
        raise ConfigError(exc.message, source=cfg.source_of("run.prompts"), path=f"{where}.{exc.path}") from None


def _fit(
    net: torch.nn.Module,
    steps: int,
    lr: float,
    batch_loss: Callable[[], torch.Tensor],
    log: Callable[[str], None] | None,
) -> list[float]:
    """``steps`` AdamW steps on ``net`` (cosine schedule from ``lr``, gradients clipped to norm 1)
    of ``batch_loss()``, a fresh training batch's loss each step; the loss per step. A diverged
    loss raises ``ValueError`` before its step is taken."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    losses: list[float] = []
    for step in range(steps):
        loss = batch_loss()
        value = float(loss.detach())
        failure = diverged(step, value)
        if failure is not None:  # nothing is written: the weights are written only at the end
            raise ValueError(failure)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(value)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {losses[-1]:.4f}")
    return losses


def _model_record(cfg: Config) -> dict[str, Any]:
    """What the compressor was fitted against: the model's name and weights, and (for weights
    written by ``train-model``) their commit and total steps."""
    spec = cfg.components["model"]
    assert spec is not None, "a loaded config always has a model"
    weights = getattr(spec.params, "weights", None)
    record: dict[str, Any] = {"name": spec.name, "weights": weights}
    if isinstance(weights, str):
        from packforcing.compressors.dual_branch import resolve_weights
        from packforcing.training.model import read_metadata

        try:
            meta = read_metadata(resolve_weights(weights, cfg.source_of("model")))
        except Exception:  # the model was built from them, so this is only a missing record
            meta = {}
        record.update({k: meta[k] for k in ("commit", "total_steps") if k in meta})
    return record


def within_budget(videos: int, blocks: int, max_blocks: int | None, batch: int = 1) -> tuple[int, int, int]:
    """``(videos, blocks, batch)`` with ``videos × batch × blocks <= max_blocks`` (every batch item
    of a video is a block generated): fewer videos first, then fewer batch items, then shorter
    videos (a training pair needs two blocks of one video)."""
    if max_blocks is None:
        return videos, blocks, batch
    if max_blocks < 2:
        raise ValueError(f"--max-blocks: expected at least 2 (a block and a later one), got {max_blocks}")
    blocks = min(blocks, max_blocks)
    batch = max(1, min(batch, max_blocks // blocks))
    return max(1, min(videos, max_blocks // (blocks * batch))), blocks, batch


def run(args: argparse.Namespace) -> int:
    """``train-compressor`` with parsed ``args`` (their ranges are their argparse types):
    ``--out`` must be writable (``ValueError`` naming it, before anything runs)."""
    check_writable(args.out)
    videos, blocks, batch = within_budget(args.videos, args.blocks, args.max_blocks, args.batch)
    if (videos, blocks, batch) != (args.videos, args.blocks, args.batch):
        made = videos * batch * blocks
        print(f"--max-blocks {args.max_blocks}: {videos} videos of {blocks} blocks, batch {batch} ({made} blocks)")
    train_compressor(
        args.config,
        steps=args.steps,
        lr=args.lr,
        out_path=args.out,
        seed=args.seed,
        videos=videos,
        blocks=blocks,
        batch=batch,
        batch_size=args.batch_size,
        data_source=args.data,
        log=print,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from packforcing.training.options import build_parser

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
