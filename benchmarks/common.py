"""Shared helpers for the benchmark scripts: policies under test, result files, environment."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

POLICY_CONFIGS = {
    "full": ROOT / "configs" / "full.yaml",
    "sliding_window": ROOT / "configs" / "sliding_window.yaml",
    "sink_recent": ROOT / "configs" / "sink_recent.yaml",
    "packforcing": ROOT / "configs" / "packforcing.yaml",
}
WAN_CONFIGS = {
    "full": ROOT / "configs" / "wan1.3b" / "full.yaml",
    "sliding_window": ROOT / "configs" / "wan1.3b" / "sliding_window.yaml",
    "packforcing": ROOT / "configs" / "wan1.3b" / "packforcing.yaml",
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def add_out(parser: Any) -> None:
    """``--out DIR``: where the results go (default ``benchmarks/results``, the committed ones)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="output directory (default: benchmarks/results)",
    )


def write_results(name: str, data: dict[str, Any], table: str, out: Path = RESULTS) -> None:
    """``<out>/<name>.json`` and ``<out>/<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), **data}
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(f"### {name}\n\nMachine: {data['machine']}\n\n{table}")
    print(table)
    print(f"wrote {out / (name + '.json')} and .md")


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def median_time(fn, cuda: bool, warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds per call (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]
