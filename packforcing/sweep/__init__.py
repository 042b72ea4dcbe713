"""Sweeps: configs × prompts × seeds as Ray tasks, one ``generate`` run each.

``packforcing sweep`` on the command line; in Python::

    from packforcing.sweep import expand_jobs, run_sweep

    jobs = expand_jobs(["configs/full.yaml", "configs/packforcing.yaml"], seeds=[0, 1], blocks=8)
    result = run_sweep(jobs, "sweeps/a")        # local Ray; address="HOST:6379" for a cluster
    print(result.complete, result.failed, result.skipped)

Writes ``DIR/runs/<config>-<prompt>-<seed>/`` (video, report, memory plot per job),
``DIR/results.jsonl`` and ``DIR/summary.{md,png}``. Ray is imported only when jobs run.
"""

from packforcing.sweep.driver import Progress, SweepError, SweepResult, run_sweep
from packforcing.sweep.jobs import Prompt, SweepJob, expand_jobs, load_prompts, parse_seeds
from packforcing.sweep.results import ResultsFile, summarize
from packforcing.sweep.runner import execute

__all__ = [
    "Progress",
    "Prompt",
    "ResultsFile",
    "SweepError",
    "SweepJob",
    "SweepResult",
    "execute",
    "expand_jobs",
    "load_prompts",
    "parse_seeds",
    "run_sweep",
    "summarize",
]
