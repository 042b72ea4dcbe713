"""What reliability costs: boundary checks against the attention they guard, and the durable
(fragmented, fsynced per block) MP4 against the streaming writer.

Writes ``results/reliability_costs.{json,md}``. Two parts, each a ratio measured in one run:

- checks: the per-call checks on a backend's output (shape/dtype/device + one finiteness
  reduction over ``[B, Nq, H, D]``) and on a selector's indices, timed against the SDPA call
  they follow, at a tiny and a Wan-like (one latent frame of queries, a quarter of the
  PackForcing context) size;
- video: seconds per appended block for ``FragmentedMP4Writer`` (playable after a SIGKILL)
  and the streaming ``VideoWriter`` (playable only once closed).

Run: ``python benchmarks/reliability_costs.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import add_out, markdown_table, write_results

from packforcing.core.boundary import selection_problem, tensor_problem
from packforcing.output.video import FragmentedMP4Writer, VideoWriter


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def checks(repeats: int) -> list[dict]:
    rows = []
    for name, (nq, nk, heads, dim) in {
        "tiny (64 q, 1k ctx, 2x16)": (64, 1024, 2, 16),
        "wan-like (1560 q, 7k ctx, 12x128)": (1560, 6968, 12, 128),
    }.items():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, nq, dim, generator=gen)
        k = torch.randn(1, heads, nk, dim, generator=gen)
        v = torch.randn(1, heads, nk, dim, generator=gen)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        idx = torch.arange(4).unsqueeze(0)
        attend = best_of(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), repeats)
        check_out = best_of(
            lambda out=out: tensor_problem("output", out, tuple(out.shape), out.dtype, out.device), repeats
        )
        check_sel = best_of(
            lambda idx=idx: selection_problem(idx, batch=1, budget=4, candidates=16, device=idx.device), repeats
        )
        rows.append(
            {
                "size": name,
                "sdpa_s": attend,
                "output_check_s": check_out,
                "selection_check_s": check_sel,
                "checks_over_sdpa": (check_out + check_sel) / attend,
            }
        )
    return rows


def video(repeats: int) -> list[dict]:
    rows = []
    for name, (frames, height, width) in {"tiny 4x64x64": (4, 64, 64), "wan 4x480x832": (4, 480, 832)}.items():
        block = np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            durable = FragmentedMP4Writer(Path(tmp) / "f.mp4", fps=16)
            streaming = VideoWriter(Path(tmp) / "s.mp4", fps=16)
            t_durable = best_of(lambda b=block, w=durable: w.append(b), repeats)
            t_stream = best_of(lambda b=block, w=streaming: w.append(b), repeats)
            streaming.close()
        rows.append(
            {
                "block": name,
                "fragmented_s": t_durable,
                "streaming_s": t_stream,
                "ratio": t_durable / t_stream if t_stream else float("inf"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_out(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_rows = checks(args.repeats)
    video_rows = video(args.repeats)
    table = markdown_table(
        ["size", "SDPA s", "output check s", "selection check s", "checks / SDPA"],
        [
            [r["size"], r["sdpa_s"], r["output_check_s"], r["selection_check_s"], r["checks_over_sdpa"]]
            for r in check_rows
        ],
    )
    table += "\n" + markdown_table(
        ["block", "fragmented MP4 s/block", "streaming MP4 s/block", "ratio"],
        [[r["block"], r["fragmented_s"], r["streaming_s"], r["ratio"]] for r in video_rows],
    )
    table += (
        "\nThe streaming writer's append only hands frames to its ffmpeg process (the encoding runs "
        "concurrently there and nothing is playable before close); the fragmented writer encodes and "
        "fsyncs the block before returning, so the MP4 holds every finished block after a SIGKILL.\n"
    )
    write_results("reliability_costs", {"checks": check_rows, "video": video_rows, "threads": 1}, table, args.out)


if __name__ == "__main__":
    main()
