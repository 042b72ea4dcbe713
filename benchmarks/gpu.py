"""GPU benchmarks (CUDA only): attention backends at the Wan context shape, and the share of
block time that cache management takes in a PackForcing engine run at a Wan-like geometry.

1. bf16 matmul peak, measured here (8192³ GEMM), as the yardstick.
2. xformers vs SDPA attention, 6,240 queries × 27,872 keys, 12 heads × 128, bf16: time,
   TFLOP/s (4·Nq·Nk·H·D per call) and fraction of the measured matmul peak.
3. An engine run with the `packforcing` policy on `tiny_dit` scaled to Wan's latent grid and
   width (random weights, fewer layers): block time and the instrumented breakdown.

    python benchmarks/gpu.py [--layers 4] [--blocks 24]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import POLICY_CONFIGS, markdown_table, write_results

import packforcing as pf
from packforcing.attention import SdpaBackend, XformersBackend, xformers_available
from packforcing.core.instrument import SectionTimer, timing_wrapper

WAN_Q, WAN_K, WAN_H, WAN_D = 6240, 27872, 12, 128


def cuda_time(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def matmul_peak() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = cuda_time(lambda: a @ b)
    return 2 * n**3 / seconds / 1e12


def attention_rows(peak: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, WAN_Q, WAN_H, WAN_D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, WAN_K, WAN_H, WAN_D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, WAN_K, WAN_H, WAN_D, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops = 4 * WAN_Q * WAN_K * WAN_H * WAN_D
    backends = [SdpaBackend()]
    if xformers_available():
        backends.append(XformersBackend())
    rows = []
    reference = None
    for backend in backends:
        seconds = cuda_time(lambda backend=backend: backend.attend(q, k, v))
        out = backend.attend(q, k, v).float()
        reference = out if reference is None else reference
        rows.append(
            {
                "backend": backend.name,
                "ms": seconds * 1e3,
                "tflops": flops / seconds / 1e12,
                "fraction_of_matmul_peak": flops / seconds / 1e12 / peak,
                "max_abs_diff_vs_sdpa": float((out - reference).abs().max()),
            }
        )
    return rows


def engine_run(layers: int, blocks: int) -> dict:
    overrides = [
        "run.device=cuda",
        "run.dtype=bfloat16",
        "model.latent_height=60",
        "model.latent_width=104",
        "model.hidden_size=1536",
        "model.num_heads=12",
        f"model.num_layers={layers}",
        *WAN_LIKE_OVERRIDES,
    ]
    config = pf.load_config(POLICY_CONFIGS["packforcing"], overrides)
    engine = pf.build_engine(config)
    plain = [b.seconds for b in engine.generate(blocks, seed=0)]
    timer = SectionTimer(sync=True)
    timed_engine = pf.build_engine(config, wrap=timing_wrapper(timer))
    started = time.perf_counter()
    blocks_done = list(timed_engine.generate(blocks, seed=0))
    last = blocks_done[-1] if blocks_done else None
    total = time.perf_counter() - started
    shares = {k: v / total for k, v in timer.breakdown(total).items()}
    cache_share = sum(shares[k] for k in ("compression", "selection", "realignment", "bookkeeping"))
    tail = plain[len(plain) // 2 :]
    return {
        "layers": layers,
        "blocks": blocks,
        "block_seconds_median_late": sorted(tail)[len(tail) // 2],
        "block_seconds": plain,
        "breakdown_share": shares,
        "cache_management_share": cache_share,
        "realignment_share": shares["realignment"],
        "context_tokens": last.context_tokens if last else 0,
        "cache_bytes": last.stats.bytes if last else 0,
    }


# the paper's sizes (sink 8 frames, recent 4, top-16 from a bank of 32 mid blocks); the trained tiny
# compressor does not fit Wan's width, so a fresh one of the paper's channel ladder is used
WAN_LIKE_OVERRIDES: list[str] = [
    "policy.sink_frames=8",
    "policy.recent_frames=4",
    "policy.mid_capacity_blocks=32",
    "selector.k=16",
    "compressor.weights=null",
    "compressor.hr_channels=[32, 128, 512, 2048]",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=24)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA; nothing measured.", file=sys.stderr)
        return 1
    peak = matmul_peak()
    attn = attention_rows(peak)
    run = engine_run(args.layers, args.blocks)
    table = f"Device: {torch.cuda.get_device_name(0)}; measured bf16 matmul peak {peak:.0f} TFLOP/s.\n\n"
    table += markdown_table(
        ["backend", "ms", "TFLOP/s", "fraction of matmul peak"],
        [[r["backend"], r["ms"], r["tflops"], r["fraction_of_matmul_peak"]] for r in attn],
    )
    s = run["breakdown_share"]
    table += (
        f"\nEngine, packforcing policy, Wan-like geometry ({args.layers} layers, random weights), "
        f"{args.blocks} blocks:\n\n"
    )
    table += markdown_table(
        ["late block s", "forward %", "compress %", "select %", "gather+realign %", "bookkeeping %", "cache mgmt %"],
        [
            [
                run["block_seconds_median_late"],
                100 * s["model_forward"],
                100 * s["compression"],
                100 * s["selection"],
                100 * s["realignment"],
                100 * s["bookkeeping"],
                100 * run["cache_management_share"],
            ]
        ],
    )
    write_results("gpu", {"matmul_peak_tflops": peak, "attention": attn, "engine": run}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
