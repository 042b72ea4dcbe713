"""Start-up time of the command line: wall and CPU seconds of each quick verb, and of ``import torch``.

Each command runs ``--repeats`` times as a fresh process from a temporary directory (so the
packaged presets are what it finds), after one warm-up run (file cache, and byte-code written as
an installed package has it: ``PYTHONDONTWRITEBYTECODE`` is dropped for the children); the
median wall time and the median CPU time (user + sys of the child) are kept. CPU time is what
the command itself costs; wall time also shows how loaded the machine was (the 1-minute load
average is recorded before and after). One more run under ``python -X importtime`` records
whether the command imports torch.

    python benchmarks/startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, add_out, markdown_table, write_results

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "packforcing --help": [sys.executable, "-m", "packforcing", "--help"],
    "packforcing --version": [sys.executable, "-m", "packforcing", "--version"],
    "packforcing presets": [sys.executable, "-m", "packforcing", "presets"],
    "packforcing plugins": [sys.executable, "-m", "packforcing", "plugins"],
    "packforcing validate packforcing": [sys.executable, "-m", "packforcing", "validate", "packforcing"],
    "packforcing plan --config packforcing --seconds 120": [
        sys.executable, "-m", "packforcing", "plan", "--config", "packforcing", "--seconds", "120",
    ],
    "packforcing plan --config wan1.3b/packforcing --seconds 120": [
        sys.executable, "-m", "packforcing", "plan", "--config", "wan1.3b/packforcing", "--seconds", "120",
    ],
}  # fmt: skip


def imports_torch(command: list[str], cwd: str, env: dict[str, str]) -> bool:
    """Whether ``command`` (a ``python ...`` command line) imports torch."""
    traced = [command[0], "-X", "importtime", *command[1:]]
    result = subprocess.run(traced, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in result.stderr.splitlines())


def timed(command: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    add_out(parser)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    results, rows = {}, []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cwd:
        for name, command in COMMANDS.items():
            timed(command, cwd, env)  # warm the file cache, write byte-code
            runs = [timed(command, cwd, env) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            torch = imports_torch(command, cwd, env)
            results[name] = {
                "wall_seconds": [r[0] for r in runs],
                "cpu_seconds": [r[1] for r in runs],
                "median_wall_seconds": wall,
                "median_cpu_seconds": cpu,
                "imports_torch": torch,
            }
            rows.append([name, f"{wall:.2f}", f"{cpu:.2f}", "yes" if torch else "no"])
            print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    table = markdown_table(["command", "median wall s", "median CPU s", "imports torch"], rows)
    table += f"\nMedian of {args.repeats} fresh processes; 1-minute load average {load:.1f} before, "
    table += f"{load_after:.1f} after.\n"
    write_results(
        "startup", {"repeats": args.repeats, "load_average": [load, load_after], "commands": results}, table, args.out
    )


if __name__ == "__main__":
    main()
