"""``packforcing generate``: run a config and write video.mp4, report.json and memory.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from packforcing.cli import add_overrides, add_verb
from packforcing.core.errors import ConfigError

DEFAULT_CONFIG = "configs/packforcing.yaml"

EXAMPLE = """example:
  packforcing generate --config configs/packforcing.yaml --blocks 120 --seed 0 --out out/pf
  packforcing generate --config configs/sliding_window.yaml --blocks 40 --out out/sw --set policy.window_frames=16
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
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG} in the working directory)")
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default: run.blocks)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: run.seed)")
    p.add_argument("--batch-size", type=int, default=None, help="videos generated together (default: run.batch_size)")
    p.add_argument("--out", required=True, help="output directory")
    add_overrides(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def default_config_path() -> str:
    """``configs/packforcing.yaml`` relative to the working directory (the repository root)."""
    if Path(DEFAULT_CONFIG).exists():
        return DEFAULT_CONFIG
    raise ConfigError(f"no --config given and the default {DEFAULT_CONFIG} is not in the working directory")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from packforcing.core.build import build_engine
    from packforcing.core.conditions import ConditionError
    from packforcing.core.config import load_config
    from packforcing.output.plot import plot_memory
    from packforcing.output.report import RunReport
    from packforcing.output.video import VideoWriter, to_uint8_frames

    overrides = list(args.overrides)
    for key, value in (("run.blocks", args.blocks), ("run.seed", args.seed), ("run.batch_size", args.batch_size)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_config(args.config or default_config_path(), overrides)
    engine = build_engine(config)
    g = engine.geometry
    run_params = config.run
    full_per_block = g.tokens_per_block * g.bytes_per_token * run_params.batch_size
    schedule = run_params.schedule()
    report = RunReport(
        config=config.resolved(), full_bytes_per_block=full_per_block, conditions=schedule.as_list() or None
    )
    try:
        session = engine.session(seed=run_params.seed, batch_size=run_params.batch_size, conditions=schedule)
    except ConditionError as exc:
        path = exc.path("run.prompts")
        raise ConfigError(exc.message, source=config.source_of(path), path=path) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codec = engine.model.codec
    writers = []
    if codec is not None:
        for item in range(run_params.batch_size):
            name = "video.mp4" if item == 0 else f"video_{item}.mp4"
            writers.append(VideoWriter(out / name, fps=run_params.fps))
    bar = tqdm(total=run_params.blocks, unit="block", disable=args.no_progress, dynamic_ncols=True)
    try:
        for _ in range(run_params.blocks):
            block = session.step()
            record = report.add(block)
            if writers:
                pixels = codec.decode(block.latents.float())
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
    print(
        f"wrote {out / 'video.mp4'}, {out / 'report.json'}, {out / 'memory.png'}: {run_params.blocks} blocks "
        f"in {report.total_seconds:.1f}s, peak cache {report.peak_cache_bytes / 2**20:.2f} MiB"
    )
    return 0
