"""Running one sweep job where it was scheduled (a Ray worker, or this process).

A job is one ordinary ``generate`` run into ``DIR/runs/<config>-<prompt>-<seed>/``; this
module only decides how to call it (fresh, or over an unfinished earlier attempt) and turns
what it wrote into one ``results.jsonl`` record. Errors never escape: a failing job becomes a
``"failed"`` record with its one-line error, so it cannot stop the others.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Any

from packforcing.sweep.jobs import SweepJob

COMPLETE = "complete"
FAILED = "failed"
INTERRUPTED = "interrupted"


def one_line_error(exc: BaseException) -> str:
    """``exc`` as one line; our own errors (config, cache) as they read, others prefixed with
    their type (``RuntimeError: ...``)."""
    from packforcing.cli import one_line
    from packforcing.core.errors import ConfigError

    text = one_line(exc)
    if isinstance(exc, (ConfigError, LookupError, OSError)) or type(exc).__module__.startswith("packforcing"):
        return text
    return f"{type(exc).__name__}: {text}"


JOB_MARKER = "sweep-job.json"
"""Written into a run directory before its job starts: which sweep job (key) the run is, so a
later sweep resumes only its own interrupted runs."""


def claim(job: SweepJob, run_dir: Path) -> None:
    """Mark ``run_dir`` as ``job``'s (a path that is not a directory is left for ``generate``
    to report)."""
    if run_dir.exists() and not run_dir.is_dir():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_MARKER).write_text(json.dumps({"job": job.name, "key": list(job.key)}) + "\n")


def resumable(job: SweepJob, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an unfinished run of ``job`` that ``generate --resume`` can
    continue: its marker names this job, a checkpoint is there and the report is not complete."""
    from packforcing.cli.run_files import CHECKPOINT_DIR

    try:
        marker = json.loads((run_dir / JOB_MARKER).read_text())
        status = json.loads((run_dir / "report.json").read_text()).get("status")
    except (OSError, ValueError):
        return False
    return (
        marker.get("key") == list(job.key)
        and (run_dir / CHECKPOINT_DIR / "state.json").is_file()
        and status != COMPLETE
    )


def generate_argv(job: SweepJob, run_dir: Path, *, resume: bool = False, threads: int | None = None) -> list[str]:
    """The ``packforcing generate`` command line of ``job`` (what a user would type to rerun it):
    a new run (``--overwrite``: it replaces what an earlier, failed attempt left in ``run_dir``),
    or with ``resume`` the continuation of the interrupted run in ``run_dir``. ``threads``
    (the CPUs the job holds) becomes ``run.threads`` unless the sweep's ``--set`` gives it."""
    latents = ["--save-latents"] if job.save_latents else []
    if resume:
        return ["generate", "--resume", str(run_dir), *latents, "--no-progress"]
    overrides = job.job_overrides()
    if threads and not any(o.startswith("run.threads=") for o in job.overrides):
        overrides.append(f"run.threads={threads}")
    sets = [arg for override in overrides for arg in ("--set", override)]
    return ["generate", "--config", job.config_path, *sets, "--out", str(run_dir), "--overwrite", *latents,
            "--no-progress"]  # fmt: skip


def generate_run(argv: list[str]) -> None:
    """The seam to ``packforcing generate``: run the command line ``argv`` (from
    :func:`generate_argv`) as the command would, its own stdout kept quiet; errors are raised,
    not printed."""
    from packforcing.cli import build_parser

    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        args.func(args)


def _numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of nested mappings as ``{"a.b": x}`` (lists and text skipped)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_numbers(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data):
        out[prefix[:-1]] = float(data)
    return out


def read_report(run_dir: Path) -> dict[str, Any]:
    """The figures a sweep keeps from a finished run's ``report.json``: memory, time, and as
    ``fidelity`` every number of the report's ``fidelity`` section plus, where the run cut back
    to earlier conditions, the mean and minimum return PSNR (``returns[].psnr_db``) and their
    count."""
    report = json.loads((run_dir / "report.json").read_text())
    blocks = len(report.get("blocks", []))
    total = float(report.get("total_seconds", 0.0))
    figures: dict[str, Any] = {
        "blocks_done": blocks,
        "peak_cache_bytes": int(report.get("peak_cache_bytes", 0)),
        "archive_bytes": int(report.get("archive_bytes", 0)),
        "full_cache_bytes": int(report.get("full_cache_bytes", 0)),
        "generate_seconds": total,
        "ms_per_block": 1000.0 * total / blocks if blocks else None,
    }
    if figures["full_cache_bytes"]:
        figures["cache_ratio"] = figures["peak_cache_bytes"] / figures["full_cache_bytes"]
    fidelity = _numbers(report.get("fidelity"))
    returns = [r["psnr_db"] for r in report.get("returns") or [] if isinstance(r.get("psnr_db"), (int, float))]
    if returns:
        # cuts back to a condition seen before: PSNR of the first frame back against the last
        # frame seen under it (the run's per-return fidelity)
        fidelity.update(
            return_psnr_db=sum(returns) / len(returns), min_return_psnr_db=min(returns), returns=len(returns)
        )
    if fidelity:
        figures["fidelity"] = fidelity
    return figures


def interrupted_record(job: SweepJob, out: str) -> dict[str, Any] | None:
    """The record of ``job`` from its run's own ``report.json`` when that says the run was
    interrupted (a cancelled task whose return value Ray did not deliver), else ``None``."""
    run_dir = Path(out) / "runs" / job.name
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("status") != INTERRUPTED:
        return None
    done = report.get("blocks_done")
    return {
        **job.as_record(),
        "run_dir": str(Path("runs") / job.name),
        "status": INTERRUPTED,
        "error": report.get("error") or f"interrupted after {done} blocks",
    }


def execute(job: SweepJob, out: str, threads: int | None = None) -> dict[str, Any]:
    """Run ``job`` into ``out/runs/<job.name>/`` and return its ``results.jsonl`` record:
    the job's identity, ``status`` (``complete``; ``failed`` or ``interrupted`` with ``error``),
    wall ``seconds``, the host, and the run's figures (peak cache bytes, fidelity, ...). An
    unfinished earlier run of the same job there is resumed (``resumed: true``)."""
    started = time.time()
    record: dict[str, Any] = {**job.as_record(), "run_dir": str(Path("runs") / job.name), "host": socket.gethostname()}
    try:
        if job.device.startswith("cuda"):  # the GPU(s) Ray gave this task, and no other running task
            record["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        run_dir = Path(out) / "runs" / job.name
        record["command"] = shlex.join(["packforcing", *generate_argv(job, run_dir, threads=threads)])
        resume = resumable(job, run_dir)
        if resume:
            record["resumed"] = True
        else:
            claim(job, run_dir)
        generate_run(generate_argv(job, run_dir, resume=resume, threads=threads))
        record.update(read_report(run_dir))
        record["status"] = COMPLETE
    except Exception as exc:
        record["status"] = FAILED
        record["error"] = one_line_error(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C / a cancelled task: generate saved a checkpoint
        record["status"] = INTERRUPTED
        record["error"] = one_line_error(exc)
    record["seconds"] = round(time.time() - started, 3)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record
