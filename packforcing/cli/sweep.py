"""``packforcing sweep``: configs × prompts × seeds as Ray tasks, with a per-policy summary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from packforcing.cli import EXIT_FAILURE, UsageError, add_overrides, add_verb
from packforcing.cli.argtypes import non_negative_float, non_negative_int, positive_float, positive_int

EXAMPLE = """example:
  packforcing sweep full sliding_window packforcing --seeds 0,1,2 --blocks 48 --out sweeps/policies
  packforcing sweep configs/ --prompts prompts.txt --seconds 120 --gpus-per-job 1 \\
      --address HEAD_NODE:6379 --out /shared/sweeps/long

Each job is one 'packforcing generate' into DIR/runs/<config>-<prompt>-<seed>/ (video.mp4,
report.json, memory.png). DIR/results.jsonl gets one line per finished job; DIR/summary.md and
DIR/summary.png aggregate per config (mean ± std over prompts and seeds). Rerunning the same
command skips the jobs already complete. Exit status 1 if any job failed.
"""


def seeds_argument(text: str) -> list[int]:
    """``--seeds`` (see :func:`packforcing.sweep.jobs.parse_seeds`): a bad value is argparse's
    usage error (exit 2), before any config is loaded."""
    from packforcing.sweep.jobs import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seeds: ")) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "sweep",
        help="run configs × prompts × seeds as Ray tasks and summarise per policy",
        description="Run the cross product of CONFIGs, prompts and seeds as Ray tasks (a local Ray "
        "instance, or the cluster at --address), one ordinary generate run per job, and summarise "
        "memory, speed and fidelity per config.",
        example=EXAMPLE,
    )
    p.add_argument(
        "configs", nargs="+", metavar="CONFIG", help="YAML configs, preset names (sink_recent) or directories of them"
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts, one job each: a .txt file (one per line) or a YAML/JSON list of texts, "
        "condition mappings ({name: s2, scene: 2}) or {name, schedule: [...]} (default: each config's own)",
    )
    p.add_argument("--seeds", type=seeds_argument, default=[0], help="seeds, e.g. 0,1,2 or 0-7 (default: 0)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--blocks", type=positive_int, help="blocks per video (default: each config's run.blocks)")
    length.add_argument(
        "--seconds", type=positive_float, help="video length in seconds, converted to blocks per config (at run.fps)"
    )
    add_overrides(p)
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (runs/, results.jsonl, summary.*)")
    p.add_argument("--address", help="Ray cluster to join, e.g. HEAD:6379 (default: start Ray locally)")
    p.add_argument(
        "--gpus-per-job",
        type=non_negative_float,
        default=0.0,
        metavar="F",
        help="GPUs each job holds; 1 = a GPU of its own (default: 0, jobs run on CPU)",
    )
    p.add_argument(
        "--cpus-per-job", type=non_negative_float, default=1.0, metavar="F", help="CPUs each job holds (default: 1)"
    )
    p.add_argument(
        "--local-cpus", type=positive_int, help="CPUs a local Ray instance may use (default: all; no --address only)"
    )
    p.add_argument(
        "--retries", type=non_negative_int, default=2, help="times a job whose worker died is retried (default: 2)"
    )
    p.add_argument(
        "--save-latents", action="store_true", help="each job also writes latents.safetensors (generate --save-latents)"
    )
    p.add_argument("--json", action="store_true", help="no progress bar; print one JSON object at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class _Bar:
    """The terminal progress bar (jobs done of those to run, running, failed, ETA) and, unless
    ``quiet`` (``--json``), one line on stderr per job that did not complete."""

    def __init__(self, disable: bool, quiet: bool = False) -> None:
        self.disable = disable
        self.quiet = quiet
        self.bar: Any = None

    def update(self, progress: Any) -> None:
        if self.bar is None:  # the first report comes once Ray is up and every job is submitted
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total, unit="job", disable=self.disable, dynamic_ncols=True, file=sys.stderr)
        self.bar.update(progress.done - self.bar.n)
        self.bar.set_postfix(running=progress.running, failed=progress.failed, refresh=True)
        # each job that did not complete is one line as it finishes (also without the bar)
        if not self.quiet and progress.record is not None and progress.record["status"] != "complete":
            record = progress.record
            self.bar.write(f"{record['status']}: {record['job']}: {record.get('error', '')}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from packforcing.cli.validate import expand
    from packforcing.sweep import SweepError, expand_jobs, load_prompts, run_sweep
    from packforcing.sweep.driver import _ray, check_out
    from packforcing.sweep.results import RESULTS, SUMMARY_MD, SUMMARY_PNG

    if args.address and args.local_cpus:
        raise UsageError("--local-cpus applies to a local Ray instance, not to --address")
    try:  # before the configs are loaded and Ray started
        out = check_out(args.out)
        _ray()  # installed (a base install has no [sweep] extra): say so before anything is written
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    configs = expand(args.configs)
    if not configs:
        raise ValueError("no YAML files found in " + ", ".join(args.configs))
    prompts = load_prompts(args.prompts) if args.prompts else None
    device = "cuda" if args.gpus_per_job > 0 else "cpu"
    jobs = expand_jobs(
        configs,
        prompts=prompts,
        seeds=args.seeds,
        blocks=args.blocks,
        seconds=args.seconds,
        overrides=args.overrides,
        device=device,
        save_latents=args.save_latents,
    )
    quiet = args.json
    bar = _Bar(disable=quiet or args.no_progress, quiet=quiet)

    def on_start(to_run: int, skipped: int) -> None:
        if not quiet:
            where = f"the Ray cluster at {args.address}" if args.address else "a local Ray instance"
            jobs_ = f"{len(jobs)} job" + ("s" if len(jobs) != 1 else "")
            print(
                f"sweep: {jobs_}, {skipped} skipped (already complete in {out / RESULTS}), {to_run} to run on {where}",
                file=sys.stderr,
            )

    try:
        result = run_sweep(
            jobs,
            out,
            address=args.address,
            cpus_per_job=args.cpus_per_job,
            gpus_per_job=args.gpus_per_job,
            retries=args.retries,
            local_cpus=args.local_cpus,
            on_start=on_start,
            on_progress=bar.update,
        )
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        bar.close()
    if quiet:
        print(
            json.dumps(
                {
                    "out": str(out),
                    "jobs": result.jobs,
                    "skipped": result.skipped,
                    "complete": result.complete,
                    "failed": result.failed,
                    "records": result.records,
                    "summary": result.summary,
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"{result.complete} complete, {result.failed} failed, {result.skipped} skipped; wrote "
            f"{out / RESULTS}, {out / SUMMARY_MD}, {out / SUMMARY_PNG}"
        )
    return EXIT_FAILURE if result.failed else 0
