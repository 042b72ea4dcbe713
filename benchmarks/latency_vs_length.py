"""Per-block wall time early vs late for every policy, and where a block's time goes.

Timing runs are uninstrumented; a second, instrumented run (timing wrappers around every
component, see packforcing.core.instrument) gives the breakdown into model forward,
compression, selection, realignment and bookkeeping.

    python benchmarks/latency_vs_length.py --blocks 120
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import POLICY_CONFIGS, add_out, markdown_table, write_results

import packforcing as pf
from packforcing.core.instrument import SectionTimer, timing_wrapper


def block_times(path, blocks: int, seed: int, device: str) -> list[float]:
    engine = pf.build_engine(pf.load_config(path, [f"run.device={device}"]))
    return [b.seconds for b in engine.generate(blocks, seed=seed)]


def breakdown(path, blocks: int, seed: int, device: str) -> dict[str, float]:
    timer = SectionTimer(sync=device == "cuda")
    engine = pf.build_engine(pf.load_config(path, [f"run.device={device}"]), wrap=timing_wrapper(timer))
    started = time.perf_counter()
    for _ in engine.generate(blocks, seed=seed):
        pass
    total = time.perf_counter() - started
    parts = timer.breakdown(total)
    return {k: v / total for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per policy; per-block minimum is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_out(parser)
    args = parser.parse_args()
    if args.blocks < 4 or args.repeats < 1:
        parser.error("--blocks: at least 4 (early and late windows of 2 blocks or more); --repeats: at least 1")
    n = args.blocks
    window = max(2, n // 8)
    results, rows = {}, []
    for name, path in POLICY_CONFIGS.items():
        runs = [block_times(path, n, args.seed, args.device) for _ in range(args.repeats)]
        per_block = [min(ts) for ts in zip(*runs, strict=True)]
        early = statistics.median(per_block[window : 2 * window])
        late = statistics.median(per_block[-window:])
        shares = breakdown(path, n, args.seed, args.device)
        results[name] = {
            "per_block_seconds": per_block,
            "early_s": early,
            "late_s": late,
            "late_over_early": late / early,
            "breakdown_share": shares,
        }
        rows.append(
            [
                name,
                early * 1e3,
                late * 1e3,
                late / early,
                *[
                    100 * shares[k]
                    for k in ("model_forward", "compression", "selection", "realignment", "bookkeeping", "other")
                ],
            ]
        )
        print(name, f"late/early {late / early:.3f}")
    table = (
        f"{n} blocks on {args.device}; early = median of blocks [{window}, {2 * window}), late = median of the "
        f"last {window}; per-block minimum over {args.repeats} runs. Shares in % of block time (instrumented run).\n\n"
    )
    table += markdown_table(
        [
            "policy",
            "early ms",
            "late ms",
            "late/early",
            "forward %",
            "compress %",
            "select %",
            "gather+realign %",
            "bookkeeping %",
            "other %",
        ],
        rows,
    )
    write_results("latency_vs_length", {"blocks": n, "device": args.device, "policies": results}, table, args.out)
    plot(results, args.out / "latency_vs_length.png")
    print(f"wrote {args.out / 'latency_vs_length.png'}")


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, r in results.items():
        ax.plot([1e3 * s for s in r["per_block_seconds"]], label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("ms per block")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
