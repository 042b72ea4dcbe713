"""``packforcing generate``: run a config and write video.mp4, report.json and memory.png."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packforcing.cli import UsageError, add_overrides, add_verb, stop_signals_to
from packforcing.cli.argtypes import non_empty_text, positive_float
from packforcing.cli.run_files import CHECKPOINT_DIR, RunError, RunFiles, check_output, prepare_output
from packforcing.core.conditions import check_given_conditions
from packforcing.core.errors import ConfigError
from packforcing.presets import DEFAULT as DEFAULT_CONFIG

if TYPE_CHECKING:
    from packforcing.core.config import Config


EXAMPLE = """example:
  packforcing generate --blocks 120 --seed 0 --out out/pf      # the 'packforcing' preset
  packforcing generate --blocks 40 --out out/pf8 --set policy.recent_frames=8
  packforcing generate --config sliding_window --blocks 40 --out out/sw --set policy.window_frames=16
  packforcing generate --config wan2.1-1.3b/packforcing --set model.path=CKPT \\
      --prompt "a red fox running through snow" --seconds 120 --out out/fox

  packforcing generate --resume out/pf                    # continue an interrupted run where it stopped

--config takes a YAML file or a preset name ('packforcing presets' lists them).
--prompts FILE is a YAML/JSON list of {from_block: N | from_second: S, prompt: TEXT | embeds: FILE}
(the first from 0; the model's own condition keys may stand for prompt/embeds: tiny_dit's
{from_second: 0, scene: 2}); text is encoded with the text_encoder: {path: ...} of the config,
which is freed before the model is loaded (packforcing encode-prompts precomputes the embeddings
once).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "generate",
        help="generate a video block by block and report the cache",
        description="Generate a video block by block, streaming frames to DIR/video.mp4, and write "
        "DIR/report.json (per-block time, context tokens, cache bytes per tier) and DIR/memory.png "
        "(cache bytes per tier against block index, stacked, with the full cache for reference). "
        "report.json is rewritten as blocks come (after every block at first, then ever less often, "
        "lagging by at most 1/64 of the run) and at the end (status running/complete/interrupted/failed); the "
        "MP4 stays playable whatever happens; an interrupted run (Ctrl-C, SIGTERM) saves a checkpoint "
        "that --resume continues bit-exactly.",
        example=EXAMPLE,
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"YAML config file or preset name (default: the {DEFAULT_CONFIG!r} preset)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--blocks", type=int, default=None, help="number of blocks (default: run.blocks)")
    length.add_argument(
        "--seconds",
        type=positive_float,
        default=None,
        help="video length in seconds at run.fps, converted to whole blocks from the model's geometry "
        "(Wan: 1 + 4k pixel frames per 1 + k latent frames); instead of --blocks",
    )
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt", type=non_empty_text, metavar="TEXT", help="one text prompt for the whole video (fills run.prompts)"
    )
    prompts.add_argument(
        "--prompts", metavar="FILE", help="YAML/JSON prompt schedule: [{from_block | from_second, prompt | embeds}]"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: run.seed)")
    p.add_argument("--batch-size", type=int, default=None, help="videos generated together (default: run.batch_size)")
    p.add_argument("--out", default=None, help="output directory (required unless --resume)")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--save-latents", action="store_true", help="also write DIR/latents.safetensors (every block)")
    add_overrides(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--force", action="store_true", help="run even where a full-size model on the CPU is refused as too slow"
    )
    p.set_defaults(func=run)


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

    if args.prompt is not None:  # non-empty: its argparse type
        return [{"from_block": 0, "prompt": args.prompt}]
    if args.prompts is not None:
        return read_prompt_file(args.prompts, conditions=True)  # the model checks its own keys
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


def run(args: argparse.Namespace) -> int:
    from packforcing.core.build import build_for_planning, generation_blocker
    from packforcing.core.config import load_config
    from packforcing.core.geometry import temporal_stride_of
    from packforcing.models.wan.text import encode_schedule, to_block_schedule
    from packforcing.output.video import blocks_for_seconds, pixel_frames

    overrides = list(args.overrides)
    labels = ["--set"] * len(overrides)
    for key, value in (("run.blocks", args.blocks), ("run.seed", args.seed), ("run.batch_size", args.batch_size)):
        if value is not None:
            overrides.append(f"{key}={value}")
            labels.append("--" + key.split(".")[1].replace("_", "-"))
    common = {"save_latents": args.save_latents, "progress": not args.no_progress}
    if args.resume is not None:
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise UsageError("give --resume DIR alone (the run directory), or --out equal to it")
        explicit = args.config if args.config != DEFAULT_CONFIG else None
        changed = [opt for opt, v in (("--config", explicit), ("--seconds", args.seconds), ("--prompt", args.prompt),
                                      ("--prompts", args.prompts)) if v is not None]  # fmt: skip
        if changed or args.overwrite:
            raise UsageError(
                f"--resume continues the run as it was started: drop {', '.join(changed or ['--overwrite'])}"
            )
        report = run_job(None, args.resume, overrides=overrides, labels=labels, resume=True, **common)
        return _done(Path(args.resume), report)
    if args.out is None:
        raise UsageError("--out DIR is required (or --resume DIR)")
    out = Path(args.out)
    config_path = args.config or DEFAULT_CONFIG
    config = load_config(config_path, overrides, labels=labels)
    blocker = generation_blocker(config)
    if blocker is not None:  # a shapes-only preset: say so before anything else
        raise ConfigError(f"cannot generate: {blocker}", source=config.source_of("model"), path="model")
    # geometry first (no weights): seconds -> blocks, the prompt schedule, the CPU check
    env = build_for_planning(config)
    g = env.geometry
    assert g is not None, "a built environment has its model's geometry"
    stride = temporal_stride_of(env.model)
    fps = config.run.fps
    blocks = config.run.blocks
    if args.seconds is not None:
        blocks = blocks_for_seconds(args.seconds, fps, g.frames_per_block, stride)
    segments = prompt_segments(args, config)
    from_config = not (args.prompts or args.prompt)
    if segments is not None:
        where = (args.prompts or "--prompt") if (args.prompts or args.prompt) else "run.prompts"
        segments = to_block_schedule(
            segments, fps=fps, frames_per_block=g.frames_per_block, temporal_stride=stride, where=where
        )
    if not args.force:
        refuse_cpu_run(env, blocks)
    check_output(out, resume=False, overwrite=args.overwrite)  # before any text is encoded into it
    if segments is not None:
        check_given_conditions(env.model, segments, None if from_config else where, config)
    created = not out.exists()
    texts = None
    if segments is not None and any("prompt" in seg for seg in segments):
        texts = [{"from_block": seg["from_block"], "prompt": seg["prompt"]} for seg in segments if "prompt" in seg]
        if args.overwrite and (out / "prompts").is_dir():
            shutil.rmtree(out / "prompts")  # no stale embeddings of the earlier run
        # the text encoder runs (and is freed) before the model is built
        segments = encode_schedule(segments, text_encoder_params(config), out / "prompts")
    extra = [f"run.blocks={blocks}"]
    extra_labels = ["--seconds" if args.seconds is not None else config.source_of("run.blocks") or "--set"]
    if segments is not None:
        extra.append(f"run.prompts={json.dumps(segments)}")
        extra_labels.append(config.source_of("run.prompts") or "--set" if from_config else where)
    latent_frames = blocks * g.frames_per_block
    video = {
        "seconds_requested": args.seconds,
        "blocks": blocks,
        "latent_frames": latent_frames,
        "pixel_frames": pixel_frames(latent_frames, stride),
        "fps": fps,
        "video_seconds": pixel_frames(latent_frames, stride) / fps,
    }
    try:
        report = run_job(
            config_path,
            out,
            overrides=[*overrides, *extra],
            labels=[*labels, *extra_labels],
            overwrite=args.overwrite,
            details={"video": video, **({"prompts": texts} if texts else {})},
            **common,
        )
    except BaseException:
        if texts and not (out / "report.json").exists():  # refused before it started: leave no embeddings
            shutil.rmtree(out / "prompts", ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    return _done(out, report)


def _done(out: Path, report: dict[str, Any]) -> int:
    """The closing line: what was written, the blocks, their generation time (the blocks'
    ``seconds`` summed, over every attempt of a resumed run; decoding and writing the video are
    not in it) and the peak cache."""
    peak = report["peak_cache_bytes"] / 2**20
    video = out / "video.mp4"
    video_note = f"{video}, " if video.exists() else ""
    latents = out / "latents.safetensors"
    keep = "" if latents.exists() else "; --save-latents writes the latents"
    no_video = "" if video.exists() else f" (no video: the model has no decoder{keep}; for Wan, give model.vae)"
    latents_note = f", {latents}" if latents.exists() else ""
    print(
        f"wrote {video_note}{out / 'report.json'}, {out / 'memory.png'}{latents_note}: "
        f"{report['blocks_done']} blocks, {report['total_seconds']:.1f} s generating, peak cache {peak:.2f} MiB"
        f"{no_video}"
    )
    return 0


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; ``resume_dir`` holds a checkpoint to continue."""

    def __init__(
        self, signal_name: str = "SIGINT", blocks_done: int | None = None, resume_dir: Path | None = None
    ) -> None:
        self.signal_name = signal_name
        self.blocks_done = blocks_done
        self.resume_dir = resume_dir
        done = f" after {blocks_done} blocks" if blocks_done is not None else ""
        where = f"; resume with: packforcing generate --resume {resume_dir}" if resume_dir is not None else ""
        super().__init__(f"interrupted ({signal_name}){done}{where}")


class _Stop:
    """SIGINT/SIGTERM while blocks are generated: the first one asks the run to stop after the
    current block (so every saved state is a whole number of blocks); a second one, or one
    before generation starts, stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.deferred = False

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.deferred or self.requested is not None:
            raise Interrupted(signal_name=name)
        self.requested = name


def _comparable(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved config minus what a resumed run may change (the block count)."""
    run_block = {k: v for k, v in resolved.get("run", {}).items() if k not in ("blocks", "checkpoint_every")}
    return {**resolved, "run": run_block}


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Key paths where two JSON-able values differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "config"]


def _video_of_length(video: Mapping[str, Any], engine: Any, blocks: int, fps: float) -> dict[str, Any]:
    """The report's ``video`` section for a run of ``blocks`` blocks (a resumed run whose
    ``--blocks`` changed its length); ``seconds_requested`` stays what the run was started with."""
    from packforcing.core.geometry import temporal_stride_of
    from packforcing.output.video import pixel_frames

    latent_frames = blocks * engine.geometry.frames_per_block
    frames = pixel_frames(latent_frames, temporal_stride_of(engine.model))
    return {
        **video,
        "blocks": blocks,
        "latent_frames": latent_frames,
        "pixel_frames": frames,
        "fps": fps,
        "video_seconds": frames / fps,
    }


def run_job(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    labels: Sequence[str] | None = None,
    details: Mapping[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    save_latents: bool = False,
    progress: bool = False,
    registry: Any = None,
    wrap: Any = None,
    on_block: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate one run into ``out_dir`` (``video.mp4``, ``report.json``, ``memory.png``, and
    ``latents.safetensors`` with ``save_latents``); returns the report as a dict.

    The output directory is checked first. ``report.json`` is rewritten atomically as blocks
    come (``status: running``; after every block at first, then ever less often:
    :func:`~packforcing.cli.run_files.report_due`), at every checkpoint and on the way out
    (``complete``, ``interrupted``, ``failed``);
    ``memory.png`` is drawn on every exit path; the MP4 is playable after any block. On SIGINT
    or SIGTERM the whole generation state is saved to ``out_dir/checkpoint`` (also every
    ``run.checkpoint_every`` blocks) and :class:`Interrupted` is raised. ``resume=True``
    continues that run (``config`` may be ``None``: the run's own config is used) and gives
    latents bit-identical to an uninterrupted run. ``labels[i]`` names where ``overrides[i]``
    came from in errors; ``details`` are extra top-level report entries; ``wrap`` is passed to
    ``build_engine``; ``on_block(blocks_done)`` is called after each block is written.
    """
    out = Path(out_dir)
    check_output(out, resume=resume, overwrite=overwrite)
    created = not out.exists()
    stop = _Stop()
    try:
        with stop_signals_to(stop.handle):
            return _run(
                config, out, stop, overrides, labels, details, resume, overwrite, save_latents, progress, registry,
                wrap, on_block,
            )  # fmt: skip
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # failed before writing anything
            with contextlib.suppress(OSError):  # never hide the error that failed the run
                out.rmdir()
        raise


def _run(
    config: Any,
    out: Path,
    stop: _Stop,
    overrides: Sequence[str],
    labels: Sequence[str] | None,
    details: Mapping[str, Any] | None,
    resume: bool,
    overwrite: bool,
    save_latents: bool,
    progress: bool,
    registry: Any,
    wrap: Any,
    on_block: Callable[[int], None] | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    from packforcing.core.build import build_engine, check_config
    from packforcing.core.checkpoint import load_checkpoint
    from packforcing.output.report import RunReport

    state, extra = load_checkpoint(out / CHECKPOINT_DIR) if resume else (None, {})
    config, all_overrides = _run_config(config, out, overrides, labels, resume, state, extra, registry)
    config = check_config(config, registry=registry)
    prepare_output(out, overwrite=overwrite)
    engine = build_engine(config, registry=registry, wrap=wrap)
    g = engine.geometry
    run_params = config.run
    schedule = _schedule(engine, run_params, state)
    report_details = dict(details or extra.get("details") or {})
    if state is not None and isinstance(report_details.get("video"), Mapping):
        report_details["video"] = _video_of_length(report_details["video"], engine, run_params.blocks, run_params.fps)
    report = RunReport(
        config=config.resolved(),
        full_bytes_per_block=g.tokens_per_block * g.bytes_per_token * run_params.batch_size,
        conditions=schedule.as_list() or None,
        details=report_details,
        blocks_planned=run_params.blocks,
    )
    session = _session(engine, config, schedule, state)
    keep = {
        "config_source": str(Path(config.source).resolve()) if config.source else None,
        "config_data": config.data,
        "overrides": list(all_overrides),
        "config": config.resolved(),
        "details": report.details,
    }
    files = RunFiles(
        out, engine=engine, session=session, report=report, keep=keep, fps=run_params.fps,
        save_latents=save_latents, state=state, extra=extra,
    )  # fmt: skip
    bar = tqdm(
        total=run_params.blocks, initial=session.blocks_done, unit="block", disable=not progress, dynamic_ncols=True
    )
    try:
        if session.blocks_done < run_params.blocks:  # else complete comes next, and writes it
            files.write_report()
        stop.deferred = True
        while session.blocks_done < run_params.blocks:
            record = files.add(session.step())
            done, every = session.blocks_done, run_params.checkpoint_every
            files.after_block(
                checkpoint=bool(every) and done % every == 0 and done < run_params.blocks,
                # the run's last word comes next: complete, or interrupted (a stop asked during the block)
                ending=done >= run_params.blocks or stop.requested is not None,
            )
            bar.set_postfix(cache=f"{record['cache_bytes'] / 2**20:.1f}MiB", ctx=record["context_tokens"])
            bar.update(1)
            if on_block is not None:
                on_block(session.blocks_done)
            if stop.requested is not None and session.blocks_done < run_params.blocks:
                raise Interrupted(signal_name=stop.requested)
        if stop.requested is not None:  # asked during the last block: stopping after it is completing
            bar.close()
            print(f"{stop.requested} during the last block: the run is complete", file=sys.stderr)
        # every block is made: the run is written out whole, and a signal now is ignored (the
        # run is complete, with all its files; a half-written ending would be neither complete
        # nor resumable)
        with stop_signals_to(signal.SIG_IGN):
            bar.close()
            session.close()
            files.complete(keep_checkpoint=bool(run_params.checkpoint_every))
    except KeyboardInterrupt as exc:
        bar.close()
        signal_name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        with stop_signals_to(signal.SIG_IGN):  # the run's state is being saved on the way out
            if files.consistent():
                try:
                    # not saved again if on disk already (run.checkpoint_every's, at this very
                    # state); finish() writes the report, with its status
                    files.checkpoint(report=False)
                except OSError as error:  # not resumable after all: say so, naming the file
                    files.finish("failed", " ".join(str(error).split()))
                    session.close()
                    raise
            files.finish("interrupted")
            session.close()
        resumable = (out / CHECKPOINT_DIR / "state.json").is_file()
        raise Interrupted(signal_name, session.blocks_done, out if resumable else None) from None
    except BaseException as exc:
        bar.close()
        with stop_signals_to(signal.SIG_IGN):  # the run's state is being saved on the way out
            files.finish("failed", " ".join(str(exc).split()) or type(exc).__name__)
            session.close()
        raise
    return report.as_dict()


def _run_config(
    config: Any,
    out: Path,
    overrides: Sequence[str],
    labels: Sequence[str] | None,
    resume: bool,
    state: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
    registry: Any,
) -> tuple[Config, list[str]]:
    """The run's config and every override applied to it. A resumed run (``state`` and
    ``extra`` from its checkpoint) rebuilds the config it was started with (``config`` may be
    ``None``), plus ``overrides``; it must come out the same but for its length, and no
    shorter than the blocks already made."""
    from packforcing.core.config import Config, load_config

    source = config if config is not None else extra.get("config_source")
    earlier = list(extra.get("overrides", [])) if resume and config is None else []
    all_overrides = [*earlier, *overrides]
    all_labels = ["--set"] * len(earlier) + list(labels if labels is not None else ["--set"] * len(overrides))
    if isinstance(source, Config) and not all_overrides:
        config = source
    else:
        base = source.data if isinstance(source, Config) else extra["config_data"] if source is None else source
        config = load_config(base, all_overrides, registry=registry, labels=all_labels)
    if resume:
        changed = _differences(_comparable(extra.get("config", {})), _comparable(config.resolved()))
        if changed:
            raise RunError(
                f"{out}: the config differs from the one the run was started with ({', '.join(changed[:3])}); "
                "resume it unchanged (only run.blocks may change)"
            )
        done = int(state["meta"]["blocks_done"]) if state is not None else 0
        if config.run.blocks < done:  # refused before anything is changed
            where = config.source_of("run.blocks")
            option = f"--blocks {config.run.blocks}" if where == "--blocks" else f"run.blocks={config.run.blocks}"
            raise RunError(f"{option}: the run already has {done} blocks")
    return config, all_overrides


def _schedule(engine: Any, run_params: Any, state: Mapping[str, Any] | None) -> Any:
    """The run's :class:`~packforcing.core.conditions.ConditionSchedule`: ``run.prompts``; a
    resumed run's own (the session's), also when ``--blocks`` extends it (the default schedule
    of a longer fresh run may be laid out differently); else a conditional model's default
    (tiny_dit with scenes: revisit scenes)."""
    from packforcing.core.conditions import ConditionSchedule

    if state is not None:
        return ConditionSchedule.parse(state["meta"].get("conditions") or None, name="run.prompts")
    schedule = run_params.schedule()
    if not schedule.starts and hasattr(engine.model, "default_conditions"):
        return ConditionSchedule.parse(
            engine.model.default_conditions(run_params.blocks, run_params.seed), name="run.prompts"
        )
    return schedule


def _session(engine: Any, config: Config, schedule: Any, state: Mapping[str, Any] | None) -> Any:
    """A new session, or the checkpoint's ``state`` loaded; a schedule the model does not take
    is a :class:`ConfigError` at ``run.prompts``."""
    from packforcing.core.conditions import ConditionError

    run_params = config.run
    try:
        if state is not None:
            return engine.load_state_dict(state)
        return engine.session(
            seed=run_params.seed, batch_size=run_params.batch_size, conditions=schedule, recache=run_params.recache
        )
    except ConditionError as exc:
        path = exc.path("run.prompts")
        raise ConfigError(exc.message, source=config.source_of(path), path=path) from None
