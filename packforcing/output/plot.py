"""``memory.png``: cache bytes per tier against block index, stacked, with the full cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_memory(report: dict[str, Any], path: str | Path, full_bytes_per_block: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    index = [b["index"] for b in blocks]
    tiers = list(blocks[0]["tiers"]) if blocks else []
    series = [[b["tiers"][t]["bytes"] / 2**20 for b in blocks] for t in tiers]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tiers:
        ax.stackplot(index, series, labels=tiers, alpha=0.85)
    full = [(i + 1) * full_bytes_per_block / 2**20 for i in index]
    ax.plot(index, full, "k--", linewidth=1.2, label="full cache")
    if any(b.get("archive_bytes") for b in blocks):
        ax.plot(index, [b["archive_bytes"] / 2**20 for b in blocks], ":", color="gray", label="archive (not active)")
    ax.set_xlabel("block index")
    ax.set_ylabel("cache MiB")
    name = (report.get("config") or {}).get("policy", {}).get("name", "")
    ax.set_title(f"KV cache by tier — policy {name}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
