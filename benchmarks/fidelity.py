"""Fidelity of each memory policy on the trained world model, at 1× and 24× its training length.

The model (``configs/*.yaml``' default, trained on clips of ``train_blocks`` blocks of the scenes
world, :mod:`packforcing.worlds`) generates videos whose scene schedule keeps cutting back to
scenes last seen many blocks earlier. Off-screen scenes are frozen, so the block after a return
is determined by what the scene looked like when it was last on screen. For each policy,
horizon and seed (unseen worlds), in one run:

- **teacher-forced return PSNR** (dB): the cache is filled with the world's ground-truth clean
  blocks (``session.observe``); at every cut back to a scene the model predicts the block
  (``session.predict``), compared with the ground truth on decoded pixels;
- **free-running return PSNR** (dB): in free generation, the first frame after a return against
  the last frame of that scene's previous visit (they match in the world);
- **drift**: per scene, the total-variation distance between the colour histograms of its last
  visit and its first visit (free generation), averaged over scenes shown more than once
  (0 = same colours; the ground truth's own value is reported as a reference);
- **memory and time**: peak cache bytes held, mean milliseconds per free-running block.

Run from the repository root::

    python benchmarks/fidelity.py            # 3 seeds, 1x and 24x   -> benchmarks/results/fidelity.*
    python benchmarks/fidelity.py --quick    # 2 seeds (<= 5 min on 2 cores)
    python benchmarks/fidelity.py --smoke --out /tmp/f   # seconds: 1 seed, 1x and 2x, 1 sampler step
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine, markdown_table

import packforcing as pf
from packforcing.cli import one_line
from packforcing.cli.argtypes import positive_int
from packforcing.compressors.dual_branch import resolve_weights
from packforcing.training.model import read_metadata, training_world_seeds, world_params_for
from packforcing.worlds import SceneWorld, conditions, returns, revisit_schedule

POLICIES: dict[str, tuple[str, list[str]]] = {
    "full": ("full.yaml", []),
    "sliding_window": ("sliding_window.yaml", []),
    "sink_recent": ("sink_recent.yaml", []),
    "packforcing": ("packforcing.yaml", []),
    "packforcing_pool": ("packforcing.yaml", ["compressor.name=pool"]),
    "packforcing_recency": ("packforcing.yaml", ["selector.name=recency", "selector.k=4"]),
}
"""name -> (preset in configs/, overrides): PackForcing with dual_branch + topk, then with the
training-free ``pool`` compressor and with the FIFO ``recency`` selector."""

DIAGNOSTICS: dict[str, tuple[str, list[str]]] = {
    "pf_mid_uncompressed": ("packforcing_tiered.yaml", ["policy.tiers[1].fidelity=full"]),
    "pf_mid_bank_64": ("packforcing.yaml", ["policy.mid_capacity_blocks=64"]),
    "pf_mid_bank_64_uncompressed": (
        "packforcing_tiered.yaml",
        ["policy.tiers[1].fidelity=full", "policy.tiers[1].blocks=64"],
    ),
    "pf_window_anchor": ("packforcing.yaml", ["realigner.anchor=window"]),
    "pf_mid_bank_32_uncompressed": (
        "packforcing_tiered.yaml",
        ["policy.tiers[1].fidelity=full", "policy.tiers[1].blocks=32"],
    ),
    "pf_mid_bank_32_pool_8x": (
        "packforcing.yaml",
        ["compressor.name=pool", "compressor.window=[2,2,2]", "policy.mid_capacity_blocks=32"],
    ),
}
"""``--diagnose``: PackForcing variants that isolate one part each — the compressor (mid kept at
full resolution), the bank size (nothing archived within 64 blocks), both, positions (context
positions relative to the window, bounded), and a 32-block bank kept at full resolution or
pooled 8× (8 tokens per block instead of dual_branch's 2)."""

WORLD_SEED = 100_000
"""Evaluation worlds are seeded from here: never one of the training clips' worlds (checked
against the weights' metadata, :func:`leaked_worlds`)."""
PROBE_SEED = WORLD_SEED + 500
"""The context probe's clips are seeded from here."""
PROBE_CLIPS = 8

BINS = [(2, 3), (4, 6), (7, 10), (11, 16), (17, 24), (25, 10**9)]
"""Blocks since the scene was last seen, binned for the plot."""


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pixels in ``[-1, 1]`` (clamped; peak-to-peak 2)."""
    mse = float((a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-10))


def histogram(pixels: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Normalised per-channel colour histogram ``[3 * bins]`` of pixels ``[3, T, H, W]``."""
    x = pixels.clamp(-1, 1)
    return torch.cat([torch.histc(x[c], bins=bins, min=-1, max=1) for c in range(3)]) / x[0].numel() / 3


def drift(pixels: torch.Tensor, schedule: Sequence[int], frames_per_block: int) -> float:
    """Mean over scenes shown more than once of TV(hist(last visit), hist(first visit))."""
    visits: dict[int, list[list[int]]] = defaultdict(list)
    for block, scene in enumerate(schedule):
        if block and schedule[block - 1] == scene:
            visits[scene][-1].append(block)
        else:
            visits[scene].append([block])
    out = []
    for runs in visits.values():
        if len(runs) < 2:
            continue

        def frames(blocks: list[int]) -> torch.Tensor:
            return pixels[:, blocks[0] * frames_per_block : (blocks[-1] + 1) * frames_per_block]

        out.append(0.5 * float((histogram(frames(runs[-1])) - histogram(frames(runs[0]))).abs().sum()))
    return sum(out) / len(out) if out else float("nan")


def schedule_for(blocks: int, train_blocks: int, num_scenes: int, seed: int) -> list[int]:
    """At the training length: new scenes, then cuts back to the first ones (each return comes
    ``n_new`` blocks after the scene was seen, beyond the sliding window). Longer: a random
    revisiting schedule (segments of 1–3 blocks, absences growing with the scenes in play)."""
    if blocks <= train_blocks:
        order = torch.randperm(num_scenes, generator=torch.Generator().manual_seed(seed)).tolist()
        n_new = min(num_scenes, max(2, blocks - blocks // 3))
        return [order[i % n_new] for i in range(blocks)]
    scenes = min(num_scenes, max(2, blocks // 4))  # short horizons: few enough scenes to come back to
    return revisit_schedule(blocks, scenes, seed, segment_blocks=(1, 3), new_scene_probability=0.5)


def engine_for(policy: str, overrides: Sequence[str]) -> Any:
    preset, extra = {**POLICIES, **DIAGNOSTICS}[policy]
    config = pf.load_config(
        ROOT / "configs" / preset, [*extra, "run.device=cpu", "run.dtype=float32", "backend.name=sdpa", *overrides]
    )
    return pf.build_engine(config)


def run_one(engine: Any, world: SceneWorld, schedule: list[int], seed: int) -> dict[str, Any]:
    """Teacher-forced and free-running figures of one policy on one video."""
    codec = engine.model.codec
    f = engine.geometry.frames_per_block
    segments = conditions(schedule)
    truth = codec.encode(world.render(schedule)[None])  # [1, C, T, H, W]
    truth_px = codec.decode(truth)[0]
    cuts = returns(schedule)
    back = {r.block: r for r in cuts}

    teacher: list[dict[str, Any]] = []
    with engine.session(seed=seed, conditions=segments) as session:
        for block in range(len(schedule)):
            gt = truth[:, :, block * f : (block + 1) * f]
            if block in back:
                predicted = codec.decode(session.predict())[0]
                r = back[block]
                teacher.append(
                    {
                        "block": block,
                        "blocks_since": r.blocks_since,
                        "psnr_db": psnr(predicted, truth_px[:, block * f : (block + 1) * f]),
                    }
                )
            session.observe(gt)

    free: list[dict[str, Any]] = []
    pixels = []
    seconds = []
    peak = 0
    with engine.session(seed=seed, conditions=segments) as session:
        for _block in range(len(schedule)):
            out = session.step()
            pixels.append(codec.decode(out.latents)[0])
            seconds.append(out.seconds)
            peak = max(peak, out.stats.bytes)
    video = torch.cat(pixels, dim=1)
    for r in cuts:
        first = video[:, r.block * f]
        last = video[:, (r.last_block + 1) * f - 1]
        free.append({"block": r.block, "blocks_since": r.blocks_since, "psnr_db": psnr(first, last)})
    steady = seconds[1:] or seconds
    return {
        "teacher": teacher,
        "free": free,
        "drift": drift(video, schedule, f),
        "truth_drift": drift(truth_px, schedule, f),
        "peak_cache_bytes": peak,
        "ms_per_block": 1000 * sum(steady) / len(steady),
    }


def leaked_worlds(meta: dict[str, Any], seeds: Sequence[int]) -> list[int]:
    """The world seeds of ``seeds`` that the weights (metadata ``meta``) were trained on."""
    trained = training_world_seeds(meta)
    return [s for s in seeds if any(s in r for r in trained)]


def context_probe(engine: Any, world_params: Any, train_blocks: int, clips: int = PROBE_CLIPS) -> dict[str, Any]:
    """Does the model read its context? One teacher-forced pass at σ = 1 (the block is pure
    noise, so everything it can know about the block comes from the cached history) over
    unseen training-length clips: the x̂₀ error per block position against the error of copying
    the previous frame and of predicting the clips' mean; and how much x̂₀ moves when the
    first two blocks of history are swapped between clips."""
    from packforcing.attention.backends import SdpaBackend
    from packforcing.core.context import MaskedContext
    from packforcing.training.model import TeacherContext, render_clips, teacher_masks

    model = engine.model
    backend = SdpaBackend()
    f = model.geometry.frames_per_block
    clean, scenes = render_clips(model, world_params, train_blocks, [PROBE_SEED + i for i in range(clips)])
    masks = teacher_masks(train_blocks, model.geometry.tokens_per_block)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    steps = torch.full(scenes.shape, 1000.0)

    def x0(history: torch.Tensor) -> torch.Tensor:
        keys, values = model.clean_kv(history, MaskedContext(backend, masks[0]), condition=scenes)
        return noise - model.denoise(noise, steps, TeacherContext(backend, keys, values, masks[1]), condition=scenes)

    with torch.no_grad():
        predicted = x0(clean)
        swapped = clean.clone()
        swapped[:, :, : 2 * f] = swapped[:, :, : 2 * f].roll(1, dims=0)
        moved = float((x0(swapped) - predicted)[:, :, 2 * f : 3 * f].pow(2).mean())
    previous = torch.cat([clean[:, :, :1], clean[:, :, :-1]], dim=2)
    per_block = (predicted - clean).pow(2).mean(dim=(1, 3, 4)).view(clips, train_blocks, f).mean(dim=(0, 2))
    return {
        "sigma": 1.0,
        "x0_mse_by_block": [round(float(v), 4) for v in per_block],
        "x0_mse": float((predicted - clean).pow(2).mean()),
        "copy_previous_frame_mse": float((previous - clean).pow(2).mean()),
        "mean_prediction_mse": float(clean.var()),
        "x0_change_when_history_swapped": moved,
    }


def mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """Standard deviation across seeds (0 for one seed)."""
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarise(policy: str, horizon: str, blocks: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result row: means over seeds of per-seed means, with the spread across seeds."""
    tf = [mean([r["psnr_db"] for r in run["teacher"]]) for run in runs]
    fr = [mean([r["psnr_db"] for r in run["free"]]) for run in runs]
    dr = [run["drift"] for run in runs]
    return {
        "policy": policy,
        "horizon": horizon,
        "blocks": blocks,
        "seeds": len(runs),
        "peak_cache_bytes": max(run["peak_cache_bytes"] for run in runs),
        "teacher_forced_return_psnr_db": mean(tf),
        "free_return_psnr_db": mean(fr),
        "drift": mean(dr),
        "ms_per_block": mean([run["ms_per_block"] for run in runs]),
        "spread": {
            "teacher_forced_return_psnr_db": spread(tf),
            "free_return_psnr_db": spread(fr),
            "drift": spread(dr),
        },
        "returns": sum(len(run["teacher"]) for run in runs),
        "truth_drift": mean([run["truth_drift"] for run in runs]),
        "by_blocks_since": {
            "teacher": [[r["blocks_since"], r["psnr_db"]] for run in runs for r in run["teacher"]],
            "free": [[r["blocks_since"], r["psnr_db"]] for run in runs for r in run["free"]],
        },
    }


def plot(results: list[dict[str, Any]], path: Path, horizon: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, title in (
        (axes[0], "teacher", "teacher-forced: predicted block vs ground truth"),
        (axes[1], "free", "free-running: first frame back vs last frame seen"),
    ):
        for row in results:
            if row["horizon"] != horizon:
                continue
            xs, ys = [], []
            for lo, hi in BINS:
                vals = [p for s, p in row["by_blocks_since"][kind] if lo <= s <= hi]
                if vals:
                    xs.append((lo + min(hi, lo + 8)) / 2)
                    ys.append(mean(vals))
            ax.plot(xs, ys, marker="o", label=row["policy"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("blocks since the scene was last seen")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("return PSNR (dB)")
    axes[1].legend(fontsize=8)
    blocks = next(r["blocks"] for r in results if r["horizon"] == horizon)
    fig.suptitle(f"Return fidelity at {horizon} the training length ({blocks} blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    full = {r["horizon"]: r["peak_cache_bytes"] for r in results if r["policy"] == "full"}
    rows = []
    for r in results:
        s = r["spread"]
        rows.append(
            [
                r["policy"],
                f"{r['horizon']} ({r['blocks']})",
                f"{r['teacher_forced_return_psnr_db']:.2f} ± {s['teacher_forced_return_psnr_db']:.2f}",
                f"{r['free_return_psnr_db']:.2f} ± {s['free_return_psnr_db']:.2f}",
                f"{r['drift']:.3f}",
                f"{r['peak_cache_bytes'] / 2**20:.3f}",
                f"{r['peak_cache_bytes'] / full[r['horizon']]:.3f}" if r["horizon"] in full else "",
                f"{r['ms_per_block']:.1f}",
            ]
        )
    headers = [
        "policy",
        "horizon (blocks)",
        "teacher-forced return PSNR dB",
        "free return PSNR dB",
        "drift",
        "peak cache MiB",
        "× full's bytes",
        "ms/block",
    ]
    return markdown_table(headers, rows)


def markdown(data: dict[str, Any], *, head: bool = True) -> str:
    """``fidelity.md`` from the results ``data`` (``fidelity.json``'s content): the table, the
    ground truth's own drift (the floor a policy's drift compares to), the diagnostics and the
    context probe; with ``head``, the title line naming the model, seeds and machine."""
    results, diagnostics, probe = data["results"], data["diagnostics"], data["context_probe"]
    md = table(results)
    truth = {r["horizon"]: r["truth_drift"] for r in results if "truth_drift" in r}
    if truth:
        md += (
            "\nDrift of the ground truth itself (its scenes' own colour change between first and last visit, "
            "the floor of the drift column): " + ", ".join(f"{h} {d:.3f}" for h, d in truth.items()) + ".\n"
        )
    if diagnostics:
        rows = [r for r in results if r["horizon"] == diagnostics[0]["horizon"] and r["policy"] == "full"]
        md += "\nDiagnostics (PackForcing variants, " + diagnostics[0]["horizon"] + "):\n\n" + table(rows + diagnostics)
    if probe is not None:
        md += (
            "\nContext probe (one teacher-forced pass at σ = 1, clips of the training length): x̂₀ MSE "
            f"{probe['x0_mse']:.3f} (by block position {probe['x0_mse_by_block']}) vs copying the previous "
            f"frame {probe['copy_previous_frame_mse']:.3f} and predicting the mean {probe['mean_prediction_mse']:.3f}; "
            f"x̂₀ moves by {probe['x0_change_when_history_swapped']:.3f} (MSE) when two blocks of history are swapped.\n"
        )
    if not head:
        return md
    model, seeds = data["model"], results[0]["seeds"] if results else 0
    return (
        f"### fidelity\n\nModel `{model['weights']}` ({model['steps']} steps, clips of {data['train_blocks']} blocks); "
        f"{seeds} seed(s); mean ± spread across seeds. Machine: {data['machine']}\n\n{md}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=positive_int, default=3, help="videos per policy and horizon (default 3)")
    parser.add_argument(
        "--multiples", type=positive_int, nargs="+", default=[1, 24], help="horizons in training lengths"
    )
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--quick", action="store_true", help="at most 2 seeds (<= 5 min)")
    parser.add_argument("--smoke", action="store_true", help="seconds: 1 seed, 1x and 2x, one sampler step")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also run the DIAGNOSTICS variants at the longest horizon",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default benchmarks/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for all")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.quick:
        args.seeds = min(args.seeds, 2)
    if args.smoke:
        args.seeds, args.multiples = 1, [1, 2]
        overrides.append("sampler.steps=1")
    torch.set_num_threads(1)
    try:
        probe = engine_for("full", overrides)
    except pf.ConfigError as exc:
        parser.exit(2, f"error: {one_line(exc)}\n")
    weights = probe.config.components["model"].params.weights
    meta = read_metadata(resolve_weights(weights)) if weights else {}
    evaluated = [WORLD_SEED + seed for seed in range(args.seeds)]
    if args.diagnose:
        evaluated += [PROBE_SEED + i for i in range(PROBE_CLIPS)]
    leaked = leaked_worlds(meta, evaluated)
    if leaked:
        parser.exit(
            1,
            f"error: {weights}: trained on the worlds seeded {leaked[0]}"
            f"{f' (and {len(leaked) - 1} more)' if len(leaked) > 1 else ''}, which this benchmark "
            "evaluates on: its figures would not be of unseen worlds\n",
        )
    out = args.out
    try:  # before the run, not after it
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: {out}: {exc.strerror or exc}")
    train_blocks = int(meta.get("train_blocks", 6))
    world_params = world_params_for(probe.model)
    del probe

    started = time.perf_counter()
    results = []
    for multiple in args.multiples:
        blocks = multiple * train_blocks
        horizon = f"{multiple}x"
        for policy in args.policies:
            engine = engine_for(policy, overrides)
            runs = []
            for seed in range(args.seeds):
                schedule = schedule_for(blocks, train_blocks, world_params.num_scenes, seed)
                world = SceneWorld(world_params, WORLD_SEED + seed)
                runs.append(run_one(engine, world, schedule, seed))
            row = summarise(policy, horizon, blocks, runs)
            results.append(row)
            print(
                f"{policy:20s} {horizon:>4s} teacher-forced {row['teacher_forced_return_psnr_db']:6.2f} dB  "
                f"free {row['free_return_psnr_db']:6.2f} dB  drift {row['drift']:.3f}  "
                f"peak {row['peak_cache_bytes'] / 2**20:.3f} MiB  {row['ms_per_block']:.1f} ms/block  "
                f"({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    diagnostics = []
    probe = None
    if args.diagnose:
        probe = context_probe(engine_for("full", overrides), world_params, train_blocks)
        print(f"context probe (sigma = 1): {probe}", flush=True)
        multiple = max(args.multiples)
        blocks = multiple * train_blocks
        for policy in DIAGNOSTICS:
            engine = engine_for(policy, overrides)
            runs = [
                run_one(
                    engine,
                    SceneWorld(world_params, WORLD_SEED + seed),
                    schedule_for(blocks, train_blocks, world_params.num_scenes, seed),
                    seed,
                )
                for seed in range(args.seeds)
            ]
            row = summarise(policy, f"{multiple}x", blocks, runs)
            diagnostics.append(row)
            print(
                f"{policy:28s} teacher-forced {row['teacher_forced_return_psnr_db']:6.2f} dB  "
                f"free {row['free_return_psnr_db']:6.2f} dB  peak {row['peak_cache_bytes'] / 2**20:.3f} MiB",
                flush=True,
            )
    data = {
        "benchmark": "fidelity",
        "train_blocks": train_blocks,
        "results": results,
        "diagnostics": diagnostics,
        "context_probe": probe,
        "model": {"weights": weights, "steps": meta.get("steps"), "commit": meta.get("commit")},
        "world": world_params.as_dict(),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "seconds": time.perf_counter() - started,
        "machine": machine(),
    }
    (out / "fidelity.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "fidelity.md").write_text(markdown(data))
    md = markdown(data, head=False)
    longest = f"{max(args.multiples)}x"
    plot(results, out / "fidelity.png", longest)
    print(md)
    print(f"wrote {out / 'fidelity.json'}, .md and .png in {data['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
