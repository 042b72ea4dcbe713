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

import attrs
import torch
from common import POLICY_CONFIGS, add_out, markdown_table, median_time, write_results

import packforcing as pf
from packforcing.attention import SdpaBackend, XformersBackend, xformers_available
from packforcing.core.instrument import SectionTimer, timing_wrapper


@attrs.frozen
class Sizes:
    """What one run measures: the real GPU run, or a CPU smoke run of the same code paths."""

    device: str
    dtype: torch.dtype
    attention: tuple[int, int, int, int]  # queries, keys, heads, head dim
    matmul: int
    model: tuple[str, ...]  # config overrides of the engine run

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


GPU = Sizes(
    "cuda",
    torch.bfloat16,
    (6240, 27872, 12, 128),  # the Wan context: one 4-frame block over sink + 16 mid + recent + itself
    8192,
    ("model.latent_height=60", "model.latent_width=104", "model.hidden_size=1536", "model.num_heads=12"),
)
SMOKE = Sizes("cpu", torch.float32, (64, 256, 2, 32), 256, ("model.hidden_size=64", "model.num_heads=2"))


def matmul_peak(sizes: Sizes) -> float:
    n = sizes.matmul
    a = torch.randn(n, n, device=sizes.device, dtype=sizes.dtype)
    b = torch.randn(n, n, device=sizes.device, dtype=sizes.dtype)
    seconds = median_time(lambda: a @ b, sizes.cuda)
    return 2 * n**3 / seconds / 1e12


def attention_rows(sizes: Sizes, peak: float) -> list[dict]:
    nq, nk, h, d = sizes.attention
    gen = torch.Generator(device=sizes.device).manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, device=sizes.device, dtype=sizes.dtype, generator=gen) for n in (nq, nk, nk))
    flops = 4 * nq * nk * h * d
    backends = [SdpaBackend()]
    if sizes.cuda and xformers_available():
        backends.append(XformersBackend())
    rows = []
    reference = None
    for backend in backends:
        seconds = median_time(lambda backend=backend: backend.attend(q, k, v), sizes.cuda)
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


def engine_run(sizes: Sizes, layers: int, blocks: int) -> dict:
    dtype = str(sizes.dtype).removeprefix("torch.")
    overrides = [
        f"run.device={sizes.device}",
        f"run.dtype={dtype}",
        *sizes.model,
        f"model.num_layers={layers}",
        *WAN_LIKE_OVERRIDES,
    ]
    config = pf.load_config(POLICY_CONFIGS["packforcing"], overrides)
    engine = pf.build_engine(config)
    plain = [b.seconds for b in engine.generate(blocks, seed=0)]
    timer = SectionTimer(sync=sizes.cuda)
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
    "model.weights=null",  # a resized model: the shipped weights are for the default shape
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument(
        "--smoke", action="store_true", help="run the same code paths on the CPU at toy sizes; writes nothing"
    )
    add_out(parser)
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else GPU
    if sizes.cuda and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py needs CUDA; nothing measured (--smoke runs it on the CPU at toy sizes).", file=sys.stderr
        )
        return 1
    peak = matmul_peak(sizes)
    attn = attention_rows(sizes, peak)
    run = engine_run(sizes, args.layers, args.blocks)
    device = torch.cuda.get_device_name(0) if sizes.cuda else "CPU (smoke run)"
    table = f"Device: {device}; measured {sizes.dtype} matmul peak {peak:.3g} TFLOP/s.\n\n"
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
    if args.smoke:
        print(table)
        return 0
    write_results("gpu", {"matmul_peak_tflops": peak, "attention": attn, "engine": run}, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
