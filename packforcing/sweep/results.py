"""``results.jsonl`` (one line per finished job) and the per-policy summary.

The results file is append-only: every finished job (complete or failed) adds one line,
flushed to disk at once, so an interrupted sweep keeps every result it got. A rerun reads it
to skip the jobs already complete; the summary aggregates, for the jobs of the current
sweep, the latest line of each.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from packforcing.sweep.jobs import SweepJob, canonical
from packforcing.sweep.runner import COMPLETE, FAILED

RESULTS = "results.jsonl"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"


def record_key(record: dict[str, Any]) -> tuple[str, str, int, int]:
    """The :attr:`SweepJob.key` of a results line."""
    return (record["config_hash"], canonical(record.get("prompt_schedule")), record["seed"], record["blocks"])


class ResultsFile:
    """``DIR/results.jsonl``: read (a torn last line from a killed sweep is ignored) and
    appended one durable line at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                record_key(record)
            except (ValueError, KeyError, TypeError):
                continue
            records.append(record)
        return records

    def latest(self) -> dict[tuple[str, str, int, int], dict[str, Any]]:
        """The last line written for each job key."""
        return {record_key(r): r for r in self.read()}

    def complete_keys(self) -> set[tuple[str, str, int, int]]:
        return {key for key, r in self.latest().items() if r.get("status") == COMPLETE}

    def unfinished_seconds(self) -> dict[tuple[str, str, int, int], float]:
        """Per job key, the wall seconds of its lines since its last ``complete`` one and since
        its last attempt that started afresh (the attempts a resumed run continues: an attempt
        that ran the job anew, a ``command`` line not ``resumed``, continued none before it)."""
        seconds: dict[tuple[str, str, int, int], float] = {}
        for record in self.read():
            key = record_key(record)
            if record.get("status") == COMPLETE:
                seconds.pop(key, None)
            elif isinstance(record.get("seconds"), (int, float)):
                afresh = "command" in record and not record.get("resumed")
                seconds[key] = (0.0 if afresh else seconds.get(key, 0.0)) + float(record["seconds"])
        return seconds

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        with self.path.open("a") as f:
            f.write(("\n" if needs_newline else "") + json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


# ---------------------------------------------------------------------- summary
METRICS: tuple[tuple[str, str, float], ...] = (
    ("peak_cache_bytes", "peak cache MiB", 2.0**-20),
    ("cache_ratio", "peak / full cache", 1.0),
    ("ms_per_block", "ms / block", 1.0),
    ("total_seconds", "job wall s", 1.0),
)
"""Fixed columns: record key, label, scale applied for display."""

FIDELITY_LABELS = {
    "return_psnr_db": "return PSNR dB",
    "min_return_psnr_db": "worst return PSNR dB",
    "returns": "returns",
}
"""Fidelity figures shown first, in this order, with these labels (others follow by name)."""


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _value(record: dict[str, Any], key: str) -> float | None:
    if key == "total_seconds" and key not in record:  # a line written before attempts were summed
        key = "seconds"
    node: Any = record
    for part in key.split(".", 1) if key.startswith("fidelity.") else [key]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
        return float(node)
    return None


def summarize(jobs: Sequence[SweepJob], records: dict[tuple[str, str, int, int], dict[str, Any]]) -> dict[str, Any]:
    """Per config (one policy setting each) over its prompts and seeds: jobs complete and
    failed, and mean / std / min / max of every figure (fixed ones and each fidelity figure).

    Returns ``{"metrics": [[key, label], ...], "rows": [{"config", "policy", "config_hash",
    "blocks", "complete", "failed", "stats": {key: {"mean", "std", "min", "max", "n"}}}],
    "failures": [{"job", "status", "error"}]}`` (failed and interrupted jobs, which count as
    failed in ``"failed"``).
    """
    names: set[str] = set()
    for job in jobs:
        names.update((records.get(job.key) or {}).get("fidelity") or {})
    fidelity = [n for n in FIDELITY_LABELS if n in names] + sorted(names - set(FIDELITY_LABELS))
    metrics = [(key, label) for key, label, _ in METRICS]
    metrics += [(f"fidelity.{name}", FIDELITY_LABELS.get(name, name)) for name in fidelity]
    rows: dict[str, dict[str, Any]] = {}
    failures = []
    for job in jobs:
        row = rows.setdefault(
            job.config_name,
            {
                "config": job.config_name,
                "policy": job.policy,
                "config_hash": job.config_hash,
                "blocks": job.blocks,
                "complete": 0,
                "failed": 0,
                "missing": 0,
                "values": {key: [] for key, _ in metrics},
            },
        )
        record = records.get(job.key)
        if record is None:
            row["missing"] += 1
            continue
        if record.get("status") != COMPLETE:
            row["failed"] += 1
            failures.append({"job": job.name, "status": record.get("status"), "error": record.get("error", "")})
            continue
        row["complete"] += 1
        for key, _ in metrics:
            value = _value(record, key)
            if value is not None:
                row["values"][key].append(value)
    out_rows = []
    for row in rows.values():
        values = row.pop("values")
        row["stats"] = {key: _stats(v) for key, v in values.items() if v}
        out_rows.append(row)
    return {"metrics": [list(m) for m in metrics], "rows": out_rows, "failures": failures}


def _scale(key: str) -> float:
    return next((scale for k, _, scale in METRICS if k == key), 1.0)


def _cell(stats: dict[str, float] | None, scale: float) -> str:
    if not stats:
        return "–"
    return f"{stats['mean'] * scale:.4g} ± {stats['std'] * scale:.2g}"


def write_markdown(summary: dict[str, Any], path: str | Path, *, title: str) -> None:
    metrics = summary["metrics"]
    head = ["config", "policy", "blocks", "ok / failed", *[label for _, label in metrics]]
    lines = [
        f"# {title}",
        "",
        "Mean ± standard deviation over each config's prompts and seeds (complete jobs only).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in summary["rows"]:
        cells = [
            row["config"],
            row["policy"],
            str(row["blocks"]),
            f"{row['complete']} / {row['failed']}" + (f" ({row['missing']} not run)" if row["missing"] else ""),
            *[_cell(row["stats"].get(key), _scale(key)) for key, _ in metrics],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["failures"]:
        lines += ["", "## Failed jobs", ""]
        lines += [
            f"- `{f['job']}`" + (f" ({f['status']})" if f.get("status", FAILED) != FAILED else "") + f": {f['error']}"
            for f in summary["failures"]
        ]
    Path(path).write_text("\n".join(lines) + "\n")


def write_plot(summary: dict[str, Any], path: str | Path, *, title: str) -> None:
    """One panel per figure: a bar per config at its mean, whiskers at ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in summary["metrics"] if any(k in r["stats"] for r in summary["rows"])]
    rows = summary["rows"]
    cols = max(1, min(3, len(metrics)))
    nrows = max(1, -(-len(metrics) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), dpi=110, squeeze=False)
    names = [r["config"] for r in rows]
    for ax, (key, label) in zip(axes.flat, metrics, strict=False):
        scale = _scale(key)
        means = [r["stats"][key]["mean"] * scale if key in r["stats"] else math.nan for r in rows]
        stds = [r["stats"][key]["std"] * scale if key in r["stats"] else 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    if not metrics:
        axes.flat[0].text(0.5, 0.5, "no complete jobs", ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_summary(jobs: Sequence[SweepJob], results: ResultsFile, out: str | Path) -> dict[str, Any]:
    """``summary.md`` and ``summary.png`` in ``out`` for ``jobs``; returns the summary."""
    summary = summarize(jobs, results.latest())
    seeds = sorted({j.seed for j in jobs})
    prompts = sorted({j.prompt.name for j in jobs})
    counts = ((len(summary["rows"]), "config"), (len(prompts), "prompt"), (len(seeds), "seed"))
    title = "Sweep: " + " × ".join(f"{n} {word}{'' if n == 1 else 's'}" for n, word in counts)
    write_markdown(summary, Path(out) / SUMMARY_MD, title=title)
    write_plot(summary, Path(out) / SUMMARY_PNG, title=title)
    return summary
