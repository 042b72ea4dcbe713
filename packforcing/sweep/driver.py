"""Scheduling a sweep's jobs as Ray tasks and collecting their results.

Ray is imported here only, lazily: ``pip install 'packforcing[sweep]'``. Without an address
a local Ray instance is started for the sweep (and stopped after it); with one, the sweep
connects to that cluster (``ray start --head`` on one node, ``ray start --address ...`` on the
others). Each job is one task holding ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs: Ray
never gives one GPU to two tasks holding 1 GPU each, and sets ``CUDA_VISIBLE_DEVICES`` so
the job's ``cuda`` is its own GPU; without GPUs jobs are pinned to ``cpu``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from packforcing.sweep.jobs import SweepJob
from packforcing.sweep.results import RESULTS, ResultsFile, record_key, write_summary
from packforcing.sweep.runner import COMPLETE, FAILED, execute, interrupted_record

CANCEL_GRACE_SECONDS = 15.0
"""How long an interrupted sweep waits for its running jobs to stop cleanly."""

Execute = Callable[[SweepJob, str, "int | None"], dict[str, Any]]
"""``execute(job, out_dir, threads) -> record``: what a task runs (default :func:`execute`)."""


@attrs.frozen
class Progress:
    """What :func:`run_sweep` reports after each change: jobs ``done`` (complete + failed) of
    ``total`` to run, those ``running`` now, ``failed`` so far, and the last ``record``."""

    total: int
    done: int
    running: int
    failed: int
    record: dict[str, Any] | None = None


@attrs.frozen
class SweepResult:
    """``records``: this run's new results lines in finishing order; ``summary``: see
    :func:`packforcing.sweep.results.summarize`."""

    jobs: int
    skipped: int
    complete: int
    failed: int
    records: list[dict[str, Any]]
    summary: dict[str, Any]


class SweepError(RuntimeError):
    """A sweep that cannot run at all (no Ray, no GPUs for ``--gpus-per-job``, ...)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError("sweeps need Ray: pip install 'packforcing[sweep]'") from None
    return ray


def check_out(out: str | Path) -> Path:
    """Check the sweep directory ``out`` before anything runs, changing nothing: a directory
    (existing, or creatable under an existing writable directory); raises a one-line
    :class:`SweepError` otherwise."""
    import os

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: exists and is not a directory")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise SweepError(f"--out {out}: cannot create the sweep directory: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SweepError(f"--out {out}: cannot create or write the sweep directory ({parent} is not writable)")
    return out


def _slots(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many jobs the cluster can run at once."""
    limits = []
    if cpus > 0:
        limits.append(int(resources.get("CPU", 0) // cpus))
    if gpus > 0:
        limits.append(int(resources.get("GPU", 0) // gpus))
    return max(0, min(limits)) if limits else 1


def run_sweep(
    jobs: Sequence[SweepJob],
    out: str | Path,
    *,
    address: str | None = None,
    cpus_per_job: float = 1.0,
    gpus_per_job: float = 0.0,
    retries: int = 2,
    local_cpus: int | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    execute_job: Execute = execute,
) -> SweepResult:
    """Run every job of ``jobs`` not already complete in ``out/results.jsonl`` as Ray tasks.

    Each finished job appends its record to ``results.jsonl`` at once; a failing job is a
    ``failed`` record and the others go on; a task whose worker dies (killed, out of memory) is
    retried up to ``retries`` times, then recorded as failed. ``summary.md`` / ``summary.png``
    are rewritten at the end (also when interrupted). ``on_start(to_run, skipped)`` is called
    before scheduling, ``on_progress`` after each change.
    """
    if cpus_per_job < 0 or gpus_per_job < 0:
        raise ValueError("--cpus-per-job and --gpus-per-job must be >= 0")
    if retries < 0:
        raise ValueError("--retries must be >= 0")
    out = check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / RESULTS)
    done_keys = results.complete_keys()
    earlier = results.unfinished_seconds()
    todo = [job for job in jobs if job.key not in done_keys]
    skipped = len(jobs) - len(todo)
    if on_start is not None:
        on_start(len(todo), skipped)
    records: list[dict[str, Any]] = []
    refused = False
    try:
        if todo:
            records = _run_on_ray(
                todo,
                str(out.resolve()),
                results,
                address=address,
                cpus_per_job=cpus_per_job,
                gpus_per_job=gpus_per_job,
                retries=retries,
                local_cpus=local_cpus,
                on_progress=on_progress,
                execute_job=execute_job,
                earlier_seconds=earlier,
            )
    except SweepError:  # refused before anything was scheduled: no summary of a sweep that never ran
        refused = True
        raise
    finally:
        if not refused:
            summary = write_summary(jobs, results, out)
    complete = sum(r["status"] == COMPLETE for r in records)
    return SweepResult(len(jobs), skipped, complete, len(records) - complete, records, summary)


def _run_on_ray(
    todo: Sequence[SweepJob],
    out: str,
    results: ResultsFile,
    *,
    address: str | None,
    cpus_per_job: float,
    gpus_per_job: float,
    retries: int,
    local_cpus: int | None,
    on_progress: Callable[[Progress], None] | None,
    execute_job: Execute,
    earlier_seconds: dict[tuple[str, str, int, int], float],
) -> list[dict[str, Any]]:
    ray = _ray()
    started_here = _start_ray(ray, address, gpus_per_job, local_cpus)
    try:
        resources = ray.cluster_resources()
        _check_cluster(resources, cpus_per_job, gpus_per_job)
        slots = max(1, _slots(resources, cpus_per_job, gpus_per_job))
        threads = max(1, int(cpus_per_job)) if gpus_per_job == 0 else None
        task = ray.remote(execute_job).options(
            num_cpus=cpus_per_job,
            num_gpus=gpus_per_job,
            max_retries=retries,
            retry_exceptions=False,
            name="packforcing-sweep-job",
        )
        pending = {task.remote(job, out, threads): job for job in todo}
        records: list[dict[str, Any]] = []
        failed = 0

        def report(record: dict[str, Any] | None) -> None:
            if on_progress is not None:
                on_progress(Progress(len(todo), len(records), min(len(pending), slots), failed, record))

        try:
            report(None)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if not ready:
                    report(None)
                    continue
                for ref in ready:
                    job = pending.pop(ref)
                    record = _with_total_seconds(_collect(ray, ref, job, retries), earlier_seconds)
                    results.append(record)
                    records.append(record)
                    failed += record["status"] == FAILED
                    report(record)
        except BaseException:
            # interrupted: each running job gets a KeyboardInterrupt, so its generate run stops
            # the way Ctrl-C stops it (report and output kept, resumable), within a grace period;
            # the records of those that stopped (status "interrupted", or complete just in time)
            # are kept like any other, jobs cancelled before they started are not
            for ref in pending:
                ray.cancel(ref)
            stopped, _ = ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_SECONDS)
            for ref in stopped:
                delivered: dict[str, Any] | None
                try:
                    delivered = ray.get(ref, timeout=0)
                except Exception:  # Ray may not deliver a cancelled task's value: its run's report tells
                    delivered = interrupted_record(pending[ref], out)
                if delivered is None:  # cancelled before it started, or its worker is gone: not run
                    continue
                record = _with_total_seconds(delivered, earlier_seconds)
                results.append(record)
                records.append(record)
            raise
        return records
    finally:
        if started_here:
            ray.shutdown()


def _start_ray(ray: Any, address: str | None, gpus_per_job: float, local_cpus: int | None) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local instance of ``local_cpus`` CPUs
    (refused first if this machine has fewer than ``gpus_per_job`` GPUs), unless Ray is already
    running in this process; whether it was started here (and is to be shut down here)."""
    if ray.is_initialized():
        return False
    if not address and gpus_per_job > 0:
        import torch  # a local instance gets this machine's GPUs: refuse before starting it

        if torch.cuda.device_count() < gpus_per_job:
            raise SweepError(
                f"--gpus-per-job {gpus_per_job:g}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                "(leave it out to run on CPUs, or give --address of a Ray cluster with GPUs)"
            )
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:  # "local": a new instance, even where `ray start` left one running on this machine
        ray.init(address="local", num_cpus=local_cpus, **kwargs)
    return True


def _check_cluster(resources: Mapping[str, float], cpus_per_job: float, gpus_per_job: float) -> None:
    """A :class:`SweepError` if the cluster's ``resources`` cannot run one job."""
    if gpus_per_job > 0 and resources.get("GPU", 0) < gpus_per_job:
        raise SweepError(
            f"--gpus-per-job {gpus_per_job:g}: the Ray cluster has {resources.get('GPU', 0):g} GPUs "
            "(leave it out to run on CPUs)"
        )
    if cpus_per_job > 0 and resources.get("CPU", 0) < cpus_per_job:
        raise SweepError(f"--cpus-per-job {cpus_per_job:g}: the Ray cluster has {resources.get('CPU', 0):g} CPUs")


def _with_total_seconds(
    record: dict[str, Any], earlier_seconds: dict[tuple[str, str, int, int], float]
) -> dict[str, Any]:
    """``record`` with ``total_seconds``: its own wall ``seconds``, plus for a run resumed from
    earlier attempts (``resumed: true``) the seconds those attempts' lines recorded."""
    if not isinstance(record.get("seconds"), (int, float)):
        return record
    earlier = earlier_seconds.get(record_key(record), 0.0) if record.get("resumed") else 0.0
    return {**record, "total_seconds": round(record["seconds"] + earlier, 3)}


def _collect(ray: Any, ref: Any, job: SweepJob, retries: int) -> dict[str, Any]:
    """The task's record, or a ``failed`` one when Ray could not run it (worker death after
    ``retries`` retries, a node lost, a task that could not be shipped)."""
    started = time.time()
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        from packforcing.sweep.runner import one_line_error

        if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
            error = f"worker died {retries + 1} times (retried {retries}): {type(exc).__name__}"
        else:
            error = one_line_error(exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc)
        return {
            **job.as_record(),
            "run_dir": str(Path("runs") / job.name),
            "status": FAILED,
            "error": error,
            "seconds": round(time.time() - started, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
