"""CPU intra-op threads vs generation speed, at the tiny size and at larger model sizes.

The numbers behind ``run.threads: auto`` (see ``packforcing.core.threads``): for each model size,
the default PackForcing preset generates ``--blocks`` blocks with 1, 2, … threads (up to the
cores available), alternating thread counts over ``--repeats`` rounds so a machine whose load
changes affects every count alike; the fastest round is kept.

    python benchmarks/threads.py --blocks 20 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import add_out, markdown_table, write_results

import packforcing as pf
from packforcing.core.threads import auto_threads, block_work

SIZES = {
    # name: tiny_dit overrides
    "tiny (default)": [],
    "hidden 256, 16x16 latents": ["model.hidden_size=256", "model.num_heads=4", "model.latent_height=16",
                                  "model.latent_width=16"],
    "hidden 512, 32x32 latents": ["model.hidden_size=512", "model.num_heads=8", "model.latent_height=32",
                                  "model.latent_width=32"],
}  # fmt: skip


def seconds(engine: pf.GenerationEngine, blocks: int, threads: int) -> float:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    for _ in engine.generate(blocks, seed=0):
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sizes", nargs="*", choices=list(SIZES), default=list(SIZES), metavar="SIZE",
        help=f"subset of the sizes to run, quoted: {', '.join(repr(s) for s in SIZES)}",
    )  # fmt: skip
    add_out(parser)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = list(range(1, cores + 1))
    results, rows = {}, []
    for size in args.sizes:
        overrides = ["run.device=cpu", "compressor.weights=null", "model.weights=null", "sampler.steps=2", *SIZES[size]]
        engine = pf.build_engine(pf.load_config("packforcing", overrides))
        seconds(engine, 2, 1)  # warm-up
        runs: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.repeats):
            for n in counts:
                runs[n].append(seconds(engine, args.blocks, n))
        best = {n: min(t) for n, t in runs.items()}
        fastest = min(best, key=best.get)
        work = block_work(engine.model.geometry)
        picked = auto_threads(engine.model.geometry, torch.device("cpu"), cores=cores)
        results[size] = {
            "overrides": SIZES[size],
            "block_work": work,
            "seconds": {str(n): t for n, t in runs.items()},
            "best_seconds": {str(n): t for n, t in best.items()},
            "fastest_threads": fastest,
            "auto_threads": picked,
        }
        rows.append([size, f"{work:.3g}", *(f"{best[n]:.2f}" for n in counts), fastest, picked])
        print(rows[-1], flush=True)
    headers = ["model size", "block work", *(f"{n} thread(s) s" for n in counts), "fastest", "auto picks"]
    table = markdown_table(headers, rows)
    table += f"\n{args.blocks} blocks of the packforcing preset (2 sampler steps), best of {args.repeats} rounds.\n"
    write_results(
        "threads", {"blocks": args.blocks, "repeats": args.repeats, "cores": cores, "sizes": results}, table, args.out
    )


if __name__ == "__main__":
    main()
