"""``report.json``: the resolved config and what every block cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from packforcing.core.engine import GeneratedBlock


@attrs.define
class RunReport:
    """Accumulates per-block records; ``as_dict`` is the report.json schema."""

    config: dict[str, Any]
    full_bytes_per_block: int
    conditions: list[dict[str, Any]] | None = None
    """The condition schedule the run used (``[{from_block: N, **spec}]``), or ``None``."""
    details: dict[str, Any] = attrs.field(factory=dict)
    """Further top-level entries (e.g. ``video``: requested seconds, blocks, frames)."""
    blocks: list[dict[str, Any]] = attrs.field(factory=list)
    returns: list[dict[str, Any]] = attrs.field(factory=list)
    """Cuts back to an earlier condition: ``{block, condition, blocks_since, psnr_db}``."""
    peak_cache_bytes: int = 0
    peak_archive_bytes: int = 0
    total_seconds: float = 0.0
    status: str = "running"
    """``running`` (written as blocks come: :func:`~packforcing.cli.run_files.report_due`),
    ``complete``, ``interrupted`` or ``failed``."""
    error: str | None = None
    """The one-line error of a ``failed`` run."""
    blocks_planned: int | None = None

    def add(self, block: GeneratedBlock) -> dict[str, Any]:
        stats = block.stats
        record = {
            "index": block.index,
            "seconds": block.seconds,
            "context_tokens": block.context_tokens,
            "cache_bytes": stats.bytes,
            "archive_bytes": stats.archive.bytes,
            "tiers": {name: t.as_dict() for name, t in stats.tiers.items()},
        }
        if self.conditions is not None:
            record["condition"] = block.condition
        self.blocks.append(record)
        self.peak_cache_bytes = max(self.peak_cache_bytes, stats.bytes)
        self.peak_archive_bytes = max(self.peak_archive_bytes, stats.archive.bytes)
        self.total_seconds += block.seconds
        return record

    def add_return(self, block: int, condition: Any, blocks_since: int, psnr_db: float) -> None:
        """A cut back to ``condition`` at ``block``, last seen ``blocks_since`` blocks before;
        ``psnr_db`` compares the first frame back with the last frame seen under it."""
        self.returns.append(
            {"block": block, "condition": condition, "blocks_since": blocks_since, "psnr_db": round(psnr_db, 4)}
        )

    def restore(self, blocks: list[dict[str, Any]], returns: list[dict[str, Any]] | None = None) -> None:
        """Continue from the per-block records (and returns) of an earlier (interrupted) run."""
        self.blocks = [dict(b) for b in blocks]
        self.returns = [dict(r) for r in returns or []]
        self.peak_cache_bytes = max((b["cache_bytes"] for b in self.blocks), default=0)
        self.peak_archive_bytes = max((b["archive_bytes"] for b in self.blocks), default=0)
        self.total_seconds = sum(b["seconds"] for b in self.blocks)

    def as_dict(self) -> dict[str, Any]:
        psnrs = [r["psnr_db"] for r in self.returns]
        return {
            "status": self.status,
            "blocks_done": len(self.blocks),
            "blocks_planned": self.blocks_planned,
            **({"error": self.error} if self.error is not None else {}),
            "config": self.config,
            "conditions": self.conditions,
            **self.details,
            "returns": self.returns,
            "return_psnr_db": sum(psnrs) / len(psnrs) if psnrs else None,
            "blocks": self.blocks,
            "peak_cache_bytes": self.peak_cache_bytes,
            "archive_bytes": self.peak_archive_bytes,
            "full_cache_bytes": self.full_bytes_per_block * len(self.blocks),
            "total_seconds": self.total_seconds,
        }

    def write(self, path: str | Path) -> None:
        """Write atomically: a reader (or a crash) sees the previous report or this one."""
        from packforcing.core.checkpoint import write_atomic

        write_atomic(Path(path), (json.dumps(self.as_dict(), indent=2) + "\n").encode())
