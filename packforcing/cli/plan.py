"""``packforcing plan``: the planned cache memory of a config, per tier, against the full cache."""

from __future__ import annotations

import argparse
import json
from typing import Any

from packforcing.cli import add_overrides, add_verb
from packforcing.cli.argtypes import positive_float, positive_int

EXAMPLE = """example:
  packforcing plan --config wan1.3b/packforcing --seconds 120
  packforcing plan --config wan1.3b/sliding_window --seconds 120 --fps 16 --json

Nothing is allocated and no weights are loaded: the numbers come from the model's geometry and
the policy's tier layout (the same bookkeeping the live cache runs). Bytes are K and V over all
layers; 'ratio' is peak_cache_bytes / full_cache_bytes. The archive is listed apart: it is
outside the active budget.
"""

JSON_KEYS = (
    "seconds",
    "fps",
    "latent_frames",
    "tokens_per_frame",
    "bytes_per_token",
    "context_tokens",
    "peak_cache_bytes",
    "full_cache_bytes",
    "ratio",
    "archive_bytes",
    "archive_device",
    "archive_max_blocks",
)
"""The keys of ``plan --json``'s object, in order (its ``--help`` lists them)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "plan",
        help="memory table of a config (per tier and total) against the full cache",
        description="Plan the KV-cache memory of CONFIG for SECONDS of video at FPS: blocks, tokens and "
        "bytes per tier at their peak, the total, and the full cache for comparison.",
        example=EXAMPLE,
    )
    p.add_argument("--config", required=True, help="YAML config file or preset name (packforcing presets)")
    p.add_argument("--seconds", type=positive_float, required=True, help="video length in seconds")
    p.add_argument("--fps", type=positive_float, default=16.0, help="pixel frames per second (default: 16)")
    p.add_argument(
        "--pixel-frames-per-latent",
        type=positive_int,
        default=None,
        metavar="N",
        help="pixel frames per latent frame, the VAE's temporal stride (default: the model's, as generate counts)",
    )
    p.add_argument("--json", action="store_true", help=f"print one JSON object with keys {', '.join(JSON_KEYS)}")
    add_overrides(p)
    p.set_defaults(func=run)


def human_bytes(n: float) -> str:
    """Decimal units, as memory sizes are quoted in the literature (138 GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def summary(env: Any, seconds: float, fps: float, pixel_frames_per_latent: int = 4) -> tuple[dict[str, Any], Any]:
    """The ``--json`` object and the :class:`~packforcing.core.records.MemoryPlan` behind it."""
    from packforcing.core.build import blocks_for

    g = env.geometry
    config = env.config
    num_blocks = blocks_for(g, seconds, fps, pixel_frames_per_latent)
    plan = env.policy.plan(num_blocks, batch_size=config.run.batch_size)
    data = {
        "seconds": seconds,
        "fps": fps,
        "latent_frames": g.latent_frames(seconds, fps, pixel_frames_per_latent),
        "tokens_per_frame": g.tokens_per_frame,
        "bytes_per_token": g.bytes_per_token,
        "context_tokens": plan.context_tokens,
        "peak_cache_bytes": plan.bytes,
        "full_cache_bytes": plan.full_cache_bytes,
        "ratio": plan.bytes / plan.full_cache_bytes if plan.full_cache_bytes else 0.0,
        "archive_bytes": plan.archive.bytes,
        "archive_device": plan.archive_device,
        "archive_max_blocks": plan.archive_max_blocks,
    }
    assert tuple(data) == JSON_KEYS, "plan --json's help names every key"
    return data, plan


def table(env: Any, data: dict[str, Any], plan: Any) -> str:
    g = env.geometry
    config = env.config
    batch = config.run.batch_size
    lines = [
        f"{config.source or 'config'}: policy {config.components['policy'].name}, "
        f"{data['seconds']:g} s at {data['fps']:g} fps = {data['latent_frames']:,} latent frames "
        f"= {plan.num_blocks:,} blocks of {g.frames_per_block} frames",
        f"{g.tokens_per_frame:,} tokens per frame, {g.bytes_per_token:,} bytes per token "
        f"(K+V, {g.num_layers} layers x {g.num_heads} heads x {g.head_dim}, {g.dtype})"
        + (f", batch {batch}" if batch != 1 else ""),
        "",
    ]
    rows = [(name, t.blocks, t.tokens, t.bytes) for name, t in plan.tiers.items()]
    rows.append(("total", sum(r[1] for r in rows), plan.tokens, plan.bytes))
    header = ("tier", "blocks", "tokens", "bytes", "")
    body = [(name, f"{b:,}", f"{t:,}", f"{n:,}", human_bytes(n)) for name, b, t, n in rows]
    a = plan.archive
    if a.blocks:
        body.append(("archive*", f"{a.blocks:,}", f"{a.tokens:,}", f"{a.bytes:,}", human_bytes(a.bytes)))
    body.append(
        (
            "full cache",
            f"{plan.num_blocks:,}",
            f"{plan.full_cache_tokens:,}",
            f"{plan.full_cache_bytes:,}",
            human_bytes(plan.full_cache_bytes),
        )
    )
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(5)]
    for i, r in enumerate((header, *body)):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or r[0] == "total":
            lines.append("  ".join("-" * w for w in widths))
    if a.blocks:
        lines.append("* archived blocks are outside the active budget (not counted in the total)")
    if plan.archive_device is not None:
        where = {
            "auto": "pinned host memory when generating on CUDA, else beside the cache",
            "pinned": "pinned host memory",
            "cpu": "host memory",
        }.get(plan.archive_device, f"{plan.archive_device} memory")
        bound = plan.archive_max_blocks
        limit = "unbounded (archive_max_blocks: null)" if bound is None else f"at most {bound:,} blocks"
        lines.append(f"archive: in {where} (archive_device: {plan.archive_device}), {limit}")
    lines.append("")
    own = g.tokens_per_block
    lines.append(
        f"context per step: {data['context_tokens']:,} cached tokens "
        f"(+{own:,} of the block itself = {data['context_tokens'] + own:,})"
    )
    ratio = data["ratio"]
    smaller = f", {1 / ratio:.1f}x smaller" if 0 < ratio < 1 else ""
    lines.append(f"peak cache / full cache: {ratio:.4f}{smaller}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from packforcing.core.build import build_for_planning
    from packforcing.core.config import load_config
    from packforcing.core.geometry import temporal_stride_of

    env = build_for_planning(load_config(args.config, args.overrides))
    stride = args.pixel_frames_per_latent or temporal_stride_of(env.model)
    data, plan = summary(env, args.seconds, args.fps, stride)
    if args.json:
        print(json.dumps(data))
    else:
        print(table(env, data, plan))
    return 0
