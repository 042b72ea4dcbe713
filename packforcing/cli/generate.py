"""``packforcing generate``: run a config and write video.mp4, report.json and memory.png."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from packforcing.cli import add_overrides, add_verb
from packforcing.presets import DEFAULT as DEFAULT_CONFIG

EXAMPLE = """example:
  packforcing generate --blocks 120 --seed 0 --out out/pf      # the 'packforcing' preset
  packforcing generate --blocks 40 --out out/pf8 --set policy.recent_frames=8
  packforcing generate --config sliding_window --blocks 40 --out out/sw --set policy.window_frames=16
  packforcing generate --config wan2.1-1.3b/packforcing --set model.path=CKPT \
      --prompt "a red fox running through snow" --seconds 120 --out out/fox

--config takes a YAML file or a preset name ('packforcing presets' lists them).
--prompts FILE is a YAML/JSON list of {from_block: N | from_second: S, prompt: TEXT | embeds: FILE}
(the first from 0); text is encoded with the text_encoder: {path: ...} of the config, which is freed
before the model is loaded (packforcing encode-prompts precomputes the embeddings once).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "generate",
        help="generate a video block by block and report the cache",
        description="Generate a video block by block, streaming frames to DIR/video.mp4, and write "
        "DIR/report.json (per-block time, context tokens, cache bytes per tier) and DIR/memory.png "
        "(cache bytes per tier against block index, stacked, with the full cache for reference).",
        example=EXAMPLE,
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"YAML config file or preset name (default: the {DEFAULT_CONFIG!r} preset)",
    )
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default: run.blocks)")
    p.add_argument(
        "--seconds",
        type=_positive_float,
        default=None,
        help="video length in seconds at run.fps, converted to whole blocks from the model's geometry "
        "(Wan: 1 + 4k pixel frames per 1 + k latent frames); replaces --blocks",
    )
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", metavar="TEXT", help="one text prompt for the whole video (fills run.prompts)")
    prompts.add_argument(
        "--prompts", metavar="FILE", help="YAML/JSON prompt schedule: [{from_block | from_second, prompt | embeds}]"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: run.seed)")
    p.add_argument("--batch-size", type=int, default=None, help="videos generated together (default: run.batch_size)")
    p.add_argument("--out", required=True, help="output directory")
    add_overrides(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--force", action="store_true", help="run even where a full-size model on the CPU is refused as too slow"
    )
    p.set_defaults(func=run)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


CPU_FLOPS = 2e11
"""FLOP/s assumed for a CPU when estimating whether a run is feasible there (optimistic)."""
CPU_SECONDS_PER_BLOCK_LIMIT = 60.0


def model_calls_per_block(sampler: Any) -> int:
    """Model calls per block: the sampler's steps plus the clean pass."""
    steps = getattr(sampler, "steps", None) or len(getattr(sampler, "timesteps", ()) or ()) or 4
    return int(steps) + 1


def refuse_cpu_run(env: Any, blocks: int) -> None:
    """Refuse up front, in one line, a run that would take hours on the CPU (a full-size model):
    the estimate is 24·L·N·d² FLOP per model call (the transformer's linear layers)."""
    from packforcing.core.build import resolve_device

    config = env.config
    if resolve_device(config.run.device).type != "cpu":
        return
    g = env.geometry
    flops = 24 * g.num_layers * g.tokens_per_block * g.hidden_size**2
    per_block = flops * model_calls_per_block(config.sampler) / CPU_FLOPS
    if per_block > CPU_SECONDS_PER_BLOCK_LIMIT:
        model = config.components["model"].name
        raise ValueError(
            f"model {model} at {g.latent_height}x{g.latent_width} latents ({g.tokens_per_block:,} tokens per block, "
            f"{g.num_layers} layers x {g.hidden_size}) is ~{flops:.1e} FLOP per model call: about "
            f"{per_block / 60:.0f} min per block on a CPU (~{per_block * blocks / 3600:.1f} h for {blocks} blocks); "
            "run it on a GPU (run.device: cuda) or pass --force"
        )


def prompt_segments(args: argparse.Namespace, config: Any) -> list[dict[str, Any]] | None:
    """The prompt schedule: ``--prompt``, ``--prompts FILE``, else ``run.prompts``."""
    from packforcing.models.wan.text import read_prompt_file

    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt: expected a non-empty text")
        return [{"from_block": 0, "prompt": args.prompt}]
    if args.prompts is not None:
        return read_prompt_file(args.prompts)
    return config.run.prompts


def text_encoder_params(config: Any) -> Any:
    """``text_encoder:``, its path defaulting to the model's diffusers pipeline root when that
    holds a ``text_encoder/`` folder."""
    import attrs

    params = config.text_encoder
    if params.path is None:
        pipeline_root = getattr(config.components["model"].params, "pipeline_root", None)
        root = pipeline_root() if callable(pipeline_root) else None
        if root is not None and (root / "text_encoder").is_dir():
            params = attrs.evolve(params, path=str(root))
    return params


class ReturnTracker:
    """Per-return fidelity of a run: at each cut back to a condition seen before, the PSNR of
    the block's first frame against the last frame generated under that condition (for a
    world whose off-screen scenes are frozen, they should match)."""

    def __init__(self, report: Any) -> None:
        self.report = report
        self.last: dict[str, tuple[int, Any]] = {}
        self.previous: str | None = None

    def add(self, index: int, condition: Any, pixels: Any) -> None:
        """Block ``index`` under ``condition``, decoded ``pixels [B, 3, F, H, W]``."""
        from packforcing.core.conditions import spec_key

        if condition is None or pixels.shape[2] == 0:
            return
        key = spec_key(condition)
        if key != self.previous and key in self.last:
            seen, frame = self.last[key]
            mse = float((pixels[:, :, 0].clamp(-1, 1) - frame.clamp(-1, 1)).pow(2).mean())
            self.report.add_return(index, condition, index - seen, 10 * math.log10(4.0 / max(mse, 1e-10)))
        self.last[key] = (index, pixels[:, :, -1])
        self.previous = key


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from packforcing.core.build import build_engine, build_for_planning, generation_blocker
    from packforcing.core.conditions import ConditionError, ConditionSchedule
    from packforcing.core.config import load_config
    from packforcing.core.errors import ConfigError
    from packforcing.models.wan.text import encode_schedule, to_block_schedule
    from packforcing.output.plot import plot_memory
    from packforcing.output.report import RunReport
    from packforcing.output.video import (
        VideoWriter,
        blocks_for_seconds,
        pixel_frames,
        temporal_stride_of,
        to_uint8_frames,
    )

    overrides = list(args.overrides)
    for key, value in (("run.blocks", args.blocks), ("run.seed", args.seed), ("run.batch_size", args.batch_size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config_path = args.config
    config = load_config(config_path, overrides)
    # geometry first (no weights): seconds -> blocks, the prompt schedule, the CPU check
    blocker = generation_blocker(config)
    if blocker is not None:  # a shapes-only preset: say so before anything else
        raise ConfigError(f"cannot generate: {blocker}", source=config.source_of("model"), path="model")
    env = build_for_planning(config)
    g = env.geometry
    stride = temporal_stride_of(env.model)
    fps = config.run.fps
    blocks = config.run.blocks
    if args.seconds is not None:
        blocks = blocks_for_seconds(args.seconds, fps, g.frames_per_block, stride)
    segments = prompt_segments(args, config)
    if segments is not None:
        where = (args.prompts or "--prompt") if (args.prompts or args.prompt) else "run.prompts"
        segments = to_block_schedule(
            segments, fps=fps, frames_per_block=g.frames_per_block, temporal_stride=stride, where=where
        )
    if not args.force:
        refuse_cpu_run(env, blocks)
    out = Path(args.out)
    texts = None
    if segments is not None and any("prompt" in seg for seg in segments):
        texts = [{"from_block": seg["from_block"], "prompt": seg["prompt"]} for seg in segments if "prompt" in seg]
        # the text encoder runs (and is freed) before the model is built
        segments = encode_schedule(segments, text_encoder_params(config), out / "prompts")
    extra = [f"run.blocks={blocks}"]
    if segments is not None:
        extra.append(f"run.prompts={json.dumps(segments)}")
    config = load_config(config_path, [*overrides, *extra])
    engine = build_engine(config)
    run_params = config.run
    full_per_block = g.tokens_per_block * g.bytes_per_token * run_params.batch_size
    schedule = run_params.schedule()
    if not schedule.starts and hasattr(engine.model, "default_conditions"):
        # a conditional model's own default schedule (tiny_dit with scenes: revisit scenes)
        schedule = ConditionSchedule.parse(
            engine.model.default_conditions(run_params.blocks, run_params.seed), name="run.prompts"
        )
    latent_frames = run_params.blocks * g.frames_per_block
    video = {
        "seconds_requested": args.seconds,
        "blocks": run_params.blocks,
        "latent_frames": latent_frames,
        "pixel_frames": pixel_frames(latent_frames, stride),
        "fps": fps,
        "video_seconds": pixel_frames(latent_frames, stride) / fps,
    }
    report = RunReport(
        config=config.resolved(),
        full_bytes_per_block=full_per_block,
        conditions=schedule.as_list() or None,
        details={"video": video, **({"prompts": texts} if texts else {})},
    )
    try:
        session = engine.session(
            seed=run_params.seed,
            batch_size=run_params.batch_size,
            conditions=schedule,
            recache=run_params.recache,
        )
    except ConditionError as exc:
        path = exc.path("run.prompts")
        raise ConfigError(exc.message, source=config.source_of(path), path=path) from None
    out.mkdir(parents=True, exist_ok=True)
    codec = engine.model.codec
    writers = []
    # a codec that decodes across blocks (the Wan VAE's causal cache) streams; others decode per block
    make_stream = getattr(codec, "streaming_decoder", None)
    decoder = make_stream() if callable(make_stream) else codec
    if codec is not None:
        for item in range(run_params.batch_size):
            name = "video.mp4" if item == 0 else f"video_{item}.mp4"
            writers.append(VideoWriter(out / name, fps=run_params.fps))
    returns = ReturnTracker(report)
    bar = tqdm(total=run_params.blocks, unit="block", disable=args.no_progress, dynamic_ncols=True)
    try:
        for _ in range(run_params.blocks):
            block = session.step()
            record = report.add(block)
            if writers:
                pixels = decoder.decode(block.latents.float())
                returns.add(block.index, block.condition, pixels)
                for item, writer in enumerate(writers):
                    writer.append(to_uint8_frames(pixels[item]))
            bar.set_postfix(cache=f"{record['cache_bytes'] / 2**20:.1f}MiB", ctx=record["context_tokens"])
            bar.update(1)
    finally:
        session.close()
        bar.close()
        for writer in writers:
            writer.close()
    report.write(out / "report.json")
    plot_memory(report.as_dict(), out / "memory.png", full_per_block)
    video_note = f"{out / 'video.mp4'}, " if writers else ""
    print(
        f"wrote {video_note}{out / 'report.json'}, {out / 'memory.png'}: {run_params.blocks} blocks "
        f"in {report.total_seconds:.1f}s, peak cache {report.peak_cache_bytes / 2**20:.2f} MiB"
    )
    return 0
