"""``memory.png``: cache bytes per tier against block index, stacked, with the full cache."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def plot_memory(report: dict[str, Any], path: str | Path, full_bytes_per_block: int) -> None:
    """Draw ``report``'s cache bytes per tier against block index to ``path`` (written atomically)."""
    import matplotlib

    from packforcing.core.checkpoint import write_atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    blocks = report["blocks"]
    index = [b["index"] for b in blocks]
    tiers = list(blocks[0]["tiers"]) if blocks else []
    series = [[b["tiers"][t]["bytes"] / 2**20 for b in blocks] for t in tiers]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tiers and len(index) > 1:
        ax.stackplot(index, series, labels=tiers, alpha=0.85)
    elif tiers:  # one block: a stacked bar (an area needs two points)
        bottom = 0.0
        for tier, values in zip(tiers, series, strict=True):
            ax.bar(index, values, bottom=bottom, width=0.6, label=tier, alpha=0.85)
            bottom += values[0]
    marker = "o" if len(index) == 1 else None
    full = [(i + 1) * full_bytes_per_block / 2**20 for i in index]
    ax.plot(index, full, "k--", marker=marker, linewidth=1.2, label="full cache", zorder=3)
    if any(b.get("archive_bytes") for b in blocks):
        archive = [b["archive_bytes"] / 2**20 for b in blocks]
        ax.plot(
            index,
            archive,
            ":",
            marker=marker,
            label="archive (outside the budget)",
            color="black",
            linewidth=1.6,
            zorder=4,
        )
    if index:
        ax.set_xlim(min(index) - 0.5, max(index) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("block index")
    ax.set_ylabel("cache MiB")
    name = (report.get("config") or {}).get("policy", {}).get("name", "")
    ax.set_title(f"KV cache by tier — policy {name}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format=Path(path).suffix[1:] or "png")
    finally:
        plt.close(fig)
    write_atomic(Path(path), image.getvalue())  # a reader (or a full disk) never sees half a file
