"""benchmarks/wan_adapter.py runs its code paths at toy size (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("diffusers")


def test_wan_adapter_benchmark_smoke_run():
    result = subprocess.run(
        [sys.executable, "benchmarks/wan_adapter.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapter / diffusers (one call):" in result.stdout
    assert "| uncached / cached |" in result.stdout
