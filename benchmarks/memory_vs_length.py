"""Cache bytes and context tokens against video length, for every policy, in one run.

Part 1 generates up to ``--blocks`` blocks at the tiny geometry with real tensors and records
the bytes the cache actually holds after each block. Part 2 extrapolates with the planner at
the Wan2.1-1.3B geometry from 10 s to 10 min (no allocation).

    python benchmarks/memory_vs_length.py --blocks 120
"""

from __future__ import annotations

import argparse

from common import POLICY_CONFIGS, WAN_CONFIGS, add_out, gib, markdown_table, mib, write_results

import packforcing as pf


def measure(blocks: int, seed: int) -> dict[str, dict[str, list[int]]]:
    runs = {}
    for name, path in POLICY_CONFIGS.items():
        engine = pf.build_engine(pf.load_config(path, [f"run.blocks={blocks}", "run.device=cpu"]))
        bytes_, tokens, archive = [], [], []
        for block in engine.generate(blocks, seed=seed):
            bytes_.append(block.stats.bytes)
            tokens.append(block.context_tokens)
            archive.append(block.stats.archive.bytes)
        runs[name] = {"cache_bytes": bytes_, "context_tokens": tokens, "archive_bytes": archive}
        print(f"{name}: peak {mib(max(bytes_)):.2f} MiB after {blocks} blocks")
    return runs


def extrapolate(seconds: list[float]) -> dict[str, list[dict[str, float]]]:
    out = {}
    for name, path in WAN_CONFIGS.items():
        rows = []
        for s in seconds:
            plan = pf.plan(path, seconds=s, fps=16)
            rows.append(
                {
                    "seconds": s,
                    "cache_bytes": plan.bytes,
                    "context_tokens": plan.context_tokens,
                    "full_cache_bytes": plan.full_cache_bytes,
                }
            )
        out[name] = rows
    return out


def plot(runs, wan, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, run in runs.items():
        a.plot(range(len(run["cache_bytes"])), [mib(x) for x in run["cache_bytes"]], label=name)
    a.set_xlabel("block")
    a.set_ylabel("cache MiB (tiny_dit, measured)")
    a.legend()
    a.grid(alpha=0.3)
    for name, rows in wan.items():
        b.plot([r["seconds"] for r in rows], [gib(r["cache_bytes"]) for r in rows], marker="o", label=name)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("video seconds (Wan2.1-1.3B, planned)")
    b.set_ylabel("cache GiB")
    b.legend()
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    add_out(parser)
    args = parser.parse_args()
    if args.blocks < 4:
        parser.error("--blocks: at least 4 (the table compares the peak at a quarter of the length)")
    runs = measure(args.blocks, args.seed)
    seconds = [10, 30, 60, 120, 300, 600]
    wan = extrapolate(seconds)
    n = args.blocks // 4
    rows = []
    for name, run in runs.items():
        b = run["cache_bytes"]
        rows.append(
            [name, mib(b[n - 1]), mib(max(b[:n])), mib(max(b)), max(b) / max(b[:n]), max(run["context_tokens"])]
        )
    table = "Tiny geometry, real tensors (peak = max over blocks so far):\n\n" + markdown_table(
        [
            "policy",
            f"MiB @ {n} blocks",
            f"peak MiB ≤ {n}",
            f"peak MiB ≤ {args.blocks}",
            f"peak ratio {args.blocks}/{n}",
            "max context tokens",
        ],
        rows,
    )
    wan_rows = []
    for name, plans in wan.items():
        wan_rows.append([name, *[gib(p["cache_bytes"]) for p in plans]])
    full_ratio = [p["cache_bytes"] for p in wan["full"]]
    table += "\nWan2.1-1.3B geometry, planner (GiB):\n\n" + markdown_table(
        ["policy", *[f"{s}s" for s in seconds]], wan_rows
    )
    write_results(
        "memory_vs_length",
        {"blocks": args.blocks, "tiny": runs, "wan1.3b": wan, "full_linear_check": full_ratio},
        table,
        args.out,
    )
    plot(runs, wan, args.out / "memory_vs_length.png")
    print(f"wrote {args.out / 'memory_vs_length.png'}")


if __name__ == "__main__":
    main()
