"""The package ships ``py.typed``: its public API must type-check.

``mypy packforcing`` (pyproject's ``[tool.mypy]``; ``mypy`` alone checks the same files) is
clean, but from a cold cache it takes 45-70 s on two shared cores, mostly in following torch,
transformers and diffusers. This test therefore checks only the modules plugin authors type
their code against: ``packforcing.core`` (``core.interfaces`` included), ``packforcing.api``,
``packforcing.testing`` and ``packforcing.plugins``, and the plugin template authors copy
(``examples/plugin-template/packforcing_strided``), with ``follow_imports = silent`` (the
modules they import are analysed for their types, but only the listed ones report errors);
about 20 s cold. A fresh cache directory per run, so a stale cache cannot hide an error.
mypy runs in its own process: run in the suite's (``mypy.api.run``) it left ~GBs of objects
that made every later ``gc.collect()`` (the encoder-release tests) seconds slower.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = [
    "packforcing/core",
    "packforcing/api.py",
    "packforcing/testing",
    "packforcing/plugins",
    "examples/plugin-template/packforcing_strided",
]


def test_public_api_type_checks(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    args = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "mypy_cache"),
        "--follow-imports",
        "silent",
        *(str(ROOT / path) for path in PUBLIC),
    ]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"mypy found errors ({seconds:.0f} s):\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout + done.stderr
