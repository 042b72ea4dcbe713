"""CPU proxy for the PackForcing cache's per-block overhead at Wan's structure.

On a GPU the cost of cache management is mostly not arithmetic: every host-device
synchronisation (a tensor read on the host, a host-made tensor copied to the device) stalls the
GPU until Python catches up, and per-layer host work that cannot run ahead of the GPU adds to the
block time. Neither needs a GPU to be counted. This script builds a small random Wan with the
full model's *structure* (30 layers, 12 heads, 3-frame blocks, the 4-step Self-Forcing sampler
+ the clean pass, PackForcing with a 16-block mid bank of which 8 enter) and, at a full cache:

- counts host syncs per block by call (:class:`~packforcing.core.instrument.HostSyncCounter`)
  and per layer-pass of the attention context (the path that runs 150 times per block);
- times blocks (median of ``--blocks``; process CPU time, which a loaded machine disturbs less
  than wall time) and the instrumented shares (compress, select, gather+realign, bookkeeping) —
  on the CPU there is no overlap to lose, so the times show the host work only;
- counts the operators one block calls from Python (``torch.profiler``; on a GPU each that is not
  a view is a kernel launch).

``--split`` runs the same with ``backend.split_context`` (the context attended in stored parts),
``--shared`` with the top-K made once per forward pass (``selector.shared_across_layers``).

    python benchmarks/cache_overhead.py [--label after] [--blocks 4] [--split] [--shared]

Results go to ``benchmarks/results/cache_overhead.{json,md}``; runs with different ``--label``
(e.g. ``before`` on an older commit, ``after``) are kept side by side in the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, machine, markdown_table  # noqa: E402
from wan_gpu import (  # noqa: E402
    SMOKE,
    TINY,
    SharedModel,
    engine_for,
    profile_block,
    prompt_embeds_file,
    random_wan,
    steady_blocks,
)

from packforcing.core.instrument import HostSyncCounter, SectionTimer, timing_wrapper  # noqa: E402
from packforcing.plugins.manager import Registry  # noqa: E402

PROXY = attrs.evolve(
    SMOKE,
    transformer={**TINY, "num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 32},
    mid_blocks=16,
    top_k=8,
)
"""Wan2.1-1.3B's layer and head counts and PackForcing's bank, at a tiny width and frame size."""


def measure(blocks: int, split: bool = False, shared: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    variant: dict[str, dict[str, Any]] = {}
    if split:
        variant["backend"] = {"split_context": True}
    if shared:
        variant["selector"] = {"shared_across_layers": True}
    model = random_wan(PROXY)
    registry = Registry.create(entry_points=False, extra_plugins=[(SharedModel(model), "cache-overhead")])
    layers = PROXY.transformer["num_layers"]
    passes = 5  # 4 sampler steps + the clean pass
    with tempfile.TemporaryDirectory() as tmp:
        conditions = [{"from_block": 0, "embeds": str(prompt_embeds_file(PROXY, Path(tmp)))}]
        engine = engine_for("packforcing", registry, PROXY, variant=variant)
        warm = steady_blocks(engine) + 1
        with engine.session(seed=0, conditions=conditions) as session:
            for _ in range(warm):
                session.step()
            with HostSyncCounter() as counter:
                session.step()
            operators = profile_block(session.step, PROXY)["operators"]
            seconds, cpu = [], []
            for _ in range(blocks):
                t0 = time.process_time()
                seconds.append(session.step().seconds)
                cpu.append(time.process_time() - t0)
        syncs = {"reads": dict(counter.reads), "writes": dict(counter.writes), "total": counter.total}

        timer = SectionTimer()
        timed = engine_for("packforcing", registry, PROXY, wrap=timing_wrapper(timer), variant=variant)
        with timed.session(seed=0, conditions=conditions) as session:
            for _ in range(warm):
                session.step()
            timer.reset()
            total = sum(session.step().seconds for _ in range(blocks))
        parts = timer.breakdown(total)
    late = sorted(seconds)[len(seconds) // 2]
    return {
        "block_cpu_ms": sorted(cpu)[len(cpu) // 2] * 1e3,
        "layers": layers,
        "passes_per_block": passes,
        "warm_blocks": warm,
        "block_ms": late * 1e3,
        "split_context": split,
        "shared_across_layers": shared,
        "operators_per_block": operators,
        "syncs_per_block": syncs,
        "syncs_per_layer_pass": syncs["total"] / (layers * passes),
        "instrumented_block_ms": 1e3 * total / blocks,
        "share": {k: v / total for k, v in parts.items()},
        "cache_management_share": sum(parts[k] for k in ("compression", "selection", "realignment", "bookkeeping"))
        / total,
    }


def table(runs: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, r in runs.items():
        s = r["share"]
        calls = {**r["syncs_per_block"]["reads"], **r["syncs_per_block"]["writes"]}
        rows.append(
            [
                label,
                r.get("block_cpu_ms", "-"),
                r["block_ms"],
                r["syncs_per_block"]["total"],
                r.get("operators_per_block", "-"),
                r["syncs_per_layer_pass"],
                ", ".join(f"{k} {v}" for k, v in sorted(calls.items())),
                100 * s["compression"],
                100 * s["selection"],
                100 * s["realignment"],
                100 * s["bookkeeping"],
                100 * r["cache_management_share"],
            ]
        )
    return (
        "PackForcing at a full cache, CPU proxy of Wan2.1-1.3B's structure (30 layers, 12 heads, "
        "5 passes per block, 16 mid blocks of which 8 enter); host syncs counted per block:\n\n"
        + markdown_table(
            [
                "run",
                "block CPU ms",
                "block wall ms",
                "host syncs / block",
                "operators / block",
                "per layer-pass",
                "by call",
                "compress %",
                "select %",
                "gather+realign %",
                "bookkeeping %",
                "cache mgmt %",
            ],
            rows,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="current", help="name of this run in the results (e.g. before / after)")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks at a full cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--split", action="store_true", help="with backend.split_context")
    parser.add_argument("--shared", action="store_true", help="with selector.shared_across_layers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = measure(args.blocks, args.split, args.shared)
    path = args.out / "cache_overhead.json"
    data = json.loads(path.read_text()) if path.is_file() else {"benchmark": "cache_overhead", "runs": {}}
    data["machine"] = machine()
    data["runs"][args.label] = {**result, "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    text = table(data["runs"])
    (args.out / "cache_overhead.md").write_text(f"### cache_overhead\n\nMachine: {data['machine']}\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
