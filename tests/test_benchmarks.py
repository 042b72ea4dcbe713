"""The benchmark scripts' code paths run (on the CPU, at toy sizes); no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_smoke_run_exercises_every_section():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke", "--layers", "1", "--blocks", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| sdpa |" in out  # attention section
    assert "cache mgmt %" in out and "gather+realign %" in out  # instrumented engine section


def test_fidelity_benchmark_smoke_run_writes_the_schema(tmp_path):
    """benchmarks/fidelity.py --smoke: every policy at 1x and 2x on the shipped model, one seed,
    one sampler step; the JSON has the issue's schema (no figure is asserted)."""
    import json

    result = subprocess.run(
        [sys.executable, "benchmarks/fidelity.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "fidelity.json").read_text())
    assert isinstance(data["train_blocks"], int) and data["train_blocks"] >= 1
    rows = data["results"]
    policies = {"full", "sliding_window", "sink_recent", "packforcing", "packforcing_pool", "packforcing_recency"}
    assert {r["policy"] for r in rows} == policies
    assert {r["horizon"] for r in rows} == {"1x", "2x"}
    keys = {"policy", "horizon", "blocks", "seeds", "peak_cache_bytes", "teacher_forced_return_psnr_db",
            "free_return_psnr_db", "drift", "ms_per_block"}  # fmt: skip
    for row in rows:
        assert keys <= set(row)
        assert row["blocks"] == data["train_blocks"] * int(row["horizon"][:-1])
        assert row["seeds"] == 1 and row["peak_cache_bytes"] > 0
    full = {r["horizon"]: r["peak_cache_bytes"] for r in rows if r["policy"] == "full"}
    window = {r["horizon"]: r["peak_cache_bytes"] for r in rows if r["policy"] == "sliding_window"}
    assert window["2x"] < full["2x"]  # bytes come from the tensors held
    assert (tmp_path / "fidelity.md").is_file() and (tmp_path / "fidelity.png").is_file()
    assert "Drift of the ground truth itself" in (tmp_path / "fidelity.md").read_text()


def test_the_committed_fidelity_markdown_is_what_its_json_gives():
    """benchmarks/results/fidelity.md is written from fidelity.json alone (markdown(data))."""
    fidelity = _fidelity_module()
    data = json.loads((ROOT / "benchmarks" / "results" / "fidelity.json").read_text())
    assert fidelity.markdown(data) == (ROOT / "benchmarks" / "results" / "fidelity.md").read_text()


def test_memory_benchmark_writes_to_out_in_the_committed_format(tmp_path):
    """--out keeps a short run away from the committed results; the run writes JSON, markdown
    and PNG, and its markdown has the committed file's layout (numbers aside)."""
    import re

    committed = ROOT / "benchmarks" / "results" / "memory_vs_length.md"
    before = committed.read_bytes()
    result = subprocess.run(
        [sys.executable, "benchmarks/memory_vs_length.py", "--blocks", "4", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert committed.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {"memory_vs_length.json", "memory_vs_length.md",
                                                   "memory_vs_length.png"}  # fmt: skip

    def layout(text):
        return [re.sub(r"[\d.]+", "N", line) for line in text.splitlines() if not line.startswith("Machine:")]

    assert layout((tmp_path / "memory_vs_length.md").read_text()) == layout(before.decode())


def _fidelity_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fidelity_bench", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fidelity_evaluates_only_worlds_the_weights_never_saw():
    """The evaluation worlds are checked against the training clips the weights' metadata
    records (the run and the runs it continued): the shipped model's are unseen; a run with
    enough clips to reach them is caught."""
    from packforcing.compressors.dual_branch import resolve_weights
    from packforcing.training.model import read_metadata, training_world_seeds

    fidelity = _fidelity_module()
    shipped = read_metadata(resolve_weights("pkg:world_tiny.safetensors"))
    assert training_world_seeds(shipped) == [range(0, 2048), range(0, 2048)]  # the run, then the one it continued
    evaluated = [fidelity.WORLD_SEED + s for s in range(3)] + [fidelity.PROBE_SEED + i for i in range(8)]
    assert fidelity.leaked_worlds(shipped, evaluated) == []
    many = {"seed": 0, "clips": fidelity.WORLD_SEED + 2, "init": {"seed": 1, "clips": 10}}
    assert fidelity.leaked_worlds(many, evaluated) == [fidelity.WORLD_SEED, fidelity.WORLD_SEED + 1]
    continued = {"seed": 5, "clips": 10, "init": {"seed": 0, "clips": fidelity.PROBE_SEED + 1}}
    assert fidelity.leaked_worlds(continued, evaluated) == evaluated[:4]


def test_fidelity_refuses_bad_options_before_running(tmp_path):
    """--seeds 0 and an --out that is a file are one-line errors before anything runs (an --out
    that could not be written failed only after the whole run, with a traceback)."""
    taken = tmp_path / "file"
    taken.write_text("")
    for args, message in (
        (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got '0'"),
        (["--out", str(taken)], f"--out: {taken}: File exists"),
    ):
        result = subprocess.run(
            [sys.executable, "benchmarks/fidelity.py", "--policies", "full", "--multiples", "1", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""


def test_threads_benchmark_refuses_an_unknown_size_in_one_line():
    """``--sizes`` takes the table's names; another is an argparse error listing them, not a
    KeyError traceback after the first size has run."""
    result = subprocess.run(
        [sys.executable, "benchmarks/threads.py", "--sizes", "tiny", "--out", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid choice: 'tiny'" in result.stderr and "'tiny (default)'" in result.stderr
