"""Training the block-causal model on short clips of a procedural world.

Objective: block-causal teacher forcing with flow matching. A clip of ``train_blocks`` blocks
is rendered by :class:`~packforcing.worlds.SceneWorld` (a fresh random world per clip, scene
indices as conditions for a model that takes scenes) and encoded to latents. The model runs
twice over the clip:

1. a *clean pass* at timestep 0 over the clean latents with a block-causal mask — exactly the
   K/V the cache would hold after committing those blocks (:meth:`BlockModel.clean_kv`);
2. a *noisy pass* over ``x_σ = (1 − σ) x₀ + σ ε`` with an independent noise level ``σ`` per
   block (diffusion-forcing style); noisy block ``i`` attends the clean K/V of blocks
   ``< i`` and its own noisy tokens, at the same RoPE positions.

``loss = mean |v̂ − (ε − x₀)|²`` over every block: each block of the clip is one example of
"generate the next block from a clean history", the situation the engine is in at inference.
Half the noise levels are the sampler's own steps, half uniform between its lowest step and 1.

Command line: ``packforcing train-model --config configs/packforcing.yaml --out W.safetensors``.
The config supplies the model (its ``weights`` are ignored: training starts from the seeded
initialisation) and the sampler. Weights are written every ``checkpoint_every`` steps and at
the end (and on Ctrl-C), as safetensors with metadata recording the world, the steps done, the
seed, the clip length and the commit.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from packforcing.attention.backends import SdpaBackend
from packforcing.core.config import ComponentSpec, Config, load_config
from packforcing.core.context import MaskedContext
from packforcing.core.errors import ConfigError, ParamError
from packforcing.core.geometry import spatial_stride_of, temporal_stride_of
from packforcing.core.interfaces import (
    AttentionBackend,
    AttentionContext,
    BlockModel,
    condition_keys_of,
    num_scenes_of,
)
from packforcing.core.weightfiles import check_tensors, load_into, read_header
from packforcing.testing.reference import block_causal_mask
from packforcing.training.options import MODEL_DEFAULT_OUT as DEFAULT_OUT
from packforcing.training.options import MODEL_EXAMPLE as EXAMPLE
from packforcing.training.options import TrainModelParams
from packforcing.training.options import add_model_arguments as add_arguments
from packforcing.training.output import check_writable, diverged, git_commit, write_weights
from packforcing.worlds import SceneWorld, SceneWorldParams, recall_schedule, revisit_schedule

FORMAT = "packforcing.block_model/1"


class TeacherContext(AttentionContext):
    """The noisy pass: per layer, attend ``[clean K/V of the clip | own noisy K/V]`` under ``mask``
    ``[N, 2N]`` (noisy block ``i`` sees clean blocks ``< i`` and itself)."""

    def __init__(
        self,
        backend: AttentionBackend,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        mask: torch.Tensor,
    ) -> None:
        self._backend = backend
        self._keys = keys
        self._values = values
        self._mask = mask

    @property
    def position(self) -> float:
        return 0.0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = torch.cat([self._keys[layer], k], dim=1)
        v = torch.cat([self._values[layer], v], dim=1)
        return self._backend.attend(q, k, v, self._mask)


def teacher_masks(num_blocks: int, tokens_per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean [N, N], noisy [N, 2N])`` boolean masks for a clip of ``num_blocks`` blocks."""
    clean = block_causal_mask(num_blocks, tokens_per_block, range)
    earlier = block_causal_mask(num_blocks, tokens_per_block, range) & ~block_causal_mask(
        num_blocks, tokens_per_block, lambda i: ()
    )
    own = block_causal_mask(num_blocks, tokens_per_block, lambda i: ())
    return clean, torch.cat([earlier, own], dim=1)


def teacher_forcing_loss(
    model: BlockModel,
    backend: AttentionBackend,
    clean: torch.Tensor,
    condition: torch.Tensor | None,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    masks: tuple[torch.Tensor, torch.Tensor],
    block_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow-matching loss of ``clean [B, C, T, H, W]`` (``T`` = whole blocks) with per-block noise
    levels ``sigma [B, T // F]``, ``noise`` like ``clean`` and per-frame ``condition [B, T]``;
    ``block_weights [B, T // F]`` weighs each block's mean error (``None``: all equal)."""
    f = model.geometry.frames_per_block
    keys, values = model.clean_kv(clean, MaskedContext(backend, masks[0]), condition=condition)
    s = sigma.repeat_interleave(f, dim=1)  # [B, T]
    s5 = s[:, None, :, None, None]
    noisy = (1 - s5) * clean + s5 * noise
    velocity = model.denoise(noisy, 1000.0 * s, TeacherContext(backend, keys, values, masks[1]), condition=condition)
    error = (velocity - (noise - clean)).pow(2)
    if block_weights is None:
        return error.mean()
    per_block = error.mean(dim=(1, 3, 4)).unflatten(1, (-1, f)).mean(dim=2)  # [B, T // F]
    # every weight 0 (first appearances weighted 0 in a batch of nothing else): nothing to learn
    # from, a zero loss rather than 0 / 0
    return (per_block * block_weights).sum() / block_weights.sum().clamp_min(torch.finfo(per_block.dtype).tiny)


def first_appearances(scenes: torch.Tensor, frames_per_block: int) -> torch.Tensor:
    """``[B, nb]`` True where a block shows a scene not seen earlier in its clip (per-frame scene
    indices ``scenes [B, T]``): what such a block looks like cannot come from the history."""
    per_block = scenes[:, ::frames_per_block]  # [B, nb]
    earlier = per_block[:, None, :] == per_block[:, :, None]  # [B, nb(i), nb(j)]: block j shows i's scene
    before = torch.ones(per_block.shape[1], per_block.shape[1], dtype=torch.bool).tril(-1)  # j < i
    return ~(earlier & before).any(dim=2)


def world_params_for(model: BlockModel, num_scenes: int | None = None, **overrides: Any) -> SceneWorldParams:
    """World parameters matching ``model``: frames of its latent size times its codec's spatial
    ``stride`` (:func:`~packforcing.core.geometry.spatial_stride_of`), its block length, one scene
    per scene condition it takes (:func:`~packforcing.core.interfaces.num_scenes_of`; the world's
    default for a model that takes none), object sizes and speeds scaled to the frame
    (:meth:`SceneWorldParams.for_frame`); ``num_scenes`` and ``overrides`` set fields outright.

    ``ValueError``, in one line naming what the model lacks, where the world cannot be filmed for
    it: no codec, a codec without a spatial ``stride``, more than one pixel frame per latent frame,
    or ``scene`` conditions without ``num_scenes``."""
    name = type(model).__name__
    if model.codec is None:
        raise ValueError(f"the scenes world is rendered in pixels and needs the model's codec; {name} has none")
    stride = spatial_stride_of(model.codec)
    if stride is None:
        raise ValueError(
            f"the scenes world needs the spatial stride of the model's codec; {type(model.codec).__name__} "
            "declares no stride (see LatentCodec)"
        )
    frames = temporal_stride_of(model)
    if frames != 1:
        raise ValueError(
            f"the scenes world renders one pixel frame per latent frame; {name} decodes {frames} per latent frame"
        )
    declared = num_scenes_of(model)
    keys = condition_keys_of(model)
    if not declared and keys is not None and "scene" in keys:
        raise ValueError(
            f"the scenes world needs how many scenes the model takes; {name} takes scene conditions but "
            "declares no num_scenes"
        )
    g = model.geometry
    scenes = num_scenes or declared
    return SceneWorldParams.for_frame(
        g.latent_height * stride,
        g.latent_width * stride,
        frames_per_block=g.frames_per_block,
        **({"num_scenes": scenes} if scenes else {}),
        **overrides,
    )


def render_clips(
    model: BlockModel,
    world: SceneWorldParams,
    num_blocks: int,
    seeds: Sequence[int],
    *,
    schedule: str = "revisit",
    segment_blocks: tuple[int, int] = (1, 2),
    new_scene_probability: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[B, C, T, H, W]`` and per-frame scene indices ``[B, T]`` of one clip per seed,
    each its own world and schedule: ``revisit`` (:func:`~packforcing.worlds.revisit_schedule`,
    least recently seen first) or ``recall`` (:func:`~packforcing.worlds.recall_schedule`,
    returns from random distances)."""
    codec = model.codec
    if codec is None:
        raise ValueError("render_clips encodes the rendered pixels with the model's codec, and this model has none")
    latents, scenes = [], []
    for seed in seeds:
        if schedule == "recall":
            order = recall_schedule(num_blocks, world.num_scenes, seed, segment_blocks=segment_blocks)
        else:
            order = revisit_schedule(
                num_blocks,
                world.num_scenes,
                seed,
                segment_blocks=segment_blocks,
                new_scene_probability=new_scene_probability,
            )
        pixels = SceneWorld(world, seed).render(order)
        latents.append(codec.encode(pixels[None]))
        scenes.append(torch.tensor(order).repeat_interleave(world.frames_per_block))
    return torch.cat(latents), torch.stack(scenes)


def clip_seed(seed: int, index: int) -> int:
    """The world (and schedule) seed of training clip ``index`` of a run seeded ``seed``."""
    return seed * 1_000_003 + index


def training_world_seeds(meta: dict[str, Any]) -> list[range]:
    """The world seeds of the clips that weights with metadata ``meta`` (:func:`read_metadata`)
    were trained on, one range per run recorded (the run, then the runs it continued; a run
    whose clip count was not recorded is left out)."""
    out: list[range] = []
    run: Any = meta
    while isinstance(run, dict):
        if isinstance(run.get("seed"), int) and isinstance(run.get("clips"), int):
            out.append(range(clip_seed(run["seed"], 0), clip_seed(run["seed"], run["clips"])))
        run = run.get("init")
    return out


class ClipPool:
    """Clips ``0 … clips-1`` of a training run, rendered on first use and kept (a clip is
    ``[C, T, H, W]`` latents plus ``[T]`` scene indices, ~100 KB for the tiny model)."""

    def __init__(self, model: BlockModel, world: SceneWorldParams, num_blocks: int, seed: int, **schedule: Any) -> None:
        self._schedule = schedule
        self._model = model
        self._world = world
        self._num_blocks = num_blocks
        self._seed = seed
        self._clips: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``[B, C, T, H, W]`` and scene indices ``[B, T]`` of clips ``indices``."""
        for i in indices:
            if i not in self._clips:
                latents, scenes = render_clips(
                    self._model, self._world, self._num_blocks, [clip_seed(self._seed, i)], **self._schedule
                )
                self._clips[i] = (latents[0], scenes[0])
        return torch.stack([self._clips[i][0] for i in indices]), torch.stack([self._clips[i][1] for i in indices])


def sample_sigmas(sampler: Any, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Noise levels where the sampler works: half its own steps, half uniform between its lowest
    non-zero step and 1 (a few-step sampler never asks for anything else)."""
    levels = torch.tensor([s for s in sampler.sigmas() if s > 0], dtype=torch.float32)
    pick = levels[torch.randint(len(levels), shape, generator=gen)]
    low = float(levels.min())
    uniform = low + (1 - low) * torch.rand(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, pick, uniform)


def _save(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    write_weights(state, path, metadata)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of weights written by :func:`train_model` (JSON values decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


INIT_RECORD = (
    "steps",
    "total_steps",
    "seed",
    "lr",
    "batch_size",
    "clips",
    "train_blocks",
    "gain_lr_scale",
    "pure_noise_fraction",
    "first_appearance_weight",
    "schedule",
    "sampler",
    "init",
    "commit",
)
"""What a continued run's metadata keeps of the run it started from (``init``): its recipe."""

VERB = "train-model"
"""The label of what this command sets in the config itself (in error messages, as ``--set`` is)."""


def _load(config: str, overrides: Sequence[str]) -> Config:
    """``config`` with its model's weights left out (training starts from the seeded
    initialisation), float32, then the user's ``--set`` ``overrides``; a model without a
    ``weights`` option is refused saying so."""
    ours = ["model.weights=null", "run.dtype=float32"]
    try:
        return load_config(config, [*ours, *overrides], labels=[VERB, VERB])
    except ConfigError:
        plain = load_config(config, [ours[1], *overrides], labels=[VERB])  # the config's own problem, if any
        spec = plain.components["model"]
        if spec is not None and not (
            attrs.has(type(spec.params)) and "weights" in attrs.fields_dict(type(spec.params))
        ):
            raise ConfigError(
                f"{VERB} needs a config whose model starts from a seeded initialisation (one with a weights "
                f"option, e.g. tiny_dit); this one's model {spec.name!r} has none",
                source=plain.source_of("model"),
                path="model",
            ) from None
        raise


def check_init(path: str | Path, model: torch.nn.Module) -> None:
    """``ValueError`` naming ``--init`` and the file unless it holds weights of ``model``'s
    architecture (every tensor name and shape), saying what it holds instead."""
    try:
        tensors, meta = read_header(Path(path))
    except ParamError as exc:
        raise ValueError(f"--init: {exc.message}") from None
    try:
        check_tensors(Path(path), tensors, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    except ParamError as exc:
        fmt = meta.get("format")
        holds = f" (it holds {fmt} weights; expected {FORMAT})" if fmt not in (None, FORMAT) else ""
        raise ValueError(f"--init: {exc.message}{holds}") from None


def train_model(
    config: Config | str,
    params: TrainModelParams | None = None,
    out_path: str | Path | None = DEFAULT_OUT,
    *,
    world: SceneWorldParams | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    overrides: Sequence[str] = (),
) -> list[float]:
    """Train ``config``'s model from its seeded initialisation; returns the loss per step.

    Writes ``out_path`` (unless ``None``) every ``checkpoint_every`` steps, at the end and when
    interrupted or failing after at least one step (before the first, ``out_path`` is left as it
    was); the metadata's ``steps`` says how many steps the weights have seen."""
    from tqdm import tqdm

    from packforcing.core.build import build_engine

    params = params or TrainModelParams()
    if out_path is not None:
        check_writable(out_path)
    cfg = config if isinstance(config, Config) else _load(config, overrides)
    engine = build_engine(cfg)
    model = engine.model
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: {type(model).__name__} is not a trainable torch module")
    init_meta: dict[str, Any] = {}
    if params.init is not None:
        check_init(params.init, model)
        try:
            load_into(model, Path(params.init))
        except ParamError as exc:
            raise ValueError(f"--init: {exc.message}") from None
        init_meta = read_metadata(params.init)
    world = world or world_params_for(model)
    sampler = cfg.sampler
    backend = SdpaBackend()
    g = model.geometry
    masks = teacher_masks(params.train_blocks, g.tokens_per_block)
    torch.manual_seed(params.seed)
    model.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(model, trainable, params)
    gen = torch.Generator().manual_seed(params.seed)
    base_meta = _run_metadata(cfg.components["model"], world, params, init_meta, sampler)
    losses: list[float] = []
    started = time.perf_counter()
    pool = ClipPool(
        model,
        world,
        params.train_blocks,
        params.seed,
        schedule=params.schedule,
        segment_blocks=params.segment_blocks,
        new_scene_probability=params.new_scene_probability,
    )
    out = Path(out_path) if out_path is not None else None

    def checkpoint() -> None:
        if out is None:
            return
        tail = losses[-50:]
        meta = {
            **base_meta,
            "steps": str(len(losses)),
            "total_steps": str(int(init_meta.get("total_steps", init_meta.get("steps", 0))) + len(losses)),
            "planned_steps": str(params.steps),
            "seconds": f"{time.perf_counter() - started:.1f}",
            "final_loss": f"{sum(tail) / max(len(tail), 1):.6f}",
        }
        _save(model, out, meta)

    bar = tqdm(total=params.steps, unit="step", disable=not progress, dynamic_ncols=True)
    finished = False
    failure: str | None = None
    try:
        for step in range(params.steps):
            loss = _batch_loss(model, backend, pool, sampler, masks, params, gen)
            value = float(loss.detach())
            failure = diverged(step, value)
            if failure is not None:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(value)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            bar.update(1)
            if params.checkpoint_every and (step + 1) % params.checkpoint_every == 0:
                checkpoint()
            if log is not None and (step % 50 == 0 or step == params.steps - 1):
                log(f"step {step:6d}  loss {losses[-1]:.4f}  {time.perf_counter() - started:.0f}s")
        finished = failure is None
    finally:
        bar.close()
        model.requires_grad_(False)
        model.eval()
        # an interrupted run keeps what it learnt; one stopped before its first step has learnt
        # nothing and leaves --out as it was (a previous run's weights are not replaced by the
        # seeded initialisation)
        # a diverged run writes nothing more (its weights gave a non-finite loss; --out keeps its
        # last checkpoint, if any); a stopped one writes its weights only if they are finite, so
        # the error that stopped it (Ctrl-C included) is the one raised; a finished run's
        # non-finite weights are refused by write_weights, in one line
        if losses and failure is None:
            if finished or all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
                checkpoint()
                if not finished and log is not None and out is not None:
                    log(f"stopped: wrote {out} after {len(losses)} of {params.steps} steps")
            elif log is not None and out is not None:
                log(f"stopped: {out} not written (the weights are not finite)")
    if failure is not None:
        raise ValueError(failure)
    if log is not None and out is not None:
        log(f"wrote {out} ({out.stat().st_size} bytes) after {len(losses)} steps, {time.perf_counter() - started:.0f}s")
    return losses


def _optimizer(
    model: torch.nn.Module, trainable: Sequence[torch.nn.Parameter], params: TrainModelParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``trainable`` (the q/k norm gains at ``gain_lr_scale`` times the rate, without
    weight decay) and its schedule: linear warm-up over ``warmup`` steps, then a cosine to 0."""
    # query/key norm gains set how sharp attention can get (RMS-normalised q, k bound the
    # logits); a faster rate lets a short run learn to attend to one frame of the history
    gains = [p for n, p in model.named_parameters() if n.endswith(("norm_q.weight", "norm_k.weight"))]
    others = [p for p in trainable if all(p is not g for g in gains)]
    groups: list[dict[str, Any]] = [
        {"params": others},
        {"params": gains, "lr": params.lr * params.gain_lr_scale, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=params.lr, weight_decay=0.01, betas=(0.9, 0.99)
    )

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / max(params.warmup, 1))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, params.steps) / max(params.steps, 1)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def _run_metadata(
    model_spec: ComponentSpec | None,
    world: SceneWorldParams,
    params: TrainModelParams,
    init_meta: dict[str, Any],
    sampler: Any,
) -> dict[str, str]:
    """The safetensors metadata every checkpoint of a run shares (what it trained, on what, how);
    each checkpoint adds its steps, seconds and loss. ``model_spec`` is the config's model: its
    parameters (all but ``weights``) are recorded."""
    options = model_spec.params if model_spec is not None and attrs.has(type(model_spec.params)) else None
    return {
        "format": FORMAT,
        "model": json.dumps({k: v for k, v in attrs.asdict(options).items() if k != "weights"} if options else {}),
        "world": json.dumps({"name": "scenes", **world.as_dict()}),
        "train_blocks": str(params.train_blocks),
        "seed": str(params.seed),
        "batch_size": str(params.batch_size),
        "clips": str(params.clips),
        "lr": str(params.lr),
        "gain_lr_scale": str(params.gain_lr_scale),
        "pure_noise_fraction": str(params.pure_noise_fraction),
        "first_appearance_weight": str(params.first_appearance_weight),
        "schedule": json.dumps(
            {
                "kind": params.schedule,
                "segment_blocks": list(params.segment_blocks),
                **({"new_scene_probability": params.new_scene_probability} if params.schedule == "revisit" else {}),
            }
        ),
        "init": json.dumps({k: init_meta.get(k) for k in INIT_RECORD} if params.init else None),
        "sampler": json.dumps(attrs.asdict(sampler)),
        "objective": "block-causal teacher forcing, flow matching, per-block noise levels",
        "commit": git_commit(),
    }


def _batch_loss(
    model: BlockModel,
    backend: AttentionBackend,
    pool: ClipPool,
    sampler: Any,
    masks: tuple[torch.Tensor, torch.Tensor],
    params: TrainModelParams,
    gen: torch.Generator,
) -> torch.Tensor:
    """One step's loss: ``batch_size`` clips drawn from ``pool``, per-block noise levels from the
    sampler's (``pure_noise_fraction`` of them 1), first appearances weighted by
    ``first_appearance_weight``; every draw from ``gen``, in that order. The clips' scene indices
    condition a model that takes scenes (:func:`~packforcing.core.interfaces.num_scenes_of`); a
    model that takes none learns from unconditioned clips."""
    picks = torch.randint(params.clips, (params.batch_size,), generator=gen).tolist()
    clean, scenes = pool.get(picks)
    sigma = sample_sigmas(sampler, (params.batch_size, params.train_blocks), gen)
    if params.pure_noise_fraction > 0:
        pure = torch.rand(sigma.shape, generator=gen) < params.pure_noise_fraction
        sigma = torch.where(pure, torch.ones_like(sigma), sigma)
    noise = torch.randn(clean.shape, generator=gen)
    weights = None
    if params.first_appearance_weight != 1.0:
        first = first_appearances(scenes, model.geometry.frames_per_block)
        weights = torch.where(first, params.first_appearance_weight, 1.0)
    condition = scenes if num_scenes_of(model) else None
    return teacher_forcing_loss(model, backend, clean, condition, sigma, noise, masks, weights)


def run(args: argparse.Namespace) -> int:
    """``train-model`` with parsed ``args`` (their ranges are their argparse types): ``--out``
    must be writable (``ValueError`` naming it, before anything runs)."""
    check_writable(args.out)
    # every option is a field of TrainModelParams under the same name (warmup has no option)
    given = {f.name: getattr(args, f.name) for f in attrs.fields(TrainModelParams) if hasattr(args, f.name)}
    params = TrainModelParams(**{**given, "segment_blocks": tuple(args.segment_blocks)})
    train_model(args.config, params, args.out, progress=not args.no_progress, log=print, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m packforcing.training.model",
        description="Train the block-causal model on clips of the scenes world (teacher forcing).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
